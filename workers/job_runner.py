"""One attempt of a job: engine outputs -> text deltas -> events to write (the worker side of the relay).

A `JobRun` holds what turns the engine's token ids into the client's text (detokenizer, stop matcher) and
the events still to write. It does no I/O itself: the worker's `Publisher` (workers/publisher.py) advances
every run of the process and writes all their events in one Redis pipeline per cycle, off the decode loop.

Attempts after the first (the previous worker died) resume: the tokens behind the deltas already published
are fed back as part of the prompt, and the text assembler replays them, so the stream goes on from its
last published delta, with nothing lost or repeated.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from jobs.records import JobError, JobEvent, JobRecord, JobResult, Usage
from jobs.store import REDIS_DOWN, JobStore
from jobs.vocabulary import logprob_entry
from jobs.transition import Attempt, Ending
from workers.engine.interface import EngineRequest, RequestStream, SamplingParams
from workers.text.output import TextAssembler

if TYPE_CHECKING:  # an Engine, or the EngineProcess in front of one (same interface)
    from workers.engine.engine import Engine

log = logging.getLogger(__name__)


def sampling_params(record: JobRecord) -> SamplingParams:
    r = record.request
    return SamplingParams(temperature=r.temperature, top_p=r.top_p, frequency_penalty=r.frequency_penalty,
                          presence_penalty=r.presence_penalty, seed=r.seed,
                          logit_bias=tuple(sorted(r.logit_bias.items())))


@dataclass
class Published:
    """What earlier attempts of a job already published: where this attempt resumes."""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict] = field(default_factory=list)
    events: int = 0
    final: bool = False

    @classmethod
    def read(cls, store: JobStore, job_id: str) -> "Published":
        published = cls()
        for event in store.read_log(job_id):
            published.events = event.seq + 1
            if event.is_final:
                published.final = True
            else:
                published.token_ids += event.token_ids or []
                published.text += event.text
                published.logprobs += event.logprobs or []
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


def deadline_error(deadline_s: float) -> JobError:
    return JobError(message=f"The job did not finish within its deadline of {deadline_s:g} s.",
                    type="timeout", code="deadline_exceeded")


class JobRun:
    def __init__(self, record: JobRecord, attempt: Attempt, tokenizer, published: Published, deadline_at: float,
                 deadline_s: float):
        self.record = record
        self.attempt = attempt
        self.deadline_at = deadline_at
        self.deadline_s = deadline_s
        self.assembler = TextAssembler(tokenizer, record.request.stop)
        replayed = self.assembler.feed(published.token_ids)  # rebuilds held-back state; this text is out already
        if replayed != published.text:
            log.warning("job %s: replayed text differs from the published text", record.id)
        self.resumed_tokens = published.token_ids
        self.resumed_events = published.events
        self.logprobs: Optional[list[dict]] = list(published.logprobs) if record.request.logprobs else None
        self.outbox: list[JobEvent] = []           # events made, not yet written
        self.acknowledged = 0                      # this attempt's events the store has logged
        self.write_errors = 0                      # writes the store refused with an error
        self._unpublished_tokens: list[int] = []   # consumed, but their text is still held back
        self._unpublished_logprobs: list[dict] = []  # (and their logprobs)
        self.ending: Optional[Ending] = None
        self.stream: Optional[RequestStream] = None
        self.cancel_requested = False
        self.last_checked = time.monotonic()       # when Redis last told us about a cancel
        self.status: Optional[str] = None          # set when the run is over
        self.over = threading.Event()

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def first_text_pending(self) -> bool:
        """Whether the outbox holds the job's first text (for the time-to-first-token metric)."""
        return bool(self.outbox) and self.resumed_events + self.acknowledged == 0

    # --- driving the engine
    def start(self, engine: Engine) -> None:
        request = self.record.request
        remaining = request.max_tokens - len(self.resumed_tokens)
        if self.assembler.done or remaining <= 0:  # the last attempt died between its last delta and its end
            self._emit(self.assembler.finish(), [])
            self._complete("length")
            return
        priority = 1 if self.record.kind == "batch" else 0  # batch work never delays interactive admission
        # The resumed tokens are prompt to the engine's cache, but output to its sampler: penalties count them, and
        # the draws go on from their position, so a seeded job continues exactly as if it had never stopped.
        self.stream = engine.submit(EngineRequest(self.attempt.name, request.prompt_token_ids + self.resumed_tokens,
                                                  sampling_params(self.record), remaining, priority,
                                                  num_resumed_tokens=len(self.resumed_tokens),
                                                  logprobs=request.top_logprobs if request.logprobs else None,
                                                  grammar=request.grammar))

    def absorb(self, engine: Engine) -> None:
        """Take whatever the engine produced for this run: text into the outbox, and the end if it came."""
        if self.ending is not None or self.stream is None:
            return
        outputs = self.stream.drain()
        if outputs:
            finish_reason = outputs[-1].finish_reason
            if finish_reason == "error":
                self._fail(JobError(message=f"The model worker failed while generating: {outputs[-1].error}",
                                    code="generation_failed"))
                return
            was_done = self.assembler.done
            token_ids = [t for output in outputs for t in output.token_ids]
            counted = self.assembler.token_count
            piece = self.assembler.feed(token_ids)
            if finish_reason is not None:
                piece += self.assembler.finish()
            logprobs = self._logprob_entries(outputs, self.assembler.token_count - counted)
            self._emit(piece, token_ids, logprobs)
            if finish_reason is not None:
                if self.cancel_requested and self.assembler.finish_reason is None:
                    self.ending = Ending.cancelled()
                else:
                    self._complete("length" if finish_reason == "length" else "stop")
                return
            if self.assembler.done and not was_done:
                engine.cancel(self.attempt.name)  # a stop sequence matched: the engine can drop it now
        if time.time() > self.deadline_at:
            engine.cancel(self.attempt.name)
            self._fail(deadline_error(self.deadline_s))

    def cancel_requested_by_client(self, engine: Engine) -> None:
        if not self.cancel_requested:
            self.cancel_requested = True
            engine.cancel(self.attempt.name)

    def end(self, status: str) -> None:
        self.status = status
        self.over.set()

    def _logprob_entries(self, outputs, counted: int) -> list[dict]:
        """OpenAI's logprobs entries of the first `counted` tokens of outputs (those the text took: not the
        tokens after a stop sequence), less EOS (it adds no text)."""
        if self.logprobs is None:
            return []
        eos = self.assembler.eos_id
        pairs = [(token, lp) for output in outputs for token, lp in zip(output.token_ids, output.logprobs or [])]
        return [logprob_entry(token, logprob, list(top)) for token, (logprob, top) in pairs[:counted]
                if token != eos]

    # --- events
    def _emit(self, text: str, token_ids: list[int], logprobs: Optional[list[dict]] = None) -> None:
        self._unpublished_tokens += token_ids
        self._unpublished_logprobs += logprobs or []
        if text:
            self.outbox.append(JobEvent(type="delta", text=text, token_ids=self._unpublished_tokens,
                                        logprobs=self._unpublished_logprobs if self.logprobs is not None else None))
            if self.logprobs is not None:
                self.logprobs += self._unpublished_logprobs
            self._unpublished_tokens, self._unpublished_logprobs = [], []

    def _complete(self, engine_reason: str) -> None:
        reason = self.assembler.finish_reason or engine_reason
        prompt_tokens = len(self.record.request.prompt_token_ids)
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=self.assembler.token_count,
                      total_tokens=prompt_tokens + self.assembler.token_count)
        self.ending = Ending.completed(JobResult(text=self.assembler.text, finish_reason=reason, usage=usage,
                                                 logprobs=self.logprobs))

    def _fail(self, error: JobError) -> None:
        self.ending = Ending.failed(error)
