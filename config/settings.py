"""One typed settings object, read from the environment (and an optional `.env` file).

Every process (API, worker, tests, benchmark) calls `get_settings()`; nothing else reads os.environ
for configuration. Each field's default is the documented default; the env var is the field name in
upper case (`REDIS_URL`, `API_KEYS`, `MODEL_SOURCE`...).
"""
from __future__ import annotations

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
    # Most prompt tokens prefilled in one step: long prompts are chunked so running streams keep flowing.
    prefill_chunk_tokens: int = 512
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
    # Worker heartbeat period and how long a heartbeat counts as alive.
    heartbeat_interval_s: float = 2.0
    heartbeat_ttl_s: float = 10.0

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value):
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value


    @property
    def effective_batch_slots(self) -> int:
        return self.batch_slots or max(1, self.max_num_seqs // 4)


@lru_cache
def get_settings() -> Settings:
    return Settings()
