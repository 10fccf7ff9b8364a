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


def run_job(engine: Engine, tokenizer, store: JobStore, record: JobRecord) -> JobStatus:
    request = record.request
    stream = engine.submit(EngineRequest(record.id, request.prompt_token_ids, sampling_params(record),
                                         request.max_tokens))
    assembler = TextAssembler(tokenizer, request.stop)
    seq = 0
    cancel_requested = False
    finish_reason = None
    while finish_reason is None:
        outputs = stream.next_outputs()
        finish_reason = outputs[-1].finish_reason
        if finish_reason == "error":
            error = JobError(message=f"The model worker failed while generating: {outputs[-1].error}",
                             code="generation_failed")
            store.finish(record.id, JobStatus.FAILED, JobEvent(seq=seq, type="error", error=error), error=error)
            return JobStatus.FAILED
        was_done = assembler.done
        piece = assembler.feed([t for output in outputs for t in output.token_ids])
        if finish_reason is not None:
            piece += assembler.finish()
        events = [JobEvent(seq=seq, type="delta", text=piece)] if piece else []
        seq += len(events)
        if store.publish_deltas(record.id, events) and not cancel_requested:
            cancel_requested = True
            engine.cancel(record.id)
        elif assembler.done and not was_done and finish_reason is None:
            engine.cancel(record.id)  # a stop sequence matched: the engine can drop the sequence now

    if cancel_requested and assembler.finish_reason is None:
        store.finish(record.id, JobStatus.CANCELLED, JobEvent(seq=seq, type="cancelled"))
        return JobStatus.CANCELLED
    reason = assembler.finish_reason or ("length" if finish_reason == "length" else "stop")
    usage = Usage(prompt_tokens=len(request.prompt_token_ids), completion_tokens=assembler.token_count,
                  total_tokens=len(request.prompt_token_ids) + assembler.token_count)
    result = JobResult(text=assembler.text, finish_reason=reason, usage=usage)
    store.finish(record.id, JobStatus.COMPLETED,
                 JobEvent(seq=seq, type="done", finish_reason=reason, usage=usage), result=result)
    return JobStatus.COMPLETED
