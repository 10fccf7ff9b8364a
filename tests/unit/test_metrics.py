"""Metrics (app/metrics.py, jobs/telemetry.py), gunicorn's multiprocess hooks (config/gunicorn.py) and JSON
logs (config/logging.py), without the real stack.

This test process has no PROMETHEUS_MULTIPROC_DIR: its apps' registries hold the process's own metric objects
(created once per process), so in-process checks compare values before and after. Multiprocess summing runs
in subprocesses that share a directory, as gunicorn's workers do."""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import types
import uuid
from pathlib import Path

import pytest
import redis
from flask import Flask, jsonify

from app import metrics
from config.logging import bind_job, current_job_id, job_context, setup_logging, unbind_job
from config.settings import Settings
from jobs.records import GenerationRequest, JobEvent, JobRecord, JobResult, Keys, Usage
from jobs.store import JobStore
from jobs.telemetry import JobTelemetry, aggregate_workers, aggregate_workers_by_model, queue_depths, worker_load
from jobs.transition import Ending
from tests.conftest import REDIS_URL

ROOT = Path(__file__).resolve().parents[2]
SECRET_KEY = "sk-unit-secret-key-0123456789"
PROMPT = "Tell me about the PURPLE-ELEPHANT-4711 secret plan"


# --- fixtures
@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)
    unbind_job()


@pytest.fixture
def log_stream(restore_logging):
    stream = io.StringIO()
    setup_logging("api", level="DEBUG", stream=stream, secrets=[SECRET_KEY])
    return stream


def lines(stream: io.StringIO, prefix: str = "") -> list[dict]:
    """The JSON lines written so far (all must be JSON), those of loggers named `prefix...` if given (other
    tests' leftover threads may log meanwhile)."""
    entries = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    return [e for e in entries if e["logger"].startswith(prefix)]


@pytest.fixture
def settings(redis_client):
    s = Settings(redis_url=REDIS_URL, redis_prefix=f"unit-{uuid.uuid4().hex[:8]}",
                 interactive_queue=f"iq-{uuid.uuid4().hex[:8]}", batch_queue=f"bq-{uuid.uuid4().hex[:8]}",
                 api_keys=[], job_ttl_s=3600)
    yield s
    for key in redis_client.scan_iter(match=f"{s.redis_prefix}:*"):
        redis_client.delete(key)
    redis_client.delete(s.interactive_queue, s.batch_queue)


@pytest.fixture
def metrics_app(settings):
    app = Flask(__name__)
    app.config["SETTINGS"] = settings

    @app.get("/things/<thing_id>")
    def thing(thing_id):
        bind_job(f"chatcmpl-{thing_id}")  # as serving binds the job it creates
        logging.getLogger("test.view").info("serving %s", thing_id)
        if thing_id == "bad":
            response = jsonify({"error": {"message": "no", "type": "invalid_request_error", "param": None,
                                          "code": "thing_not_found"}})
            response.status_code = 404
            return response
        return {"id": thing_id}

    store = JobStore.from_settings(settings)
    metrics.setup_metrics(app, settings, store)
    app.extensions["store"] = store
    return app


def sample(app, name, labels=None) -> float:
    return app.extensions["metrics_registry"].get_sample_value(name, labels or {}) or 0.0


def record(**fields) -> JobRecord:
    request = GenerationRequest(model="m", prompt_token_ids=[1, 2, 3], max_tokens=4, temperature=0.0, top_p=1.0,
                                frequency_penalty=0.0, presence_penalty=0.0, seed=0)
    return JobRecord(id=f"chatcmpl-{uuid.uuid4().hex}", request=request, **fields)


# --- JSON logs
def test_json_line_has_the_fields_and_no_job_id_outside_a_job(log_stream):
    logging.getLogger("test.some.module").info("hello %s", "world")
    [entry] = lines(log_stream, "test.")
    assert entry["message"] == "hello world" and entry["level"] == "INFO" and entry["logger"] == "test.some.module"
    assert entry["service"] == "api" and entry["pid"] == os.getpid()
    assert entry["timestamp"].endswith("Z") and "T" in entry["timestamp"]
    assert "job_id" not in entry


def test_job_id_on_every_line_inside_job_context_and_restored_after(log_stream):
    log = logging.getLogger("test.workers")
    with job_context("chatcmpl-outer"):
        log.info("one")
        with job_context("chatcmpl-inner"):
            log.warning("two")
        log.info("three")
    log.info("four")
    token = bind_job("chatcmpl-bound")
    log.info("five")
    unbind_job(token)
    log.info("six")
    got = [(e["message"], e.get("job_id")) for e in lines(log_stream, "test.")]
    assert got == [("one", "chatcmpl-outer"), ("two", "chatcmpl-inner"), ("three", "chatcmpl-outer"),
                   ("four", None), ("five", "chatcmpl-bound"), ("six", None)]


def test_each_thread_has_its_own_job_id(log_stream):
    log = logging.getLogger("test.workers")
    barrier = threading.Barrier(3)

    def run(job_id):
        with job_context(job_id):
            barrier.wait()  # all threads inside their job at once
            log.info("in %s", job_id)
            barrier.wait()

    threads = [threading.Thread(target=run, args=(f"chatcmpl-t{i}",)) for i in range(3)]
    with job_context("chatcmpl-main"):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert current_job_id() == "chatcmpl-main"
    for entry in lines(log_stream, "test."):
        assert entry["message"] == f"in {entry['job_id']}"
    assert len(lines(log_stream, "test.")) == 3


def test_each_greenlet_has_its_own_job_id(log_stream):
    gevent = pytest.importorskip("gevent")
    log = logging.getLogger("test.app")

    def request(job_id):  # as a gevent worker's request greenlet would
        bind_job(job_id)
        gevent.sleep(0.01)  # the other greenlets run (and bind theirs) meanwhile
        log.info("in %s", job_id)
        return current_job_id()

    greenlets = [gevent.spawn(request, f"chatcmpl-g{i}") for i in range(4)]
    gevent.joinall(greenlets, raise_error=True)
    assert [g.value for g in greenlets] == [f"chatcmpl-g{i}" for i in range(4)]
    assert len(lines(log_stream, "test.")) == 4
    for entry in lines(log_stream, "test."):
        assert entry["message"] == f"in {entry['job_id']}"
    assert current_job_id() is None  # nothing leaked into the main greenlet


def test_secrets_and_user_text_are_kept_out(log_stream):
    log = logging.getLogger("test.app")
    log.info("header was Authorization: Bearer %s", "abc.def-ghi")
    log.info("configured key %s and an sk- key sk-AAAAAAAAAAAAAAAA", SECRET_KEY)
    log.info("request", extra={"prompt": PROMPT, "messages": [PROMPT], "api_key": SECRET_KEY, "status": 200})
    try:
        raise RuntimeError(f"failed with key {SECRET_KEY}")
    except RuntimeError:
        log.exception("boom")
    text = log_stream.getvalue()
    assert "abc.def-ghi" not in text and SECRET_KEY not in text and "sk-AAAAAAAAAAAAAAAA" not in text
    assert PROMPT not in text
    entries = lines(log_stream, "test.")
    assert entries[0]["message"] == "header was Authorization: Bearer [REDACTED]"
    assert entries[2]["status"] == 200 and "prompt" not in entries[2] and "api_key" not in entries[2]
    assert "RuntimeError" in entries[3]["exception"] and "[REDACTED]" in entries[3]["exception"]


def test_a_logged_request_leaks_neither_key_nor_prompt(settings, log_stream, redis_client):
    from app import create_app

    settings = settings.model_copy(update={"api_keys": [SECRET_KEY], "sse_keepalive_s": 0.2,
                                           "request_timeout_s": 5})

    def enqueue(rec):  # a stand-in worker: one attempt that writes the whole answer, through the job store
        def work():
            store = holder["app"].extensions["chat_service"].store
            usage = Usage(prompt_tokens=3, completion_tokens=1, total_tokens=4)
            _, attempt = store.start(rec.id, "stand-in-worker")
            store.write(attempt, [JobEvent(type="delta", text="Hi")],
                        Ending.completed(JobResult(text="Hi", finish_reason="stop", usage=usage)))
        threading.Thread(target=work, daemon=True).start()

    holder = {}
    holder["app"] = create_app(settings, enqueue=enqueue, drive_batches=False)
    setup_logging("api", level="DEBUG", stream=log_stream, secrets=[SECRET_KEY])  # create_app may set up its own
    # Advertise the model, as a worker's heartbeat does (jobs/models.py), so the API routes requests to it.
    redis_client.hset(Keys(settings.redis_prefix).models(), settings.served_model_name, json.dumps({
        "id": settings.served_model_name, "queue": settings.interactive_queue, "batch_queue": settings.batch_queue,
        "aliases": [], "last_seen": time.time()}))
    client = holder["app"].test_client()
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 5}
    ok = client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {SECRET_KEY}"})
    assert ok.status_code == 200
    streamed = client.post("/v1/chat/completions", json={**body, "stream": True},
                           headers={"Authorization": f"Bearer {SECRET_KEY}"})
    assert streamed.status_code == 200 and "[DONE]" in streamed.get_data(as_text=True)
    wrong = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong-key-98765"})
    assert wrong.status_code == 401
    text = log_stream.getvalue()
    entries = lines(log_stream)  # every line is JSON
    assert any(e["logger"] == "app.access" and e.get("status") == 200 for e in entries)
    assert any(e["logger"] == "app.access" and e.get("status") == 401 for e in entries)
    assert SECRET_KEY not in text and "wrong-key-98765" not in text
    assert "PURPLE-ELEPHANT" not in text


def test_celery_keeps_the_json_logging(tmp_path):
    script = textwrap.dedent("""
        import logging, sys
        from config.logging import setup_logging
        setup_logging("worker", take_over_celery=True)
        from jobs.celery_app import celery_app
        celery_app.log.setup(loglevel="INFO", redirect_stdouts=True)
        logging.getLogger("celery.worker").info("from celery")
        print("printed", flush=True)
        sys.stderr.write("handlers=%d\\n" % len(logging.getLogger().handlers))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "LOG_LEVEL": "INFO"})
    assert out.returncode == 0, out.stderr
    assert out.stdout == "printed\n"  # Celery did not redirect stdout into its logger
    err = out.stderr.splitlines()
    assert err[-1] == "handlers=1"
    entry = json.loads(err[0])
    assert entry["message"] == "from celery" and entry["service"] == "worker"


def test_setup_logging_replaces_console_handlers_only(restore_logging, caplog):
    root = logging.getLogger()
    plain = logging.StreamHandler(io.StringIO())  # as logging.basicConfig installs
    root.addHandler(plain)
    first = setup_logging("api", stream=io.StringIO())
    second = setup_logging("worker", stream=io.StringIO())
    assert plain not in root.handlers and first not in root.handlers and second in root.handlers
    assert caplog.handler in root.handlers  # a test runner's capture handler stays


def test_a_job_id_bound_in_a_request_ends_with_it(metrics_app, log_stream):
    client = metrics_app.test_client()
    assert client.get("/things/one").status_code == 200
    assert current_job_id() is None  # the test client runs the request in this thread: unbound at teardown
    bind_job("chatcmpl-stale")  # left over from an earlier request of this greenlet / thread
    assert client.get("/things/two").status_code == 200
    assert current_job_id() is None
    assert [(e["message"], e.get("job_id")) for e in lines(log_stream, "test.view")] == [
        ("serving one", "chatcmpl-one"), ("serving two", "chatcmpl-two")]
    access = [e for e in lines(log_stream, "app.access")]
    assert [e.get("job_id") for e in access] == ["chatcmpl-one", "chatcmpl-two"]  # the access line has it too
    assert access[0]["endpoint"] == "/things/<thing_id>" and access[0]["status"] == 200


# --- metric functions and the request hooks
def test_requests_are_counted_by_url_rule_and_errors_by_code(metrics_app):
    client = metrics_app.test_client()
    labels = {"endpoint": "/things/<thing_id>", "method": "GET", "status": "200"}
    before = sample(metrics_app, "llmq_http_requests_total", labels)
    before_404 = sample(metrics_app, "llmq_http_requests_total", {**labels, "status": "404"})
    before_unmatched = sample(metrics_app, "llmq_http_requests_total",
                              {"endpoint": "unmatched", "method": "GET", "status": "404"})
    before_code = sample(metrics_app, "llmq_errors_total", {"code": "thing_not_found"})
    for thing in ("a", "b", f"c-{uuid.uuid4().hex}"):
        assert client.get(f"/things/{thing}").status_code == 200
    assert client.get("/things/bad").status_code == 404
    assert client.get(f"/nowhere/{uuid.uuid4().hex}").status_code == 404
    assert sample(metrics_app, "llmq_http_requests_total", labels) == before + 3
    assert sample(metrics_app, "llmq_http_requests_total", {**labels, "status": "404"}) == before_404 + 1
    assert sample(metrics_app, "llmq_http_requests_total",
                  {"endpoint": "unmatched", "method": "GET", "status": "404"}) == before_unmatched + 1
    assert sample(metrics_app, "llmq_errors_total", {"code": "thing_not_found"}) == before_code + 1
    text = client.get("/metrics").get_data(as_text=True)
    assert "/things/a" not in text and 'endpoint="/things/<thing_id>"' in text  # no raw paths


def test_observe_functions_fill_the_histograms_and_counters(metrics_app):
    def snapshot():
        return [sample(metrics_app, name, labels) for name, labels in [
            ("llmq_time_to_first_token_seconds_count", None), ("llmq_inter_token_latency_seconds_count", None),
            ("llmq_e2e_request_latency_seconds_count", {"stream": "true"}),
            ("llmq_e2e_request_latency_seconds_count", {"stream": "false"}),
            ("llmq_e2e_request_latency_seconds_bucket", {"stream": "true", "le": "0.5"}),
            ("llmq_prompt_tokens_total", None), ("llmq_generation_tokens_total", None),
            ("llmq_errors_total", {"code": "generation_failed"})]]

    before = snapshot()
    metrics.observe_stream(0.05, [0.01, 0.02, 0.03], 0.2, prompt_tokens=11, completion_tokens=4)
    timer = metrics.StreamTimer(start=100.0)
    timer.delta(now=100.3)
    timer.delta(now=100.35)
    timer.done(Usage(prompt_tokens=7, completion_tokens=2, total_tokens=9), now=101.0)
    timer.done(Usage(prompt_tokens=7, completion_tokens=2, total_tokens=9), now=102.0)  # once only
    finished = record(created_at=time.time() - 1, started_at=time.time() - 0.9, finished_at=time.time(),
                      result=JobResult(text="x", finish_reason="stop",
                                       usage=Usage(prompt_tokens=5, completion_tokens=3, total_tokens=8)))
    metrics.observe_completion(finished, start=time.monotonic() - 0.1)
    metrics.observe_error("generation_failed")
    after = snapshot()
    d = [a - b for a, b in zip(after, before)]
    assert d[0] == 2  # ttft: observe_stream + the timer's first delta
    assert d[1] == 4  # itl: 3 + 1
    assert d[2] == 2  # e2e stream: observe_stream + timer
    assert d[3] == 1  # e2e non-stream: observe_completion
    assert d[4] == 1  # 0.2 s <= 0.5 s, the timer's 1 s is not
    assert d[5] == 11 + 7 + 5
    assert d[6] == 4 + 2 + 3
    assert d[7] == 1


def test_label_values_are_bounded():
    assert metrics._label("generation_failed") == "generation_failed"
    assert metrics._label("x" * 200) == "other" and metrics._label("a b\n") == "other"
    assert metrics._label(None) == "other"


def test_metrics_endpoint_auth_is_configurable(settings):
    from prometheus_client.parser import text_string_to_metric_families

    open_app = Flask(__name__)
    open_app.config["SETTINGS"] = settings.model_copy(update={"api_keys": ["k-123456"]})
    metrics.setup_metrics(open_app, open_app.config["SETTINGS"])
    response = open_app.test_client().get("/metrics")
    assert response.status_code == 200 and response.content_type.startswith("text/plain")
    names = {family.name for family in text_string_to_metric_families(response.get_data(as_text=True))}
    assert {"llmq_http_requests", "llmq_queue_depth", "llmq_jobs", "llmq_workers"} <= names

    closed = Flask(__name__)
    closed.config["SETTINGS"] = settings.model_copy(update={"api_keys": ["k-123456"],
                                                            "metrics_require_auth": True})
    from app.errors import register_error_handlers
    register_error_handlers(closed)
    metrics.setup_metrics(closed, closed.config["SETTINGS"])
    assert closed.test_client().get("/metrics").status_code == 401
    assert closed.test_client().get("/metrics", headers={"Authorization": "Bearer k-123456"}).status_code == 200

    off = Flask(__name__)
    off.config["SETTINGS"] = settings.model_copy(update={"metrics_enabled": False})
    metrics.setup_metrics(off, off.config["SETTINGS"])
    assert off.test_client().get("/metrics").status_code == 404


# --- timing headers
def test_timing_headers():
    t0 = 1_700_000_000.0
    done = record(created_at=t0, started_at=t0 + 0.25, finished_at=t0 + 2.25,
                  result=JobResult(text="x", finish_reason="length",
                                   usage=Usage(prompt_tokens=3, completion_tokens=50, total_tokens=53)))
    assert metrics.timing_headers(done) == {"x-queue-time-ms": "250.0", "x-tokens-per-second": "25.00"}
    with_first = types.SimpleNamespace(**{**done.__dict__, "first_token_at": t0 + 0.75})
    assert metrics.timing_headers(with_first)["x-time-to-first-token-ms"] == "750.0"
    assert metrics.timing_headers(record(created_at=t0)) == {}  # still queued: nothing known


# --- scrape-time state from Redis
def test_queue_depth_jobs_and_worker_load_are_read_from_redis(metrics_app, settings, redis_client):
    store = metrics_app.extensions["store"]
    model = settings.served_model_name
    other_queue, other_batch = f"iq2-{uuid.uuid4().hex[:8]}", f"bq2-{uuid.uuid4().hex[:8]}"
    redis_client.rpush(settings.interactive_queue, "m1", "m2", "m3")
    redis_client.rpush(settings.batch_queue, "b1")
    redis_client.rpush(other_queue, "x1", "x2")
    assert queue_depths(redis_client, [settings.interactive_queue, settings.batch_queue]) == {
        settings.interactive_queue: 3, settings.batch_queue: 1}
    # A second model pool, as its workers advertise it in the model directory (jobs/models.py).
    redis_client.hset(store.keys.models(), "other-model", json.dumps(
        {"id": "other-model", "queue": other_queue, "batch_queue": other_batch, "last_seen": time.time()}))
    telemetry = JobTelemetry(redis_client, settings.redis_prefix, settings.job_ttl_s)
    for job, states in {"j1": ["queued"], "j2": ["queued", "in_progress"],
                        "j3": ["queued", "in_progress", "in_progress", "completed"],
                        "j4": ["queued", "cancelled"]}.items():
        for state in states:
            telemetry.job_state(job, state)
    store.heartbeat("w1", {"name": "w1", "model_id": model, **worker_load(
        {"running": 3, "waiting": 2, "kv_blocks_used": 40, "kv_blocks_total": 100, "steps": 9, "graph_steps": 7,
         "eager_steps": 2, "kv_blocks_cached": 30, "prefix_cache_queries": 1000, "prefix_cache_hits": 600})}, 10)
    store.heartbeat("w2", {"name": "w2", "model_id": model, "running": 1, "kv_blocks_used": 10,
                           "kv_blocks_total": 100, "prefix_cache_queries": 500, "prefix_cache_hits": 100}, 10)
    store.heartbeat("w3", {"name": "w3", "model_id": "other-model"}, 10)  # without the load fields
    try:
        get = lambda name, labels=None: sample(metrics_app, name, labels)  # noqa: E731
        assert get("llmq_queue_depth", {"model": model, "kind": "interactive",
                                        "queue": settings.interactive_queue}) == 3
        assert get("llmq_queue_depth", {"model": model, "kind": "batch", "queue": settings.batch_queue}) == 1
        assert get("llmq_queue_depth", {"model": "other-model", "kind": "interactive", "queue": other_queue}) == 2
        assert get("llmq_queue_depth", {"model": "other-model", "kind": "batch", "queue": other_batch}) == 0
        assert {s: get("llmq_jobs", {"state": s}) for s in ("queued", "in_progress", "completed", "failed",
                                                             "cancelled")} == {
            "queued": 1, "in_progress": 1, "completed": 1, "failed": 0, "cancelled": 1}
        assert get("llmq_job_state_transitions_total", {"state": "queued"}) == 4
        assert get("llmq_job_state_transitions_total", {"state": "in_progress"}) == 2  # j3 twice: counted once
        m, o = {"model": model}, {"model": "other-model"}
        assert get("llmq_workers", m) == 2 and get("llmq_workers", o) == 1
        assert get("llmq_running_sequences", m) == 4 and get("llmq_waiting_sequences", m) == 2
        assert get("llmq_running_sequences", o) == 0
        assert get("llmq_kv_blocks_used", m) == 50 and get("llmq_kv_blocks_capacity", m) == 200
        assert get("llmq_kv_cache_usage_ratio", m) == 0.25 and get("llmq_kv_cache_usage_ratio", o) == 0
        assert get("llmq_engine_graph_steps", m) == 7 and get("llmq_engine_eager_steps", m) == 2
        assert get("llmq_kv_blocks_cached", m) == 30
        assert get("llmq_prefix_cache_queries_total", m) == 1500 and get("llmq_prefix_cache_hits_total", m) == 700
        assert get("llmq_redis_up") == 1
    finally:
        redis_client.delete(other_queue)


def test_job_state_entries_expire_with_the_records(settings, redis_client):
    telemetry = JobTelemetry(redis_client, settings.redis_prefix, ttl_s=100)
    now = time.time()
    telemetry.job_state("old", "completed", now=now - 500)
    telemetry.job_state("new", "completed", now=now)
    current, entered = telemetry.job_counts(now=now)
    assert current["completed"] == 1 and entered["completed"] == 2
    assert redis_client.zcard(telemetry.state_key("completed")) == 1  # trimmed (at the last write, and scrape)
    assert 0 < redis_client.ttl(telemetry.state_key("completed")) <= 200
    with pytest.raises(ValueError):
        telemetry.job_state("x", "exploded")


def test_finished_jobs_leave_their_state_set_without_a_scrape(redis_client):
    """Only a scrape (job_counts) used to trim the finished states' sets: where nobody scrapes /metrics, an entry per
    finished job stayed for as long as jobs kept finishing. A job's end trims its state's set of entries older than
    the records."""
    from tests.unit.conftest import new_job

    store = JobStore(redis_client, f"unit-{uuid.uuid4().hex[:8]}", ttl_s=1)
    first = new_job(store)
    assert store.end(first, Ending.cancelled()).applied
    time.sleep(1.2)  # its record is gone by now
    second = new_job(store)
    assert store.end(second, Ending.cancelled()).applied
    members = redis_client.zrange(store.telemetry.state_key("cancelled"), 0, -1)
    assert [m.decode() if isinstance(m, bytes) else m for m in members] == [second]


def test_telemetry_writes_never_fail_a_job(settings, redis_client):
    telemetry = JobTelemetry(redis_client, settings.redis_prefix, settings.job_ttl_s)
    with redis_client.pipeline() as pipe:  # in a caller's pipeline: sent with it
        telemetry.job_state("c", "queued", pipe=pipe)
        pipe.execute()
    assert redis_client.zscore(telemetry.state_key("queued"), "c") is not None
    down = JobTelemetry(redis.Redis(port=1, socket_connect_timeout=0.2), settings.redis_prefix, 60)
    down.job_state("d", "in_progress")  # Redis away: logged, not raised


def test_aggregate_workers_tolerates_missing_and_bad_fields():
    assert aggregate_workers([{"running": 2}, {"running": "x", "waiting": None}, {}]) == {
        "running": 2, "waiting": 0, "kv_blocks_used": 0, "kv_blocks_total": 0, "graph_steps": 0, "eager_steps": 0,
        "kv_blocks_cached": 0, "prefix_cache_queries": 0, "prefix_cache_hits": 0, "workers": 3}
    by_model = aggregate_workers_by_model([{"model_id": "a", "running": 1}, {"model_id": "a", "running": 2},
                                           {"model": "old-style"}])
    assert by_model["a"]["running"] == 3 and by_model["a"]["workers"] == 2 and by_model["old-style"]["workers"] == 1


def test_redis_down_still_answers(settings):
    app = Flask(__name__)
    dead = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    app.config["SETTINGS"] = dead
    store = JobStore(redis.Redis.from_url(dead.redis_url, socket_connect_timeout=0.5), dead.redis_prefix, 60)
    metrics.setup_metrics(app, dead, store)
    response = app.test_client().get("/metrics")
    assert response.status_code == 200
    assert "llmq_redis_up 0.0" in response.get_data(as_text=True)
    assert "llmq_http_requests_total" in response.get_data(as_text=True)


# --- several processes (prometheus_client's multiprocess mode) and config/gunicorn.py
CHILD = textwrap.dedent("""
    import sys
    from app import metrics
    metrics.init_metrics()
    for _ in range(int(sys.argv[1])):
        metrics.observe_request("/v1/chat/completions", 200, "POST")
    metrics.observe_stream(0.1, [0.01, 0.02], 0.5, prompt_tokens=10, completion_tokens=3)
""")
SCRAPER = textwrap.dedent("""
    from flask import Flask
    from app import metrics
    from config.settings import Settings
    app = Flask(__name__)
    settings = Settings()
    app.config["SETTINGS"] = settings
    metrics.setup_metrics(app, settings)
    print(app.test_client().get("/metrics").get_data(as_text=True))
""")


def _run(script: str, *args: str, env: dict) -> str:
    out = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_counts_of_several_processes_are_summed(tmp_path):
    """Processes that share a PROMETHEUS_MULTIPROC_DIR (set before they import prometheus_client), as
    config/gunicorn.py sets it for a server's workers: /metrics of any of them sums all their counts."""
    from prometheus_client.parser import text_string_to_metric_families

    shared = tmp_path / "shared"
    shared.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(shared), "REDIS_URL": REDIS_URL}
    for n in (3, 5):
        _run(CHILD, str(n), env=env)
    assert len(list(shared.glob("counter_*.db"))) == 2  # one file per process
    text = _run(SCRAPER, env=env)  # a third process, which counted nothing itself
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for family in text_string_to_metric_families(text) for s in family.samples}
    assert got[("llmq_http_requests_total",
                (("endpoint", "/v1/chat/completions"), ("method", "POST"), ("status", "200")))] == 8
    assert got[("llmq_time_to_first_token_seconds_count", ())] == 2
    assert got[("llmq_inter_token_latency_seconds_count", ())] == 4
    assert got[("llmq_e2e_request_latency_seconds_count", (("stream", "true"),))] == 2
    assert got[("llmq_prompt_tokens_total", ())] == 20 and got[("llmq_generation_tokens_total", ())] == 6
    assert got[("llmq_redis_up", ())] == 1  # the Redis collector sits in the same registry


@pytest.fixture
def gunicorn_conf(monkeypatch, tmp_path):
    """config/gunicorn.py loaded as gunicorn loads it (a file, not a package module), with METRICS_DIR in
    tmp_path; whatever its hooks set in os.environ is undone after the test."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gunicorn_conf", ROOT / "config" / "gunicorn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("METRICS_DIR", str(tmp_path / "prometheus"))
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "inherited"))  # replaced by on_starting
    return module


def _server(pid: int):
    return types.SimpleNamespace(pid=pid, log=logging.getLogger("test.gunicorn"))


def test_each_gunicorn_master_gets_a_fresh_directory_of_its_own(gunicorn_conf, tmp_path):
    base = tmp_path / "prometheus"
    stale = base / "gunicorn-101"  # left by a dead master whose pid the new one has
    stale.mkdir(parents=True)
    (stale / "counter_7.db").write_bytes(b"old")
    gunicorn_conf.on_starting(_server(101))
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(stale) and list(stale.iterdir()) == []  # wiped
    (stale / "counter_8.db").write_bytes(b"first server's")
    gunicorn_conf.on_starting(_server(202))  # a second server at the same time
    second = base / "gunicorn-202"
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(second) and second.is_dir()
    gunicorn_conf.on_exit(_server(202))  # the second stops: its directory goes, the first's stays
    assert not second.exists() and (stale / "counter_8.db").read_bytes() == b"first server's"


def test_child_exit_marks_the_dead_worker(gunicorn_conf, monkeypatch, tmp_path):
    """The API has no live gauges (checked here, as config/gunicorn.py says), so nothing of its own is removed;
    child_exit still calls mark_process_dead with the worker's pid, which drops that pid's live-gauge files."""
    from prometheus_client import Gauge, multiprocess

    assert not any(isinstance(m, Gauge) for m in vars(metrics.init_metrics()).values())
    gunicorn_conf.on_starting(_server(303))
    directory = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    for name in ("gauge_livesum_41.db", "gauge_liveall_41.db", "counter_41.db", "gauge_livesum_42.db"):
        (directory / name).write_bytes(b"")
    calls = []
    real = multiprocess.mark_process_dead
    monkeypatch.setattr(multiprocess, "mark_process_dead", lambda pid, path=None: (calls.append(pid),
                                                                                    real(pid, path)))
    gunicorn_conf.child_exit(_server(303), types.SimpleNamespace(pid=41))
    assert calls == [41]
    assert sorted(f.name for f in directory.iterdir()) == ["counter_41.db", "gauge_livesum_42.db"]
