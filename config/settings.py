"""One typed settings object, read from the environment (and an optional `.env` file).

Every process (API, worker, tests, benchmark) calls `get_settings()`; nothing else reads os.environ
for configuration. Each field's default is the documented default; the env var is the field name in
upper case (`REDIS_URL`, `API_KEYS`, `MODEL_SOURCE`...).
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic import field_validator

# The id the provider docs use for the model, and the Hugging Face repository it comes from.
SERVED_MODEL_ID = "mistralai/mistral-7b-instruct-v0.2"
HF_MODEL_ID = "mistralai/Mistral-7B-Instruct-v0.2"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    # --- Redis: broker, job store and pub/sub all live in one Redis.
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Job state over several Redis nodes (jobs/shards.py): comma-separated Redis URLs, each job on the one its
    # id picks. Empty: every job on REDIS_URL's. REDIS_URL stays the broker's and the directories' node.
    # Append only to a drained deployment; never reorder.
    redis_shards: str = ""
    # Prefix of every key and pub/sub channel we own (pub/sub ignores the db number, so prefix it).
    redis_prefix: str = "llmq"

    # --- HTTP API
    port: int = 8000
    # Comma-separated Bearer keys; empty means auth is off.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Seconds between SSE keep-alive comments; a write is how WSGI notices a gone client.
    sse_keepalive_s: float = 5.0
    # How long a non-stream request waits for its job before answering 504.
    request_timeout_s: float = 600.0
    # Largest request body accepted (bytes).
    max_body_bytes: int = 4 * 1024 * 1024

    # --- Model
    # "auto": the real model in 4 bits where CUDA and weights are there, else the tiny model.
    # "hf": always the real model (fail if it cannot load). "tiny-random": always the tiny model.
    model_source: Literal["auto", "hf", "tiny-random"] = "auto"
    # Hugging Face id or local directory of the real weights.
    model_path: str = HF_MODEL_ID
    # Context window the service enforces (prompt + max_tokens). Mistral-7B-Instruct-v0.2: 32k.
    max_model_len: int = 32768

    # --- Worker pools: the model this worker serves, under which id (and aliases), from which queues. The
    # API reads them too: its deployment's model is known (its requests wait) before any worker is up.
    served_model_name: str = SERVED_MODEL_ID
    served_model_aliases: Annotated[list[str], NoDecode] = Field(default_factory=lambda: [HF_MODEL_ID])
    # Another pool's model whose workers were last seen this long ago is forgotten (404); until then its jobs
    # wait. The model these settings name is never forgotten.
    model_remember_s: float = 600.0

    # --- Worker / queue
    # Number of worker processes `make run` starts.
    workers: int = 1
    # Celery queue of interactive chat completions.
    interactive_queue: str = "interactive"
    # Jobs a worker process holds at once (Celery threads feeding its one engine); 0 = max_num_seqs.
    worker_concurrency: int = 0

    # --- Engine (continuous batching, paged KV cache)
    # Most sequences decoded together in one step.
    max_num_seqs: int = 64
    # Tokens per KV-cache block.
    kv_block_size: int = 16
    # KV cache size: a number of tokens if set, else this fraction of free GPU memory after the weights
    # (on CPU, kv_cpu_tokens).
    kv_cache_tokens: int = 0
    kv_memory_fraction: float = 0.85
    kv_cpu_tokens: int = 65536
    # CPU threads torch uses in a worker (0 = torch's default: one per core). On a CPU-only machine that
    # also runs the API and Redis, fewer threads than cores avoids oversubscription (OpenMP spin-waits).
    torch_threads: int = 0
    # A worker writes its jobs' new text to Redis at most this often: with many streams, each event then
    # carries a few tokens, which every later hop (Redis, API, client) handles once (vLLM: stream_interval).
    stream_interval_s: float = 0.02
    # ... and under load, less often: a worker sends at most this many stream events per second, all its
    # streams together, so each event carries more tokens. The relay's cost (Redis, the API process, the
    # client) is per event, not per token: without this, many streams at one token per event can starve
    # the engine of the CPU the relay shares with it. 0 = no limit; -1 = auto: 250 per CPU core the worker
    # may run on (500 on a 2-core machine, 4000 on a 16-core GPU host), as the relay's cost is CPU time.
    stream_events_per_s: float = Field(default=-1.0, ge=-1.0)
    # Most prompt tokens prefilled in one step: long prompts are chunked so running streams keep flowing.
    prefill_chunk_tokens: int = 512
    # Reuse the KV blocks of prompt prefixes that were computed before (a batch's shared system prompt, a chat's
    # history): only the rest of a prompt is prefilled (workers/engine/block_manager.py).
    prefix_caching: bool = True
    # Decode attention: "auto" (the Triton paged kernel on CUDA, if it passes its start-up check; SDPA on the CPU),
    # "triton" or "sdpa" (workers/engine/config.py).
    decode_attention: Literal["auto", "triton", "sdpa"] = "auto"
    # Queue of batch line jobs, and how many of them one worker process runs at once: batch work never
    # takes more than these slots of a worker, the rest stay free for interactive requests (0 = a quarter
    # of max_num_seqs, at least 1).
    batch_queue: str = "batch"
    batch_slots: int = 0
    # Line jobs of one batch in flight at once (the rest wait in its input file): bounds memory and queue.
    batch_window: int = 64
    # How often API processes drive batches, and how long one's lease on a batch lasts without renewal.
    batch_tick_s: float = 0.25
    batch_lease_s: float = 15.0
    # Largest uploaded file (bytes).
    max_file_bytes: int = 200 * 1024 * 1024
    # Redis broker redelivers an unacked task after this many seconds: keep it above the longest job.
    visibility_timeout_s: int = 4 * 3600
    # How long job records, their results and events live in Redis.
    job_ttl_s: int = 24 * 3600
    # A running job's lease: renewed while it runs; when its worker dies, the lease lapses and a reaper (in
    # every worker, each `reaper_interval_s`) puts the job back on its queue. A crashed job is picked up
    # again within about job_lease_s + reaper_interval_s.
    job_lease_s: float = 10.0
    reaper_interval_s: float = 2.0
    # A job still queued this long after it was sent, while its queue is empty, lost its message (a worker
    # took it and died before starting it): the reaper sends it again.
    lost_delivery_s: float = 30.0
    # A worker whose engine made no step for this long while it had work (a hung kernel, a stopped process)
    # stops renewing its jobs' leases and exits, so its jobs resume on another worker (its supervisor starts
    # a fresh one). A step takes milliseconds; loading and warm-up happen before any work arrives.
    engine_stall_s: float = 120.0
    # A job started this many times without finishing (each attempt's worker died) fails.
    max_attempts: int = 5
    # A job not finished this long after it was created ends with a `deadline_exceeded` error.
    job_deadline_s: float = 3600.0
    # How long a worker keeps retrying Redis (buffering its job's output) before giving the attempt up.
    redis_retry_s: float = 120.0
    # Overload: beyond this many jobs waiting in the interactive queue, or this many unfinished jobs of one
    # key, new requests get 429 with Retry-After.
    max_queued_jobs: int = 2000
    max_unfinished_per_key: int = 500
    # Fair dispatch (jobs/fair_queue.py): interactive and background jobs wait in per-key queues, and leave
    # them round-robin across keys into their pool's Celery queue, which holds at most this many messages
    # beyond what the pool's workers have taken (each takes only what it runs). Small: a key arriving behind a
    # flood waits for about this many jobs, plus one of each other waiting key. Workers refill it whenever
    # they take a message or end a job, and every fair_dispatch_tick_s in any case.
    fair_dispatch_margin: int = Field(default=2, ge=1)
    fair_dispatch_tick_s: float = 0.5
    # ... and while other keys have used the pool within fair_dispatch_active_s (parked a job there), one key's
    # jobs in flight (in that queue or running) leave this many of the pool's live slots to them: their next
    # job starts at once, not when one of the flood's jobs ends. A key alone on a pool uses every slot.
    fair_dispatch_reserve: int = Field(default=1, ge=0)
    fair_dispatch_active_s: float = 60.0
    # Worker heartbeat period and how long a heartbeat counts as alive.
    heartbeat_interval_s: float = 2.0
    heartbeat_ttl_s: float = 10.0

    @field_validator("api_keys", "served_model_aliases", mode="before")
    @classmethod
    def _split_keys(cls, value):
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @property
    def effective_stream_events_per_s(self) -> float:
        if self.stream_events_per_s >= 0:
            return self.stream_events_per_s
        return 250.0 * len(os.sched_getaffinity(0))

    @property
    def effective_batch_slots(self) -> int:
        return self.batch_slots or max(1, self.max_num_seqs // 4)

    # --- Metrics and logs (app/metrics.py, config/logging.py)
    # GET /metrics (Prometheus) on the API. Off: no route, and the metric functions do nothing.
    metrics_enabled: bool = True
    # Where gunicorn worker processes keep their metric files (prometheus_client multiprocess mode):
    # config/gunicorn.py gives each gunicorn master its own subdirectory, gunicorn-{pid}, created empty,
    # and sets PROMETHEUS_MULTIPROC_DIR to it (an inherited value is replaced).
    metrics_dir: str = ".run/prometheus"
    # Require a Bearer key (one of API_KEYS, when set) on GET /metrics. Off by default, like /health.
    metrics_require_auth: bool = False
    # Root log level of the JSON logs.
    log_level: str = "INFO"


@lru_cache
def get_settings() -> Settings:
    return Settings()
