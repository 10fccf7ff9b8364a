"""The job record, its Redis keys and its event format: the contract between the API and the workers.

Both sides import this module; it depends on neither Flask nor torch. The record in Redis is the source
of truth for a job (not Celery's result backend): the Celery message carries only the job id, and a
worker reads the request from here.

Redis layout (every name starts with the configured prefix, since pub/sub ignores the db number). With
several shards (REDIS_SHARDS, jobs/shards.py) a job's keys, and the indexes its transitions keep (leases,
queued, fair queues, the owner's indexes, metrics), are on the shard its id picks; workers, models and the
owners' file and batch lists on REDIS_URL's node; a file or batch on the shard its id picks:
  {prefix}:job:{id}          hash   the job record (fields below), expires `job_ttl_s` after creation
  {prefix}:job:{id}:cancel   string set when the client asked to cancel (or went away)
  {prefix}:job:{id}:lease    string the running attempt's token; renewed while it runs, fences stale attempts
  {prefix}:leases            zset   running jobs by lease expiry (ms): the reaper requeues expired ones
  {prefix}:queued            zset   jobs sent to a queue and not yet started, by send time: the reaper
                                    re-sends one whose message was lost (taken by a worker that then died)
  {prefix}:fair:{queue}:...  interactive and background jobs not sent yet, parked in their key's queue of
                                    their pool until fair dispatch sends them (layout: jobs/fair_queue.py)
  {prefix}:owner:{owner}:unfinished zset an API key's queued and running jobs (for its cap)
  {prefix}:job:{id}:log      stream every event of the job, entry id `0-{seq+1}`: replayable, resumable
  {prefix}:events:{id}       pub/sub channel of the job's events, in `seq` order: the live relay
  {prefix}:owner:{owner}:jobs zset  an API key's background jobs by creation time (for listing)
  {prefix}:worker:{name}     string a live worker's heartbeat (JSON), expires unless renewed
  {prefix}:workers           zset   worker name -> when its heartbeat expires (who to read, without a SCAN)
  {prefix}:models            hash   model id -> its queues and when a worker last served it (jobs/models.py)
  {prefix}:file:{id}         hash   a file's metadata; {prefix}:file:{id}:lines  list  its lines
  {prefix}:owner:{owner}:files zset an API key's files by creation time
  {prefix}:batch:{id}        hash   a batch (OpenAI's fields, request counts, the cursor into its input)
  {prefix}:batch:{id}:inflight set  ids of its line jobs not yet collected into the output
  {prefix}:batch:{id}:custom_ids set the custom_ids seen (they must be unique)
  {prefix}:batch:{id}:lease  string which API process drives the batch now
  {prefix}:owner:{owner}:batches zset an API key's batches;  {prefix}:batches:active  set  batches to drive
"""
from __future__ import annotations

import enum
import json
import time
import uuid
from typing import Any, Literal, Optional

from pydantic import BaseModel, Field


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


class GenerationRequest(BaseModel):
    """What a worker needs to run a job: token ids, not text (the API tokenized and validated)."""

    model: str
    prompt_token_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    frequency_penalty: float
    presence_penalty: float
    seed: int
    stop: list[str] = Field(default_factory=list)
    logit_bias: dict[int, float] = Field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0
    grammar: Optional[str] = None  # what response_format asks, compiled (jobs/structured_output.py)
    n: int = 1                     # choices, each with its own randomness (workers/job_runner.choice_seed)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChoiceResult(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: Optional[list[dict]] = None


class JobResult(BaseModel):
    """The first choice's text, finish reason and logprobs; with n > 1, `choices` has every choice."""
    text: str
    finish_reason: Literal["stop", "length"]
    usage: Usage                           # completion_tokens: all choices together
    logprobs: Optional[list[dict]] = None  # with logprobs: OpenAI's choices[].logprobs.content entries
    choices: Optional[list[ChoiceResult]] = None

    def all_choices(self) -> list[ChoiceResult]:
        return self.choices or [ChoiceResult(index=0, text=self.text, finish_reason=self.finish_reason,
                                             logprobs=self.logprobs)]


class JobError(BaseModel):
    """An OpenAI-shaped error, as the client will see it."""

    message: str
    type: str = "server_error"
    code: Optional[str] = None
    param: Optional[str] = None


JobKind = Literal["interactive", "background", "batch"]


class JobRecord(BaseModel):
    id: str
    status: JobStatus = JobStatus.QUEUED
    kind: JobKind = "interactive"
    queue: str = "interactive"        # the queue it was sent to (the reaper sends it there again)
    owner: str = "anonymous"          # fingerprint of the API key that created it
    created_at: float
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    first_token_at: Optional[float] = None  # when its first text was published (set once)
    request: GenerationRequest
    result: Optional[JobResult] = None
    error: Optional[JobError] = None
    worker: Optional[str] = None
    attempts: int = 0                 # how many times a worker started it (more than 1 after a crash)
    batch_id: Optional[str] = None    # batch jobs: the batch and the input line's custom_id
    custom_id: Optional[str] = None

    @staticmethod
    def new_id() -> str:
        return f"chatcmpl-{uuid.uuid4().hex}"

    @classmethod
    def new(cls, request: GenerationRequest, id: Optional[str] = None, **fields) -> "JobRecord":
        """A new queued job's record; `id`: one chosen for it (a batch line's, on its batch's shard), else new."""
        return cls(id=id or cls.new_id(), created_at=time.time(), request=request, **fields)

    def to_redis(self) -> dict[str, str]:
        """Flatten to a Redis hash: scalars as text, nested models as JSON, absent fields left out."""
        fields: dict[str, str] = {"id": self.id, "status": self.status.value, "kind": self.kind,
                                  "queue": self.queue, "owner": self.owner, "created_at": repr(self.created_at),
                                  "request": self.request.model_dump_json()}
        for name in ("batch_id", "custom_id"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        for name in ("started_at", "finished_at", "first_token_at"):
            if getattr(self, name) is not None:
                fields[name] = repr(getattr(self, name))
        for name in ("result", "error"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name).model_dump_json()
        if self.worker:
            fields["worker"] = self.worker
        return fields

    @classmethod
    def from_redis(cls, fields: dict[str, str]) -> "JobRecord":
        data: dict[str, Any] = dict(fields)
        for name in ("request", "result", "error"):
            if name in data:
                data[name] = json.loads(data[name])
        return cls.model_validate(data)


# --- Events: what a worker publishes on a job's channel, in order. `seq` starts at 0 and grows by one; the
# job store numbers each event as it logs it (jobs/transition.py), so a writer leaves it out.
EventType = Literal["delta", "done", "error", "cancelled"]


class JobEvent(BaseModel):
    seq: Optional[int] = None
    type: EventType
    text: str = ""                         # delta: new text, never half a character or part of a stop
    token_ids: Optional[list[int]] = None  # delta: the generated tokens behind it (a new attempt resumes there)
    logprobs: Optional[list[dict]] = None  # delta, with logprobs: an entry per token behind the text
    index: Optional[int] = None            # delta, with n > 1: the choice (None: choice 0)
    finish_reason: Optional[str] = None    # done; with n > 1 also a choice's last delta
    usage: Optional[Usage] = None          # done
    error: Optional[JobError] = None       # error

    @property
    def is_final(self) -> bool:
        return self.type != "delta"


def log_id(seq: int) -> str:
    """The entry id of event `seq` in its job's event log (ids must be > 0-0 and increasing)."""
    return f"0-{seq + 1}"


class Keys:
    """Names of everything a job owns in Redis."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def cancel(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:cancel"

    def lease(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:lease"

    def leases(self) -> str:
        return f"{self.prefix}:leases"

    def queued(self) -> str:
        return f"{self.prefix}:queued"

    def owner_unfinished(self, owner: str) -> str:
        return f"{self.prefix}:owner:{owner}:unfinished"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:events:{job_id}"

    def event_log(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:log"

    def owner_jobs(self, owner: str) -> str:
        return f"{self.prefix}:owner:{owner}:jobs"

    def file(self, file_id: str) -> str:
        return f"{self.prefix}:file:{file_id}"

    def file_lines(self, file_id: str) -> str:
        return f"{self.prefix}:file:{file_id}:lines"

    def owner_files(self, owner: str) -> str:
        return f"{self.prefix}:owner:{owner}:files"

    def batch(self, batch_id: str) -> str:
        return f"{self.prefix}:batch:{batch_id}"

    def batch_inflight(self, batch_id: str) -> str:
        return f"{self.prefix}:batch:{batch_id}:inflight"

    def batch_custom_ids(self, batch_id: str) -> str:
        return f"{self.prefix}:batch:{batch_id}:custom_ids"

    def batch_lease(self, batch_id: str) -> str:
        return f"{self.prefix}:batch:{batch_id}:lease"

    def owner_batches(self, owner: str) -> str:
        return f"{self.prefix}:owner:{owner}:batches"

    def active_batches(self) -> str:
        return f"{self.prefix}:batches:active"

    def models(self) -> str:
        return f"{self.prefix}:models"

    def worker(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}"

    def workers(self) -> str:
        return f"{self.prefix}:workers"
