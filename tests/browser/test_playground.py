"""The playground page (GET /) in headless Chromium against the real stack: a streamed, multi-turn chat with
usage and timings, API errors shown in the page, JSON mode and logprobs, and the Jobs view."""
from __future__ import annotations

import json
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


def fill_sampling(page, max_tokens: int, temperature: float, seed: int) -> None:
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#temperature", str(temperature))
    page.fill("#seed", str(seed))


def prompt_tokens(page) -> int:
    return int(re.search(r"prompt tokens: (\d+)", page.inner_text("#usage")).group(1))


def screenshot(page, name):
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_streamed_multi_turn_chat_with_usage_and_timings(page):
    open_playground(page)
    fill_sampling(page, max_tokens=20, temperature=0.7, seed=42)
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


def is_chat_post(request) -> bool:
    return request.method == "POST" and request.url.endswith("/v1/chat/completions")


# Bounded, so that the answer always ends (the grammar completes) well within max_tokens.
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "ok": {"type": "boolean"}},
          "required": ["name", "ok"], "additionalProperties": False}


def test_json_schema_mode_sends_response_format_and_the_output_parses(page):
    open_playground(page)
    expect(page.locator("#schema")).to_be_hidden()
    page.select_option("#response-format", "json_schema")
    expect(page.locator("#schema")).to_be_visible()
    page.fill("#schema", json.dumps(SCHEMA, indent=2))
    page.fill("#schema-name", "person")
    page.fill("#max-tokens", "200")
    page.fill("#temperature", "0.7")
    page.fill("#prompt", "Describe a person as JSON.")
    with page.expect_request(is_chat_post) as sent:
        page.click("#send")
    body = sent.value.post_data_json
    assert body["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    assert "logprobs" not in body and "top_logprobs" not in body
    answer = page.locator("#messages .msg.assistant:not(.streaming) .content")
    expect(answer).to_have_count(1, timeout=STREAM_TIMEOUT_MS)
    expect(page.locator("#error")).to_be_hidden()
    value = json.loads(answer.text_content())
    assert set(value) == {"name", "ok"} and isinstance(value["ok"], bool), value
    assert isinstance(value["name"], str) and len(value["name"]) <= 12, value
    assert answer.locator(".tok").count() == 0  # logprobs off: plain text, as before

    # JSON object mode sends its own response_format; the answer is a JSON object from its first character.
    page.click("#clear")
    page.select_option("#response-format", "json_object")
    expect(page.locator("#schema")).to_be_hidden()
    page.fill("#max-tokens", "16")
    page.fill("#prompt", "Any JSON object.")
    with page.expect_request(is_chat_post) as sent:
        page.click("#send")
    assert sent.value.post_data_json["response_format"] == {"type": "json_object"}
    expect(answer).to_have_count(1, timeout=STREAM_TIMEOUT_MS)
    expect(answer).to_have_text(re.compile(r"^\{"))
    expect(page.locator("#error")).to_be_hidden()
    screenshot(page, "playground-json.png")
    assert page.js_errors == []


def test_logprobs_mode_shows_token_spans_with_logprobs(page):
    open_playground(page)
    expect(page.locator("#top-logprobs")).to_be_disabled()
    page.check("#logprobs")
    expect(page.locator("#top-logprobs")).to_be_enabled()
    page.fill("#top-logprobs", "3")
    fill_sampling(page, max_tokens=40, temperature=0.7, seed=7)
    # Count the updates that add token spans while the answer is still streaming.
    page.evaluate("""() => {
        window.spanUpdates = 0;
        new MutationObserver((records) => {
            if (records.some((r) => [...r.addedNodes].some((n) => n.classList && n.classList.contains('tok')
                                                                && n.closest('.msg.assistant.streaming'))))
                window.spanUpdates++;
        }).observe(document.getElementById('messages'), {childList: true, subtree: true});
    }""")
    page.fill("#prompt", "Hello, who are you?")
    with page.expect_request(is_chat_post) as sent:
        page.click("#send")
    body = sent.value.post_data_json
    assert body["logprobs"] is True and body["top_logprobs"] == 3 and "response_format" not in body
    answer = page.locator("#messages .msg.assistant:not(.streaming) .content")
    expect(answer).to_have_count(1, timeout=STREAM_TIMEOUT_MS)
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#usage")).to_contain_text("completion tokens: 40")
    assert page.evaluate("window.spanUpdates") >= 2, "the token spans were not added chunk by chunk"

    spans = answer.locator(".tok")
    assert 10 <= spans.count() <= 40
    for title in spans.evaluate_all("(spans) => spans.map((s) => s.title)"):
        assert re.search(r"\d%  \(logprob -?\d+\.\d{4}\)", title), title
        assert "Top 3:" in title and len(re.findall(r"\n  \S.*%", title)) >= 3, title
    # The spans show exactly the answer's text (what the conversation keeps and sends next).
    assert answer.text_content() == page.evaluate("history[history.length - 1].content")
    page.hover(".msg.assistant .tok >> nth=0")
    screenshot(page, "playground-logprobs.png")

    # Off again: the next answer is plain text, and nothing about logprobs is sent.
    page.uncheck("#logprobs")
    page.fill("#max-tokens", "10")
    page.fill("#prompt", "Tell me more.")
    with page.expect_request(is_chat_post) as sent:
        page.click("#send")
    assert "logprobs" not in sent.value.post_data_json
    expect(answer).to_have_count(2, timeout=STREAM_TIMEOUT_MS)
    expect(answer.nth(1)).to_have_text(re.compile(r"\S"))
    assert answer.nth(1).locator(".tok").count() == 0
    assert page.js_errors == []


def test_bad_schema_shows_the_error(page):
    open_playground(page)
    page.select_option("#response-format", "json_schema")
    chat_posts = []
    page.on("request", lambda request: is_chat_post(request) and chat_posts.append(request))
    error = page.locator("#error")

    # Not JSON: the page says so and sends nothing.
    page.fill("#schema", '{"type": "object",')
    expect(page.locator("#schema-status")).to_contain_text("not valid JSON")
    page.fill("#prompt", "Hello")
    page.click("#send")
    expect(error).to_contain_text("The JSON schema is not valid JSON")
    page.fill("#schema", "[1, 2]")
    page.click("#send")
    expect(error).to_contain_text("must be a JSON object")
    assert chat_posts == []
    expect(page.locator("#prompt")).to_have_value("Hello")

    # JSON, but not a schema the server can enforce: its 400 naming response_format is shown.
    page.fill("#schema", '{"type": "nonsense"}')
    expect(page.locator("#schema-status")).to_have_text("")
    page.click("#send")
    expect(error).to_contain_text("HTTP 400", timeout=STREAM_TIMEOUT_MS)
    expect(error).to_contain_text("Invalid response_format")
    expect(error).to_contain_text("nonsense")
    expect(error).to_contain_text("(param: response_format)")
    assert len(chat_posts) == 1
    expect(page.locator("#messages .msg")).to_have_count(0)
    expect(page.locator("#prompt")).to_have_value("Hello")
    screenshot(page, "playground-schema-error.png")
    assert page.js_errors == []


def test_token_spans_show_exactly_the_answer_text(page):
    """A canned stream in the server's shapes: the first token's leading space (not in the text), text held back
    by the server and sent with a later delta, a character made of two byte tokens ("bytes:\\xNN"), and a token
    past a stop sequence. The spans show the text of the deltas, no more and no less."""
    def entry(token, data, logprob):
        return {"token": token, "logprob": logprob, "bytes": list(data),
                "top_logprobs": [{"token": token, "logprob": logprob, "bytes": list(data)},
                                 {"token": "x", "logprob": -3.5, "bytes": [120]}]}

    deltas = [("Hello", [entry(" Hello", b" Hello", -0.01)]),
              (" w", [entry(" wor", b" wor", -0.7)]),  # "or" held back
              ("or ", [entry(" ", b" ", -1.2)]),
              ("", [entry("bytes:\\xc3", b"\xc3", -0.2)]),
              ("é", [entry("bytes:\\xa9", b"\xa9", -0.05)]),
              ("!", [entry("!!", b"!!", -2.5)])]  # the stop sequence "!" and what followed it are cut
    head = {"id": "chatcmpl-canned", "object": "chat.completion.chunk", "created": 1700000000,
            "model": SERVED_MODEL_ID, "system_fingerprint": "fp"}

    def chunk(delta, logprobs=None, finish=None):
        return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                     "logprobs": logprobs and {"content": logprobs, "refusal": None}}]}

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": text} if text else {}, entries) for text, entries in deltas]
    events += [chunk({}, finish="stop"), {**head, "choices": [],
                                          "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}}]
    sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"

    open_playground(page)
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=sse))
    page.check("#logprobs")
    page.fill("#prompt", "Hi")
    page.click("#send")
    answer = page.locator("#messages .msg.assistant:not(.streaming) .content")
    expect(answer).to_have_count(1, timeout=STREAM_TIMEOUT_MS)
    expect(page.locator("#error")).to_be_hidden()
    assert answer.text_content() == "Hello wor é!"
    assert page.evaluate("history[history.length - 1].content") == "Hello wor é!"
    spans = answer.locator(".tok")
    assert spans.all_text_contents() == ["Hello", " wor", " ", "é", "!"]
    titles = spans.evaluate_all("(spans) => spans.map((s) => s.title)")
    assert titles[0].startswith('" Hello"  99.0%  (logprob -0.0100)') and "Top 2:" in titles[0]
    assert '"x"  3.0%' in titles[0]
    assert '"bytes:\\xc3"  81.9%' in titles[3] and '"bytes:\\xa9"  95.1%' in titles[3]  # both tokens of "é"
    assert spans.nth(4).get_attribute("class") == "tok p-rare"
    assert page.js_errors == []
