"""The playground page (GET /) in headless Chromium against the real stack: a streamed, multi-turn chat with
usage and timings, API errors shown in the page, and the Jobs view."""
from __future__ import annotations

import re

import httpx

from config.settings import SERVED_MODEL_ID
from scripts.stack import ROOT
from tests.conftest import API_KEYS

try:
    from playwright.sync_api import expect
except ImportError:  # the `browser` fixture skips (or fails, with REQUIRE_BROWSER) the tests that need it
    expect = None

ARTIFACTS = ROOT / "test-artifacts"
SCREENSHOT = ARTIFACTS / "playground.png"
STREAM_TIMEOUT_MS = 60_000


def test_page_and_assets_load_without_auth(stack):
    page = httpx.get(stack.base_url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        response = httpx.get(f"{stack.base_url}/playground/static/{asset}", timeout=10)
        assert response.status_code == 200 and kind in response.headers["content-type"]
    # Nothing from another origin: the machine that runs the page may have no internet.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text)


def open_playground(page, key=API_KEYS[0]):
    page.goto("/")
    page.fill("#api-key", key)
    # The model list needs the key when auth is on: it is fetched again once the key is typed.
    expect(page.locator("#model")).to_have_value(SERVED_MODEL_ID)


def prompt_tokens(page) -> int:
    return int(re.search(r"prompt tokens: (\d+)", page.inner_text("#usage")).group(1))


def screenshot(page, name):
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_streamed_multi_turn_chat_with_usage_and_timings(page):
    open_playground(page)
    page.fill("#max-tokens", "20")
    page.fill("#temperature", "0.7")
    page.fill("#seed", "42")
    # Count the updates of the answer as they happen, to see that it arrives in pieces (streamed).
    page.evaluate("""() => {
        window.answerUpdates = 0;
        new MutationObserver((records) => {
            for (const r of records)
                if (r.target.closest && r.target.closest('.msg.assistant')) window.answerUpdates++;
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    }""")
    page.fill("#prompt", "Hello, who are you?")
    page.click("#send")

    answer = page.locator("#messages .msg.assistant:not(.streaming) .content")
    expect(answer).to_have_count(1, timeout=STREAM_TIMEOUT_MS)
    expect(answer).to_have_text(re.compile(r"\S"))
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#usage")).to_contain_text("completion tokens: 20")
    expect(page.locator("#usage")).to_contain_text(re.compile(r"prompt tokens: [1-9]\d*"))
    expect(page.locator("#timings")).to_contain_text(re.compile(r"time to first token: \d+ ms"))
    expect(page.locator("#timings")).to_contain_text(re.compile(r"[\d.]+ tokens/s"))
    assert page.evaluate("window.answerUpdates") >= 2, "the answer was not appended delta by delta"
    expect(page.locator("#prompt")).to_have_value("")
    first_prompt_tokens = prompt_tokens(page)

    # A second turn sends the whole conversation: the API would refuse it (400) unless user/assistant alternate.
    page.fill("#prompt", "Tell me more.")
    page.press("#prompt", "Enter")  # Enter sends too
    expect(answer).to_have_count(2, timeout=STREAM_TIMEOUT_MS)
    expect(page.locator("#messages .msg.user")).to_have_count(2)
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#usage")).to_contain_text("completion tokens: 20")
    assert prompt_tokens(page) > first_prompt_tokens + 5, "the first turn was not sent with the second"

    screenshot(page, SCREENSHOT.name)

    page.click("#clear")
    expect(page.locator("#messages .msg")).to_have_count(0)
    expect(page.locator("#usage")).to_have_text("Usage: –")
    assert page.js_errors == []


def test_stream_reads_on_through_keepalives_after_its_first_delta(page, stack):
    """The page's own SSE reader, on a stream that goes quiet after its first delta: its worker frozen for
    several keep-alive intervals (0.5 s in the test stack), then going on."""
    open_playground(page)
    page.fill("#max-tokens", "1000")
    page.fill("#temperature", "0")  # greedy: the tiny model never ends early with EOS
    page.fill("#prompt", "Tell me a long story.")
    page.click("#send")
    streaming = page.locator("#messages .msg.assistant.streaming .content")
    expect(streaming).to_have_text(re.compile(r"\S"), timeout=STREAM_TIMEOUT_MS)
    with stack.frozen("worker"):  # the session stack's one worker
        page.wait_for_timeout(3000)
        expect(streaming).to_have_count(1)  # still open: the stream was idle, not done
    expect(page.locator("#messages .msg.assistant:not(.streaming)")).to_have_count(1, timeout=STREAM_TIMEOUT_MS)
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#usage")).to_contain_text("completion tokens: 1000")
    assert page.js_errors == []


def test_api_errors_are_shown(page):
    open_playground(page)
    page.fill("#temperature", "5")
    page.fill("#prompt", "Hello")
    page.click("#send")
    error = page.locator("#error")
    expect(error).to_be_visible(timeout=STREAM_TIMEOUT_MS)
    expect(error).to_contain_text("HTTP 400")
    expect(error).to_contain_text("temperature")
    # The failed turn is not kept: the prompt is back in the box and the conversation is empty.
    expect(page.locator("#messages .msg")).to_have_count(0)
    expect(page.locator("#prompt")).to_have_value("Hello")
    expect(page.locator("#messages")).to_contain_text("No messages yet")
    screenshot(page, "playground-error.png")

    # Fixing the setting and sending again works, and clears the error.
    page.fill("#temperature", "0.3")
    page.fill("#max-tokens", "5")
    page.click("#send")
    expect(page.locator("#messages .msg.assistant:not(.streaming)")).to_have_count(1, timeout=STREAM_TIMEOUT_MS)
    expect(error).to_be_hidden()

    # Stop during a long answer: the request is aborted, and the turn is dropped like a failed one.
    page.fill("#max-tokens", "3000")
    page.fill("#prompt", "Write a long story.")
    page.click("#send")
    expect(page.locator("#messages .msg.assistant.streaming .content")).to_have_text(
        re.compile(r"\S"), timeout=STREAM_TIMEOUT_MS)
    page.click("#cancel")
    expect(error).to_contain_text("Stopped")
    expect(page.locator("#messages .msg")).to_have_count(2)  # the first exchange stays
    expect(page.locator("#send")).to_be_enabled()

    # A wrong key: the 401 is shown too, and the model picker says it could not list the models.
    page.fill("#api-key", "not-a-key")
    expect(page.locator("#model-status")).to_contain_text("HTTP 401")
    page.fill("#prompt", "Hello again")
    page.click("#send")
    expect(error).to_contain_text("HTTP 401", timeout=STREAM_TIMEOUT_MS)
    assert page.js_errors == []


def test_jobs_view_lists_or_says_not_available(page):
    open_playground(page)
    page.reload()  # the key is kept in localStorage, and the models load with it
    expect(page.locator("#api-key")).to_have_value(API_KEYS[0])
    expect(page.locator("#model")).to_have_value(SERVED_MODEL_ID)
    page.click("#tab-jobs")
    expect(page.locator("#panel-jobs")).to_be_visible()
    expect(page.locator("#panel-chat")).to_be_hidden()
    expect(page.locator("#jobs-updated")).to_contain_text("Updated", timeout=15_000)
    for section in ("#jobs-list", "#batches-list"):
        # Either a table (the endpoint exists) or an explicit "Not available" (it does not yet).
        expect(page.locator(section)).not_to_contain_text("Not loaded yet")
        expect(page.locator(section)).to_contain_text(re.compile(r"Not available|No (jobs|batches)|ID"))

    # The tables, with canned lists in the endpoints' shapes (whatever the server has so far).
    job = {"id": "chatcmpl-abc", "object": "chat.completion.job", "status": "failed", "created_at": 1700000000,
           "started_at": 1700000001, "completed_at": 1700000002, "model": SERVED_MODEL_ID, "result": None,
           "error": {"message": "worker lost", "code": "worker_error"}}
    batch = {"id": "batch_xyz", "object": "batch", "status": "in_progress", "created_at": 1700000000,
             "request_counts": {"total": 5, "completed": 3, "failed": 1}}
    page.route("**/v1/chat/completions?*", lambda route: route.fulfill(
        json={"object": "list", "data": [job], "has_more": True}))
    page.route("**/v1/batches?*", lambda route: route.fulfill(
        json={"object": "list", "data": [batch], "has_more": False}))
    page.click("#jobs-refresh")
    expect(page.locator("#jobs-list tbody tr")).to_have_count(1)
    expect(page.locator("#jobs-list")).to_contain_text("chatcmpl-abc")
    expect(page.locator("#jobs-list")).to_contain_text("worker lost")
    expect(page.locator("#jobs-list")).to_contain_text("only the latest 20")
    expect(page.locator("#batches-list tbody tr")).to_have_count(1)
    expect(page.locator("#batches-list tbody tr")).to_contain_text("in_progress")
    expect(page.locator("#batches-list tbody tr")).to_contain_text("3 / 1 / 5")
    expect(page.locator("#jobs-refresh")).to_be_enabled()
    screenshot(page, "playground-jobs.png")
    page.click("#tab-chat")
    expect(page.locator("#panel-chat")).to_be_visible()
    assert page.js_errors == []
