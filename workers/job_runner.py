"""Runs one attempt of a job on the engine: token ids from the engine -> text deltas -> events in Redis.

This is the worker side of the relay. It lives in the task's thread, not the engine's: detokenizing,
stop matching and Redis writes stay off the decode loop. Each burst of tokens is one Redis round trip,
which also renews the attempt's lease and tells us whether the client asked to cancel.

Attempts after the first (the previous worker died) resume: the tokens behind the deltas already
published are fed back as part of the prompt, and the text assembler replays them, so the stream goes on
from its last published delta, with nothing lost or repeated.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import redis

from jobs.records import JobError, JobEvent, JobRecord, JobResult, JobStatus, Usage
from jobs.store import FENCED, JobStore
from workers.engine.engine import Engine, EngineRequest
from workers.engine.sampling import SamplingParams
from workers.text.output import TextAssembler

log = logging.getLogger(__name__)

REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)


class Fenced(Exception):
    """This attempt lost its lease (another attempt owns the job now): stop, write nothing."""


def sampling_params(record: JobRecord) -> SamplingParams:
    r = record.request
    return SamplingParams(temperature=r.temperature, top_p=r.top_p, frequency_penalty=r.frequency_penalty,
                          presence_penalty=r.presence_penalty, seed=r.seed)


@dataclass
class Published:
    """What earlier attempts of a job already published: where this attempt resumes."""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    next_seq: int = 0
    final: bool = False

    @classmethod
    def read(cls, store: JobStore, job_id: str) -> "Published":
        published = cls()
        for event in store.read_log(job_id):
            published.next_seq = event.seq + 1
            if event.is_final:
                published.final = True
            else:
                published.token_ids += event.token_ids or []
                published.text += event.text
        return published


def retry_redis(call, retry_s: float):
    """Run a Redis call, retrying while Redis is away (a restart), for up to `retry_s` seconds."""
    deadline = time.monotonic() + retry_s
    pause = 0.2
    while True:
        try:
            return call()
        except REDIS_DOWN:
            if time.monotonic() > deadline:
                raise
            log.warning("Redis unavailable; retrying in %.1f s", pause)
            time.sleep(pause)
            pause = min(pause * 2, 2.0)


class JobEvents:
    """Publishes one attempt's events with consecutive sequence numbers, under its lease."""

    def __init__(self, store: JobStore, job_id: str, token: str, retry_s: float, next_seq: int = 0):
        self.store = store
        self.job_id = job_id
        self.token = token
        self.retry_s = retry_s
        self.seq = next_seq
        self._unpublished_tokens: list[int] = []  # consumed, but their text is still held back

    def delta(self, text: str, token_ids: list[int]) -> bool:
        """Publish a delta (if any text); returns True when the client asked to cancel."""
        self._unpublished_tokens += token_ids
        events = [JobEvent(seq=self.seq, type="delta", text=text, token_ids=self._unpublished_tokens)] if text else []
        answer = retry_redis(lambda: self.store.publish_deltas(self.job_id, self.token, events), self.retry_s)
        if answer == FENCED:
            raise Fenced(self.job_id)
        if events:
            self.seq += 1
            self._unpublished_tokens = []
        return answer == 1

    def _finish(self, status: JobStatus, event: JobEvent, **fields) -> JobStatus:
        answer = retry_redis(lambda: self.store.finish(self.job_id, status, event, token=self.token, **fields),
                             self.retry_s)
        if answer == FENCED:
            raise Fenced(self.job_id)
        return status

    def completed(self, result: JobResult) -> JobStatus:
        event = JobEvent(seq=self.seq, type="done", finish_reason=result.finish_reason, usage=result.usage)
        return self._finish(JobStatus.COMPLETED, event, result=result)

    def failed(self, error: JobError) -> JobStatus:
        return self._finish(JobStatus.FAILED, JobEvent(seq=self.seq, type="error", error=error), error=error)

    def cancelled(self) -> JobStatus:
        return self._finish(JobStatus.CANCELLED, JobEvent(seq=self.seq, type="cancelled"))


def deadline_error(deadline_s: float) -> JobError:
    return JobError(message=f"The job did not finish within its deadline of {deadline_s:g} s.",
                    type="timeout", code="deadline_exceeded")


def run_job(engine: Engine, tokenizer, events: JobEvents, record: JobRecord, published: Published,
            deadline_at: float, deadline_s: float) -> JobStatus:
    request = record.request
    assembler = TextAssembler(tokenizer, request.stop)
    replayed = assembler.feed(published.token_ids)  # rebuilds held-back state; this text is out already
    if replayed != published.text:
        log.warning("job %s: replayed text differs from the published text", record.id)
    remaining = request.max_tokens - len(published.token_ids)
    if assembler.done or remaining <= 0:  # the last attempt died between its last delta and its end
        events.delta(assembler.finish(), [])
        return _complete(events, record, assembler, "length")

    priority = 1 if record.kind == "batch" else 0  # batch work never delays interactive admission
    stream = engine.submit(EngineRequest(record.id, request.prompt_token_ids + published.token_ids,
                                         sampling_params(record), remaining, priority))
    cancel_requested = False
    finish_reason = None
    try:
        while finish_reason is None:
            outputs = stream.next_outputs()
            finish_reason = outputs[-1].finish_reason
            if finish_reason == "error":
                return events.failed(JobError(message=f"The model worker failed while generating: "
                                                      f"{outputs[-1].error}", code="generation_failed"))
            was_done = assembler.done
            token_ids = [t for output in outputs for t in output.token_ids]
            piece = assembler.feed(token_ids)
            if finish_reason is not None:
                piece += assembler.finish()
            if events.delta(piece, token_ids) and not cancel_requested:
                cancel_requested = True
                engine.cancel(record.id)
            elif assembler.done and not was_done and finish_reason is None:
                engine.cancel(record.id)  # a stop sequence matched: the engine can drop the sequence now
            if finish_reason is None and time.time() > deadline_at:
                engine.cancel(record.id)
                return events.failed(deadline_error(deadline_s))
    except BaseException:
        engine.cancel(record.id)  # fenced, Redis gone for good, or a bug: free the sequence
        raise

    if cancel_requested and assembler.finish_reason is None:
        return events.cancelled()
    return _complete(events, record, assembler, "length" if finish_reason == "length" else "stop")


def _complete(events: JobEvents, record: JobRecord, assembler: TextAssembler, engine_reason: str) -> JobStatus:
    reason = assembler.finish_reason or engine_reason
    prompt_tokens = len(record.request.prompt_token_ids)
    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=assembler.token_count,
                  total_tokens=prompt_tokens + assembler.token_count)
    return events.completed(JobResult(text=assembler.text, finish_reason=reason, usage=usage))
