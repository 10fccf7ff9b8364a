"""GET /metrics and the JSON logs on the real stack (gunicorn + gevent API, Celery worker, Redis), driven with
the openai SDK.

Tests marked `wiring pending` need the calls of app/metrics.py and config/logging.py wired into
app/serving.py, jobs/store.py and workers/ (see app/metrics.py); they pass once that is done."""
from __future__ import annotations

import json
import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from config.settings import Settings
from scripts.stack import ROOT
from tests.conftest import API_KEYS, free_port, wait_until

MODEL = "mistralai/mistral-7b-instruct-v0.2"
PROMPT = "Count the ZEBRA-CROSSING-2319 stripes"


def scrape(base_url: str) -> dict:
    """{(sample name, frozenset of labels): value} from GET /metrics, sent without any API key."""
    response = httpx.get(base_url + "/metrics", timeout=10)
    assert response.status_code == 200, response.text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def _try_scrape(base_url: str):
    try:
        return scrape(base_url)
    except httpx.TransportError:
        return None


def _unmatched_count(db_file: Path) -> float:
    """What one process's counter file says it answered on unmatched routes."""
    from prometheus_client.multiprocess import MultiProcessCollector
    return sum(s.value for metric in MultiProcessCollector.merge([str(db_file)]) for s in metric.samples
               if s.name == "llmq_http_requests_total" and s.labels.get("endpoint") == "unmatched")


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: dict, name: str, **labels) -> float:
    """Sum over the series of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def chat(client, stream: bool, max_tokens: int = 6):
    messages = [{"role": "user", "content": PROMPT}]
    if not stream:
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                                 stream=True, stream_options={"include_usage": True}))
    return chunks


def test_metrics_needs_no_key_and_counts_requests_by_route(stack, client):
    before = scrape(stack.base_url)
    client.models.list()
    client.models.retrieve(MODEL)
    client.models.retrieve(MODEL)
    with pytest.raises(Exception):
        client.models.retrieve("no-such-model")
    after = scrape(stack.base_url)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("llmq_http_requests_total", endpoint="/v1/models", method="GET", status="200") == 1
    assert delta("llmq_http_requests_total", endpoint="/v1/models/<path:model_id>", method="GET",
                 status="200") == 2
    assert delta("llmq_http_requests_total", endpoint="/v1/models/<path:model_id>", method="GET",
                 status="404") == 1
    assert delta("llmq_errors_total", code="model_not_found") == 1
    assert not any("no-such-model" in str(labels) for _, labels in after)  # routes, never raw paths
    # State read from Redis at scrape time.
    assert value(after, "llmq_redis_up") == 1 and total(after, "llmq_workers") >= 1
    for kind, queue in (("interactive", stack.env["INTERACTIVE_QUEUE"]), ("batch", stack.env["BATCH_QUEUE"])):
        assert any(n == "llmq_queue_depth" and ("kind", kind) in ls and ("queue", queue) in ls for n, ls in after)


def test_latency_histograms_and_tokens_after_chat_requests(stack, client):
    before = scrape(stack.base_url)
    usages = [chat(client, stream=False).usage for _ in range(2)]
    usages += [chat(client, stream=True)[-1].usage for _ in range(2)]
    after = scrape(stack.base_url)

    def delta(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("llmq_e2e_request_latency_seconds_count", stream="true") == 2
    assert delta("llmq_e2e_request_latency_seconds_count", stream="false") == 2
    assert delta("llmq_time_to_first_token_seconds_count") >= 2  # streams; non-stream too once first_token_at
    assert delta("llmq_inter_token_latency_seconds_count") >= 2
    assert delta("llmq_e2e_request_latency_seconds_sum") > 0
    assert delta("llmq_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert delta("llmq_generation_tokens_total") == sum(u.completion_tokens for u in usages)
    assert delta("llmq_http_requests_total", endpoint="/v1/chat/completions", method="POST", status="200") == 4


def test_jobs_by_state_follow_the_jobs(stack, client):
    before = scrape(stack.base_url)
    chat(client, stream=False)
    after = scrape(stack.base_url)
    for state in ("queued", "in_progress", "completed"):
        assert (value(after, "llmq_job_state_transitions_total", state=state)
                - value(before, "llmq_job_state_transitions_total", state=state)) == 1, state
    assert value(after, "llmq_jobs", state="completed") >= 1
    assert value(after, "llmq_jobs", state="in_progress") == 0 and value(after, "llmq_jobs", state="queued") == 0


def test_worker_heartbeats_report_engine_load(stack):
    samples = wait_until(lambda: (s := scrape(stack.base_url)) and total(s, "llmq_kv_blocks_capacity") > 0 and s,
                         timeout=15, what="a heartbeat with kv_blocks_total")
    assert 0 <= total(samples, "llmq_kv_blocks_used") <= total(samples, "llmq_kv_blocks_capacity")
    assert total(samples, "llmq_running_sequences") >= 0 and total(samples, "llmq_waiting_sequences") >= 0
    assert 0 <= total(samples, "llmq_kv_cache_usage_ratio") <= 1


def test_timing_headers_on_non_stream_responses(client):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=8)
    completion = raw.parse()
    assert float(raw.headers["x-queue-time-ms"]) >= 0
    assert float(raw.headers["x-tokens-per-second"]) > 0
    assert completion.usage.completion_tokens == 8


def test_logs_are_json_lines_with_the_job_id_and_no_secrets(stack, client):
    completion = chat(client, stream=False)
    chat(client, stream=True)
    time.sleep(0.5)  # let the worker write its last lines
    logs = {name: (stack.log_dir / f"{name}.log").read_text(errors="replace") for name in ("api", "worker")}
    # A process may be writing as we read: leave out a last line that has no newline yet.
    logs = {name: text[:text.rfind("\n") + 1] for name, text in logs.items()}
    for name, text in logs.items():
        assert API_KEYS[0] not in text and "ZEBRA-CROSSING" not in text, name
    # Gunicorn's master and Celery's banner print plain text; every log line of our processes is JSON.
    # JSON lines end at "\n" only (str.splitlines would also split at U+2028 and other separators).
    entries = {name: [json.loads(line) for line in text.split("\n") if line.startswith("{")]
               for name, text in logs.items()}
    assert any(e["service"] == "api" and e["logger"] == "app.access" for e in entries["api"])
    worker_lines = [e for e in entries["worker"] if e.get("job_id") == completion.id]
    assert worker_lines and all(e["service"] == "worker" for e in worker_lines)
    assert all({"timestamp", "level", "logger", "message", "service"} <= set(e) for e in entries["worker"])


def _pid(db_file: Path) -> int:
    return int(db_file.stem.rsplit("_", 1)[1])  # counter_{pid}.db


def test_counts_add_up_across_several_gunicorn_workers(stack):
    """A second API server with three processes behind one port, beside the stack's own and in the same
    METRICS_DIR: every scrape, whichever process answers it, sums them all; a worker that dies keeps its
    counts in the sums; neither server touches the other's files, and a stopped one takes its own away."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    metrics_dir = ROOT / Settings(_env_file=ROOT / ".env").metrics_dir  # the default: the stack's API uses it
    theirs = metrics_dir / f"gunicorn-{stack.processes['api'].pid}"
    their_files = set(theirs.glob("counter_*.db"))
    assert their_files, f"no metric files of the stack's API in {theirs}"
    their_before = scrape(stack.base_url)
    stack.start_api("api3", port=port, processes=3)
    mine = metrics_dir / f"gunicorn-{stack.processes['api3'].pid}"
    try:
        stack.wait_api(base, timeout=120)
        # Each process creates its metric files when its app is set up: wait for all three.
        wait_until(lambda: len(list(mine.glob("counter_*.db"))) == 3, 120, "three API processes")
        time.sleep(0.5)
        before = scrape(base)  # the readiness polls above were counted too
        n = 120

        def hit(i):  # a new connection each time, many at once: the processes share them
            try:
                return httpx.get(base + ("/health" if i % 2 else f"/nowhere/{uuid.uuid4().hex}"),
                                 timeout=30).status_code
            except httpx.TransportError:  # a loaded machine may drop one: then it may or may not have counted
                return None

        with ThreadPoolExecutor(24) as pool:
            codes = list(pool.map(hit, range(n)))
        answered = {"/health": codes[1::2].count(200), "unmatched": codes[0::2].count(404)}
        assert answered["/health"] >= n // 2 - 3 and answered["unmatched"] >= n // 2 - 3, codes
        served = {_pid(f): c for f in mine.glob("counter_*.db") if (c := _unmatched_count(f))}
        assert len(served) >= 2, "the requests all went to one process: nothing to sum"

        def sums():
            samples = wait_until(lambda: _try_scrape(base), 30, "a scrape")
            return tuple(value(samples, name, **labels) - value(before, name, **labels) for name, labels in (
                ("llmq_http_requests_total", dict(endpoint="/health", method="GET", status="200")),
                ("llmq_http_requests_total", dict(endpoint="unmatched", method="GET", status="404")),
                ("llmq_errors_total", dict(code="not_found"))))

        seen = set()
        for _ in range(6):  # each scrape may land on a different process: all give the full sums
            counts = sums()
            assert answered["/health"] <= counts[0] <= n // 2, counts  # a process alone would have ~1/3
            assert answered["unmatched"] <= counts[1] <= n // 2 and counts[2] == counts[1], counts
            seen.add(counts)
        assert len(seen) == 1, seen  # every process answers with the same sums

        # A worker dies: gunicorn's master marks it dead (child_exit) and starts another; what it counted stays.
        os.kill(max(served, key=served.get), signal.SIGKILL)
        wait_until(lambda: len(list(mine.glob("counter_*.db"))) == 4, 60, "a new API process")
        assert {sums() for _ in range(4)} == seen
    finally:
        stack.stop("api3")
    assert not mine.exists()  # removed when its master stopped (on_exit)
    assert their_files <= set(theirs.glob("counter_*.db"))  # the stack's API kept its files, and its counts
    their_after = scrape(stack.base_url)
    assert (value(their_after, "llmq_http_requests_total", endpoint="/metrics", method="GET", status="200")
            > value(their_before, "llmq_http_requests_total", endpoint="/metrics", method="GET", status="200"))
