"""Runs one job on the engine: token ids from the engine -> text deltas -> events in Redis.

This is the worker side of the relay. It lives in the task's thread, not the engine's: detokenizing,
stop matching and Redis writes stay off the decode loop. Each burst of tokens is one Redis round trip,
which also tells us whether the client asked to cancel.
"""
from __future__ import annotations

import logging

from jobs.records import JobError, JobEvent, JobRecord, JobResult, JobStatus, Usage
from jobs.store import JobStore
from workers.engine.engine import Engine, EngineRequest
from workers.engine.sampling import SamplingParams
from workers.text.output import TextAssembler

log = logging.getLogger(__name__)


def sampling_params(record: JobRecord) -> SamplingParams:
    r = record.request
    return SamplingParams(temperature=r.temperature, top_p=r.top_p, frequency_penalty=r.frequency_penalty,
                          presence_penalty=r.presence_penalty, seed=r.seed)


class JobEvents:
    """Publishes one job's events with consecutive sequence numbers."""

    def __init__(self, store: JobStore, job_id: str):
        self.store = store
        self.job_id = job_id
        self.seq = 0

    def delta(self, text: str) -> bool:
        """Publish a delta (if any text); returns True when the client asked to cancel."""
        events = [JobEvent(seq=self.seq, type="delta", text=text)] if text else []
        self.seq += len(events)
        return self.store.publish_deltas(self.job_id, events)

    def completed(self, result: JobResult) -> JobStatus:
        event = JobEvent(seq=self.seq, type="done", finish_reason=result.finish_reason, usage=result.usage)
        self.store.finish(self.job_id, JobStatus.COMPLETED, event, result=result)
        return JobStatus.COMPLETED

    def failed(self, error: JobError) -> JobStatus:
        self.store.finish(self.job_id, JobStatus.FAILED, JobEvent(seq=self.seq, type="error", error=error),
                          error=error)
        return JobStatus.FAILED

    def cancelled(self) -> JobStatus:
        self.store.finish(self.job_id, JobStatus.CANCELLED, JobEvent(seq=self.seq, type="cancelled"))
        return JobStatus.CANCELLED


def run_job(engine: Engine, tokenizer, events: JobEvents, record: JobRecord) -> JobStatus:
    request = record.request
    stream = engine.submit(EngineRequest(record.id, request.prompt_token_ids, sampling_params(record),
                                         request.max_tokens))
    assembler = TextAssembler(tokenizer, request.stop)
    cancel_requested = False
    finish_reason = None
    while finish_reason is None:
        outputs = stream.next_outputs()
        finish_reason = outputs[-1].finish_reason
        if finish_reason == "error":
            return events.failed(JobError(message=f"The model worker failed while generating: "
                                                  f"{outputs[-1].error}", code="generation_failed"))
        was_done = assembler.done
        piece = assembler.feed([t for output in outputs for t in output.token_ids])
        if finish_reason is not None:
            piece += assembler.finish()
        if events.delta(piece) and not cancel_requested:
            cancel_requested = True
            engine.cancel(record.id)
        elif assembler.done and not was_done and finish_reason is None:
            engine.cancel(record.id)  # a stop sequence matched: the engine can drop the sequence now

    if cancel_requested and assembler.finish_reason is None:
        return events.cancelled()
    reason = assembler.finish_reason or ("length" if finish_reason == "length" else "stop")
    prompt_tokens = len(request.prompt_token_ids)
    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=assembler.token_count,
                  total_tokens=prompt_tokens + assembler.token_count)
    return events.completed(JobResult(text=assembler.text, finish_reason=reason, usage=usage))
