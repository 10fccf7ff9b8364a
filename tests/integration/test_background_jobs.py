"""Submit and poll: background jobs, their cancel, listing, event replay/resume and ownership, over HTTP
against the real stack (worker concurrency 1, so a second job stays queued behind a long first one)."""
from __future__ import annotations


import httpx

from scripts.stack import iter_sse
from tests.conftest import API_KEYS, wait_until

MODEL = "mistralai/mistral-7b-instruct-v0.2"
HELLO = [{"role": "user", "content": "Tell me a story."}]


def headers(key_index=0):
    return {"Authorization": f"Bearer {API_KEYS[key_index]}"}


def submit(stack, key_index=0, **body):
    response = httpx.post(stack.base_url + "/v1/chat/completions", headers=headers(key_index), timeout=30,
                          json={"model": MODEL, "messages": HELLO, "background": True, **body})
    assert response.status_code == 202, response.text
    return response.json()


def get_job(stack, job_id, key_index=0):
    return httpx.get(f"{stack.base_url}/v1/chat/completions/{job_id}", headers=headers(key_index), timeout=30)


def wait_done(stack, job_id, timeout=60, key_index=0):
    def finished():
        job = get_job(stack, job_id, key_index).json()
        return job["status"] not in ("queued", "in_progress") and job
    return wait_until(finished, timeout, f"job {job_id} to finish")


def read_events(stack, job_id, key_index=0, params=None, extra_headers=None):
    """[(id or None, payload)] of a job's SSE stream, until [DONE] or an error event."""
    url = f"{stack.base_url}/v1/chat/completions/{job_id}/events"
    with httpx.stream("GET", url, params=params, timeout=60,
                      headers={**headers(key_index), **(extra_headers or {})}) as response:
        assert response.status_code == 200, response.read()
        events = list(iter_sse(response.iter_lines()))
    return events


def text_of(events):
    return "".join(p["choices"][0]["delta"].get("content", "") for _, p in events
                   if isinstance(p, dict) and p.get("choices"))


def test_submit_poll_and_result_equals_a_direct_request(stack, client):
    job = submit(stack, max_tokens=15, temperature=0.8, seed=9)
    assert job["object"] == "chat.completion.job" and job["status"] in ("queued", "in_progress")
    assert job["result"] is None and job["created_at"]
    done = wait_done(stack, job["id"])
    assert done["status"] == "completed" and done["completed_at"] >= done["created_at"]
    result = done["result"]
    assert result["object"] == "chat.completion" and result["usage"]["completion_tokens"] == 15
    direct = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=15, temperature=0.8, seed=9)
    assert result["choices"][0]["message"]["content"] == direct.choices[0].message.content


def test_events_replay_and_resume_from_the_middle(stack):
    job = submit(stack, max_tokens=20, temperature=0)
    done = wait_done(stack, job["id"])
    full = read_events(stack, job["id"])
    assert full[-1][1] == "[DONE]"
    assert text_of(full) == done["result"]["choices"][0]["message"]["content"]
    ids = [i for i, _ in full if i is not None]
    assert ids == sorted(ids) and len(ids) == len(set(ids))
    middle = ids[len(ids) // 2]
    by_query = read_events(stack, job["id"], params={"starting_after": middle})
    by_header = read_events(stack, job["id"], extra_headers={"Last-Event-ID": str(middle)})
    expected = [(i, p) for i, p in full if i is not None and i > middle]
    assert [(i, p) for i, p in by_query if i is not None] == expected
    assert [(i, p) for i, p in by_header if i is not None] == expected
    assert by_query[-1][1] == "[DONE]"


def test_queued_job_can_be_cancelled_and_streamed_while_queued(stack):
    long = submit(stack, max_tokens=3000)
    wait_until(lambda: get_job(stack, long["id"]).json()["status"] == "in_progress", 30, "the long job to start")
    queued = submit(stack, max_tokens=5)
    assert get_job(stack, queued["id"]).json()["status"] == "queued"
    cancelled = httpx.post(f"{stack.base_url}/v1/chat/completions/{queued['id']}/cancel", headers=headers(), timeout=30)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    events = read_events(stack, queued["id"])  # a cancelled job's stream ends with an error event
    assert events[-1][1]["error"]["code"] == "job_cancelled"
    # Cancel the running one: the worker stops it at its next step.
    httpx.post(f"{stack.base_url}/v1/chat/completions/{long['id']}/cancel", headers=headers(), timeout=30)
    assert wait_done(stack, long["id"])["status"] == "cancelled"
    # The cancelled queued job is skipped by the worker, never run.
    assert get_job(stack, queued["id"]).json()["started_at"] is None


def test_stream_opened_while_queued_gets_everything(stack):
    long = submit(stack, max_tokens=300)
    queued = submit(stack, max_tokens=12, temperature=0)
    events = read_events(stack, queued["id"])  # opened while it waits behind `long`
    done = get_job(stack, queued["id"]).json()
    assert done["status"] == "completed"
    assert text_of(events) == done["result"]["choices"][0]["message"]["content"]
    wait_done(stack, long["id"])


def test_listing_with_cursor_pagination(stack):
    ids = [submit(stack, key_index=1, max_tokens=1)["id"] for _ in range(3)]
    page1 = httpx.get(stack.base_url + "/v1/chat/completions", params={"limit": 2}, headers=headers(1)).json()
    assert [j["id"] for j in page1["data"]] == ids[::-1][:2] and page1["has_more"]
    page2 = httpx.get(stack.base_url + "/v1/chat/completions", params={"limit": 2, "after": page1["last_id"]},
                      headers=headers(1)).json()
    assert ids[0] in [j["id"] for j in page2["data"]]
    bad = httpx.get(stack.base_url + "/v1/chat/completions", params={"limit": 0}, headers=headers(1))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"
    for job_id in ids:
        wait_done(stack, job_id, key_index=1)


def test_another_key_gets_404(stack):
    job = submit(stack, key_index=0, max_tokens=2)
    for response in (get_job(stack, job["id"], key_index=1),
                     httpx.post(f"{stack.base_url}/v1/chat/completions/{job['id']}/cancel", headers=headers(1)),
                     httpx.get(f"{stack.base_url}/v1/chat/completions/{job['id']}/events", headers=headers(1))):
        assert response.status_code == 404 and response.json()["error"]["code"] == "job_not_found"
    listed = httpx.get(stack.base_url + "/v1/chat/completions", params={"limit": 100}, headers=headers(1)).json()
    assert job["id"] not in [j["id"] for j in listed["data"]]
    assert get_job(stack, "chatcmpl-doesnotexist").status_code == 404
    wait_done(stack, job["id"])


def test_expired_job_reports_expired(stack):
    job = submit(stack, max_tokens=1)
    wait_done(stack, job["id"])
    stack.job_redis(job["id"]).delete(f"{stack.prefix}:job:{job['id']}")  # what the TTL does, without waiting a day
    expired = get_job(stack, job["id"]).json()
    assert expired["status"] == "expired" and expired["error"]["code"] == "job_expired"
    assert get_job(stack, job["id"], key_index=1).status_code == 404
