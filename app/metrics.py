"""Prometheus metrics of the API: `GET /metrics`, the functions the request path calls, and timing headers.

Several gunicorn worker processes (`make run` starts 2) serve the API, and a scrape reaches only one of
them, so what each process counts must be summed over all of them. Two kinds of metric:

* Counted by the API processes (requests, errors, latencies, tokens): prometheus_client's multiprocess mode,
  set up as its documentation says (https://prometheus.github.io/client_python/multiprocess/). gunicorn
  loads config/gunicorn.py, which sets PROMETHEUS_MULTIPROC_DIR for the whole server (a fresh directory per
  gunicorn master, under METRICS_DIR) before any worker imports prometheus_client, and marks each worker
  that exits dead (`child_exit`). Each process writes its counters and histograms to its own memory-mapped
  files there, and `/metrics` sums every file with a `MultiProcessCollector` in a registry of its own. Only
  counters and histograms live in these files, no live gauges. Without PROMETHEUS_MULTIPROC_DIR (the Flask
  test client, a gunicorn started without that config file) the metrics are this process's own, in the
  same registry.
* State that lives elsewhere (queue depths, jobs parked per API key, jobs by state, worker load): read from
  Redis at scrape time by a custom collector: O(1)/O(log n) commands, pipelined (four round trips, and two
  per model pool for the parked jobs, whatever the load). Every API process gives the same answer. Parked
  jobs are labelled by the key's fingerprint (app/auth.py's `owner_of`), never by the key.

`/metrics` needs no API key by default, like `/health` and `/ready` (it shows counts, never content or
keys); set METRICS_REQUIRE_AUTH=true to require one of API_KEYS. METRICS_ENABLED=false removes the route and
makes every function here a no-op.

Wiring (see each function's docstring): `setup_metrics(app, settings, jobs)` in create_app counts every
request and error response; serving calls `StreamTimer` (streams) and `observe_completion` (non-stream) for
latencies and tokens, `observe_error` for errors sent inside a stream, and `timing_headers` for headers.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import Iterable, Optional

from flask import Blueprint, Flask, Response, current_app, g, has_request_context, request

from config.logging import unbind_job
from jobs.telemetry import (JOB_STATES, JobTelemetry, aggregate_workers_by_model, model_directory,
                            queue_depths)

log = logging.getLogger(__name__)
access_log = logging.getLogger("app.access")

metrics_bp = Blueprint("metrics", __name__)

# Seconds, 1 ms to 60 s.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 30.0, 60.0)
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
_LABEL_OK = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_QUIET_RULES = frozenset({"/metrics", "/health", "/ready"})  # probes: their access lines go at DEBUG


# --- process-wide state: the metric objects exist once per process (init_metrics)
class _Metrics:
    def __init__(self):
        from prometheus_client import Counter, Histogram

        self.requests = Counter("llmq_http_requests", "HTTP requests by route (URL rule), method and status.",
                                ["endpoint", "method", "status"], registry=None)
        self.errors = Counter("llmq_errors", "Errors sent to clients, by error code: error responses and "
                                             "error events inside streams.", ["code"], registry=None)
        self.ttft = Histogram("llmq_time_to_first_token_seconds", "Time from the request's arrival to its "
                              "first content token.", buckets=LATENCY_BUCKETS, registry=None)
        self.itl = Histogram("llmq_inter_token_latency_seconds", "Time between consecutive content deltas "
                             "of a stream, as relayed by the API.", buckets=LATENCY_BUCKETS, registry=None)
        self.e2e = Histogram("llmq_e2e_request_latency_seconds", "Time from a chat completion's arrival to "
                             "its last byte (completed requests).", ["stream"], buckets=LATENCY_BUCKETS,
                             registry=None)
        for stream in ("true", "false"):  # both series exist (at 0) from the start
            self.e2e.labels(stream)
        self.prompt_tokens = Counter("llmq_prompt_tokens", "Prompt tokens of completed chat completions.",
                                     registry=None)
        self.completion_tokens = Counter("llmq_generation_tokens", "Tokens generated for completed chat "
                                         "completions.", registry=None)


_lock = threading.Lock()
_metrics: Optional[_Metrics] = None


def init_metrics() -> _Metrics:
    """The metric objects of this process, created at the first call. When PROMETHEUS_MULTIPROC_DIR was set
    before prometheus_client was imported (config/gunicorn.py), they write to files there."""
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = _Metrics()
        return _metrics


# --- the functions the request path calls (all no-ops until setup_metrics ran, or when metrics are off)
def _label(value, default: str = "other") -> str:
    value = str(value) if value is not None else ""
    return value if _LABEL_OK.match(value) else default


def observe_request(endpoint: str, status: int, method: str = "GET") -> None:
    """Count one HTTP request. The after_request hook calls it for every request: do not call it again."""
    if _metrics is not None:
        _metrics.requests.labels(endpoint, method if method in _METHODS else "other", str(int(status))).inc()


def observe_error(code: Optional[str]) -> None:
    """Count one error sent to a client. The after_request hook calls it for every error response (status
    >= 400, the code read from its OpenAI-shaped body); call it yourself only for an error that is not an
    error response: the `data: {"error": ...}` event of a stream (the code of that error, `job_cancelled`
    for a cancellation)."""
    if _metrics is not None:
        _metrics.errors.labels(_label(code)).inc()


def observe_ttft(seconds: float) -> None:
    if _metrics is not None and seconds is not None:
        _metrics.ttft.observe(max(0.0, seconds))


def observe_itl(seconds: Iterable[float]) -> None:
    if _metrics is not None:
        for gap in seconds:
            _metrics.itl.observe(max(0.0, gap))


def observe_tokens(prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
    if _metrics is not None:
        if prompt_tokens:
            _metrics.prompt_tokens.inc(prompt_tokens)
        if completion_tokens:
            _metrics.completion_tokens.inc(completion_tokens)


def observe_stream(ttft_s: Optional[float], itl_list_s: Iterable[float], e2e_s: Optional[float],
                   prompt_tokens: int = 0, completion_tokens: int = 0, stream: bool = True) -> None:
    """Record one finished chat completion at once: TTFT (None: unknown), the gaps between its deltas,
    end-to-end latency, and its tokens. `StreamTimer` calls the same pieces as a stream goes along."""
    if _metrics is None:
        return
    if ttft_s is not None:
        observe_ttft(ttft_s)
    observe_itl(itl_list_s or ())
    if e2e_s is not None:
        _metrics.e2e.labels("true" if stream else "false").observe(max(0.0, e2e_s))
    observe_tokens(prompt_tokens, completion_tokens)


def request_start() -> float:
    """time.monotonic() when the current request arrived (set by the before_request hook); now outside one."""
    if has_request_context():
        return g.get("llmq_request_start") or time.monotonic()
    return time.monotonic()


class StreamTimer:
    """Latencies of one streamed completion, as the API relays it:

        timer = StreamTimer()          # in the view (the request's arrival time is taken from the hook)
        timer.delta()                  # each content delta sent (TTFT at the first, ITL after)
        timer.done(event.usage)        # the `done` event: end-to-end latency and tokens
    """

    def __init__(self, start: Optional[float] = None):
        self.start = request_start() if start is None else start
        self.last: Optional[float] = None
        self.finished = False

    def delta(self, now: Optional[float] = None) -> None:
        now = time.monotonic() if now is None else now
        if self.last is None:
            observe_ttft(now - self.start)
        else:
            observe_itl((now - self.last,))
        self.last = now

    def done(self, usage=None, now: Optional[float] = None) -> None:
        if self.finished:
            return
        self.finished = True
        now = time.monotonic() if now is None else now
        prompt = getattr(usage, "prompt_tokens", 0) if usage is not None else 0
        completion = getattr(usage, "completion_tokens", 0) if usage is not None else 0
        observe_stream(None, (), now - self.start, prompt, completion, stream=True)


def observe_completion(record, start: Optional[float] = None) -> None:
    """A finished non-stream completion, from its final job record: end-to-end latency (from the request's
    arrival), TTFT when the worker stamped `first_token_at`, and tokens."""
    if _metrics is None:
        return
    start = request_start() if start is None else start
    first = getattr(record, "first_token_at", None)
    ttft = first - record.created_at if first and record.created_at else None
    usage = record.result.usage if getattr(record, "result", None) is not None else None
    observe_stream(ttft, (), time.monotonic() - start, usage.prompt_tokens if usage else 0,
                   usage.completion_tokens if usage else 0, stream=False)


# --- timing headers
def timing_headers(record) -> dict[str, str]:
    """Headers from a job record: `x-queue-time-ms` (started_at - created_at), `x-time-to-first-token-ms`
    (first_token_at - created_at, when the worker stamped it) and, for a finished job with a result,
    `x-tokens-per-second` (completion tokens / (finished_at - started_at): the job's generation rate on its
    worker, prefill included). Only what is known is included. A stream's headers leave before any of it is
    known, so this is for non-stream responses (and job objects)."""
    headers: dict[str, str] = {}
    created, started = getattr(record, "created_at", None), getattr(record, "started_at", None)
    first, finished = getattr(record, "first_token_at", None), getattr(record, "finished_at", None)
    if created and started:
        headers["x-queue-time-ms"] = f"{max(0.0, started - created) * 1000:.1f}"
    if created and first:
        headers["x-time-to-first-token-ms"] = f"{max(0.0, first - created) * 1000:.1f}"
    result = getattr(record, "result", None)
    if result is not None and started and finished and finished > started:
        headers["x-tokens-per-second"] = f"{result.usage.completion_tokens / (finished - started):.2f}"
    return headers


# --- scrape-time state from Redis
class RedisStateCollector:
    """Queue depths, jobs by state and worker load, read from Redis when /metrics is scraped."""

    def __init__(self, settings, store):
        self.settings = settings
        self.store = store

    def queues(self) -> dict[str, tuple[str, str]]:
        """queue name -> (model, kind) for every queue to report: the queues of each model pool in the model
        directory (seen within MODEL_REMEMBER_S), and this process's configured ones."""
        s = self.settings
        model = getattr(s, "served_model_name", "")
        queues = {s.interactive_queue: (model, "interactive"), s.batch_queue: (model, "batch")}
        models_key = getattr(self.store.keys, "models", None)
        if models_key is not None:
            remember_s = getattr(s, "model_remember_s", float("inf"))
            for model_id, entry in model_directory(self.store.redis, models_key()).items():
                if time.time() - float(entry.get("last_seen", 0) or 0) > remember_s:
                    continue
                for kind, field in (("interactive", "queue"), ("batch", "batch_queue")):
                    if entry.get(field):
                        queues[entry[field]] = (model_id, kind)
        return queues

    def parked_jobs(self, queues: dict[str, tuple[str, str]]):
        """Jobs waiting in each API key's fair queue of each model pool (jobs/fair_queue.py), by fingerprint:
        only the keys with parked jobs have a series."""
        from prometheus_client.core import GaugeMetricFamily

        parked = GaugeMetricFamily("llmq_parked_jobs", "Jobs waiting in their API key's queue of a model pool, "
                                   "not yet sent to its Celery queue (fair dispatch), by the key's fingerprint "
                                   "(owner: never the key itself).", labels=["model", "queue", "owner"])
        for name, (model, kind) in sorted(queues.items()):
            if kind == "interactive":
                for owner, count in sorted(self.store.fair.parked_by_owner(name).items()):
                    parked.add_metric([model, name, owner], count)
        return parked

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        up = 1
        try:
            queues = self.queues()
            depths = queue_depths(self.store.redis, queues)
            depth = GaugeMetricFamily("llmq_queue_depth", "Jobs waiting in each queue (its Redis list length), "
                                      "by model pool and kind (interactive: Celery's; batch: kombu's).",
                                      labels=["model", "kind", "queue"])
            for name, (model, kind) in sorted(queues.items()):
                depth.add_metric([model, kind, name], depths.get(name, 0))
            yield depth
            yield self.parked_jobs(queues)

            current, entered = self.store.job_counts()
            jobs = GaugeMetricFamily("llmq_jobs", "Jobs in each state now (terminal states: those whose "
                                     "records have not expired, i.e. finished within JOB_TTL_S).",
                                     labels=["state"])
            transitions = CounterMetricFamily("llmq_job_state_transitions", "Jobs that entered each state.",
                                              labels=["state"])
            for state in JOB_STATES:
                jobs.add_metric([state], current[state])
                transitions.add_metric([state], entered[state])
            yield jobs
            yield transitions

            by_model = aggregate_workers_by_model(self.store.live_workers())
            families = {key: GaugeMetricFamily(name, help_text, labels=["model"]) for key, name, help_text in (
                ("workers", "llmq_workers", "Live model workers (fresh heartbeats), per served model."),
                ("running", "llmq_running_sequences", "Sequences being decoded, over a model's workers."),
                ("waiting", "llmq_waiting_sequences", "Sequences waiting in the engines, over a model's workers."),
                ("kv_blocks_used", "llmq_kv_blocks_used", "KV-cache blocks in use, over a model's workers."),
                ("kv_blocks_total", "llmq_kv_blocks_capacity", "KV-cache blocks, over a model's workers."),
                ("graph_steps", "llmq_engine_graph_steps", "Engine steps replayed from CUDA graphs (whole or "
                                                           "piecewise), over a model's live workers since each "
                                                           "started."),
                ("eager_steps", "llmq_engine_eager_steps", "Engine steps run eagerly (on the CPU, or no graph bucket "
                                                           "fits), over a model's live workers since each "
                                                           "started."),
                ("kv_blocks_cached", "llmq_kv_blocks_cached", "KV-cache blocks in the prefix cache (held by a "
                                                              "sequence or kept for reuse), over a model's workers."))}
            # Counters in tokens, as vLLM's: hits / queries is the prefix cache's hit rate. Summed over the live
            # workers since each started, so a worker that goes away takes its counts along (a counter reset).
            prefix = {key: CounterMetricFamily(name, help_text, labels=["model"]) for key, name, help_text in (
                ("prefix_cache_queries", "llmq_prefix_cache_queries", "Prompt tokens looked up in the prefix cache "
                                                                      "on admission, over a model's live workers."),
                ("prefix_cache_hits", "llmq_prefix_cache_hits", "Prompt tokens found in the prefix cache (not "
                                                                "prefilled), over a model's live workers."))}
            ratio = GaugeMetricFamily("llmq_kv_cache_usage_ratio", "Used / total KV-cache blocks over a model's "
                                      "workers (0 to 1).", labels=["model"])
            for model, load in sorted(by_model.items()):
                for key, family in (*families.items(), *prefix.items()):
                    family.add_metric([model], load[key])
                total_blocks = load["kv_blocks_total"]
                ratio.add_metric([model], load["kv_blocks_used"] / total_blocks if total_blocks else 0.0)
            yield from families.values()
            yield from prefix.values()
            yield ratio
        except Exception as exc:  # Redis away: the scrape still answers, with the process-local metrics
            log.warning("metrics: reading Redis failed: %s", type(exc).__name__)
            up = 0
        yield GaugeMetricFamily("llmq_redis_up", "1 when the last scrape could read Redis.", value=up)


# --- Flask: the route and the hooks
@metrics_bp.get("/metrics")
def metrics_endpoint():
    from prometheus_client.exposition import choose_encoder

    settings = current_app.config["SETTINGS"]
    if settings.metrics_require_auth:
        from app.auth import check_bearer
        check_bearer(settings.api_keys)
    # The classic text format (0.0.4) unless the scraper asks for OpenMetrics or a newer text version.
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encoder(current_app.extensions["metrics_registry"]), status=200, content_type=content_type)


def setup_metrics(app: Flask, settings=None, store=None) -> None:
    """Call once in create_app, after the JobStore exists. Registers the request hooks (request start time;
    no job id bound in the logging context before a request nor after it; counting every request and error
    response; one access log line) and, when METRICS_ENABLED, the metric objects and the `/metrics` route.
    Its registry sums every process's files when PROMETHEUS_MULTIPROC_DIR is set; otherwise it holds this
    process's metric objects."""
    settings = settings or app.config["SETTINGS"]
    app.before_request(_before_request)
    app.teardown_request(_teardown_request)
    if not settings.metrics_enabled:
        app.after_request(_access_log)
        return
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    if store is None:
        from jobs.shards import ShardedJobStore
        store = ShardedJobStore.from_settings(settings)
    own = init_metrics()
    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)  # every process's files (this one's included), summed
    else:  # one process alone: its metric objects themselves
        for metric in vars(own).values():
            registry.register(metric)
    registry.register(RedisStateCollector(settings, store))
    app.extensions["metrics_registry"] = registry
    app.register_blueprint(metrics_bp)
    app.after_request(_count_request)
    app.after_request(_access_log)


def _before_request() -> None:
    g.llmq_request_start = time.monotonic()
    # A gevent worker serves a keep-alive connection's requests one after another in one greenlet: a job
    # id bound by the previous request must not tag this one's log lines.
    unbind_job()


def _teardown_request(_exc=None) -> None:
    # The request is over (a stream: its last chunk is sent): its job id must not tag later lines of this
    # thread or greenlet.
    unbind_job()


def _endpoint() -> str:
    rule = request.url_rule
    return rule.rule if rule is not None else "unmatched"  # the rule, never the raw path: bounded labels


def _error_code(response) -> str:
    code = None
    if response.is_json and not response.is_streamed:
        body = response.get_json(silent=True)
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            code = body["error"].get("code") or body["error"].get("type")
    return _label(code, default=f"http_{response.status_code}")


def _count_request(response):
    try:
        observe_request(_endpoint(), response.status_code, request.method)
        if response.status_code >= 400:
            observe_error(_error_code(response))
    except Exception:
        log.debug("metrics: counting a request failed", exc_info=True)
    return response


def _access_log(response):
    try:
        endpoint = _endpoint()
        level = logging.DEBUG if endpoint in _QUIET_RULES else logging.INFO
        if access_log.isEnabledFor(level):
            started = g.get("llmq_request_start")
            access_log.log(level, "%s %s %s", request.method, endpoint, response.status_code, extra={
                "method": request.method, "endpoint": endpoint, "path": request.path,
                "status": response.status_code,
                "duration_ms": round((time.monotonic() - started) * 1000, 1) if started else None})
    except Exception:
        pass
    return response
