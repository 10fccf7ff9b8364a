"""One attempt of a job: engine outputs -> text deltas -> events to write (the worker side of the relay).

A `JobRun` holds, for each of the job's n choices (a `ChoiceRun`: one engine request each), what turns the
engine's token ids into the client's text (detokenizer, stop matcher, logprobs entries), and the events still
to write. It does no I/O itself: the worker's `Publisher` (workers/publisher.py) advances every run of the
process and writes all their events in one Redis pipeline per cycle, off the decode loop.

Attempts after the first (the previous worker died) resume: the tokens behind the deltas already published
are fed back as part of the prompt, choice by choice, and the text assembler replays them, so each stream goes
on from its last published delta, with nothing lost or repeated; a choice that had ended stays ended.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from jobs.records import ChoiceResult, JobError, JobEvent, JobRecord, JobResult, Usage
from jobs.store import REDIS_DOWN, JobStore
from jobs.vocabulary import logprob_entry
from jobs.transition import Attempt, Ending
from workers.engine.interface import EngineRequest, RequestStream, SamplingParams
from workers.text.output import TextAssembler

if TYPE_CHECKING:  # an Engine, or the EngineProcess in front of one (same interface)
    from workers.engine.engine import Engine

log = logging.getLogger(__name__)


def sampling_params(record: JobRecord, choice: int = 0) -> SamplingParams:
    r = record.request
    return SamplingParams(temperature=r.temperature, top_p=r.top_p, frequency_penalty=r.frequency_penalty,
                          presence_penalty=r.presence_penalty, seed=choice_seed(r.seed, choice),
                          logit_bias=tuple(sorted(r.logit_bias.items())))


def choice_seed(seed: int, choice: int) -> int:
    """Each of a request's n choices draws its own randomness: choice 0 the request's seed (as with n = 1),
    choice i that seed moved by i times an odd 64-bit constant (all distinct, all reproducible)."""
    return (seed + choice * 0x9E3779B97F4A7C15) & (2**64 - 1)


@dataclass
class PublishedChoice:
    """What earlier attempts published of one choice."""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: Optional[str] = None  # it ended (n > 1: a choice's end is a delta event with its reason)


@dataclass
class Published:
    """What earlier attempts of a job already published: where this attempt resumes."""
    choices: dict[int, PublishedChoice] = field(default_factory=dict)
    events: int = 0
    final: bool = False

    def choice(self, index: int) -> PublishedChoice:
        return self.choices.setdefault(index, PublishedChoice())

    @classmethod
    def read(cls, store: JobStore, job_id: str) -> "Published":
        published = cls()
        for event in store.read_log(job_id):
            published.events = event.seq + 1
            if event.is_final:
                published.final = True
                continue
            choice = published.choice(event.index or 0)
            choice.token_ids += event.token_ids or []
            choice.text += event.text
            choice.logprobs += event.logprobs or []
            choice.finish_reason = event.finish_reason or choice.finish_reason
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


class ChoiceRun:
    """One of a job's choices in this attempt: its engine stream, the text assembler, what is still held back."""

    def __init__(self, index: int, record: JobRecord, tokenizer, published: PublishedChoice):
        self.index = index
        self.assembler = TextAssembler(tokenizer, record.request.stop)
        replayed = self.assembler.feed(published.token_ids)  # rebuilds held-back state; this text is out already
        if replayed != published.text:
            log.warning("job %s: choice %d's replayed text differs from the published text", record.id, index)
        self.resumed_tokens = published.token_ids
        self.logprobs: Optional[list[dict]] = list(published.logprobs) if record.request.logprobs else None
        self.finish_reason = published.finish_reason  # set when this choice has ended
        self.stream: Optional[RequestStream] = None
        self.engine_id = ""
        self.unpublished_tokens: list[int] = []    # consumed, but their text is still held back
        self.unpublished_logprobs: list[dict] = []  # (and their logprobs)

    def result(self) -> ChoiceResult:
        return ChoiceResult(index=self.index, text=self.assembler.text, finish_reason=self.finish_reason,
                            logprobs=self.logprobs)


class JobRun:
    def __init__(self, record: JobRecord, attempt: Attempt, tokenizer, published: Published, deadline_at: float,
                 deadline_s: float):
        self.record = record
        self.attempt = attempt
        self.deadline_at = deadline_at
        self.deadline_s = deadline_s
        self.choices = [ChoiceRun(i, record, tokenizer, published.choice(i)) for i in range(record.request.n)]
        self.resumed_events = published.events
        self.outbox: list[JobEvent] = []           # events made, not yet written
        self.acknowledged = 0                      # this attempt's events the store has logged
        self.write_errors = 0                      # writes the store refused with an error
        self.ending: Optional[Ending] = None
        self.cancel_requested = False
        self.last_checked = time.monotonic()       # when Redis last told us about a cancel
        self.status: Optional[str] = None          # set when the run is over
        # Its end's word on its pool's parked jobs (Transition.parked): None unless it ended through its write.
        self.pool_parked: Optional[bool] = None
        self.over = threading.Event()

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def streams(self) -> list[RequestStream]:
        return [c.stream for c in self.choices if c.stream is not None]

    # --- driving the engine
    def start(self, engine: Engine) -> None:
        request = self.record.request
        priority = 1 if self.record.kind == "batch" else 0  # batch work never delays interactive admission
        for choice in self.choices:
            remaining = request.max_tokens - len(choice.resumed_tokens)
            if choice.finish_reason is not None:
                continue
            if choice.assembler.done or remaining <= 0:  # the last attempt died between its last delta and its end
                self._emit(choice, choice.assembler.finish(), [])
                self._end_choice(choice, "length")
                continue
            # The resumed tokens are prompt to the engine's cache, but output to its sampler: penalties count
            # them, and the draws go on from their position, so a seeded job continues exactly as if it had
            # never stopped. A choice after the first shares the prompt: the engine computes its prefill once.
            choice.engine_id = self.attempt.name if choice.index == 0 else f"{self.attempt.name}#{choice.index}"
            choice.stream = engine.submit(EngineRequest(
                choice.engine_id, request.prompt_token_ids + choice.resumed_tokens,
                sampling_params(self.record, choice.index), remaining, priority,
                num_resumed_tokens=len(choice.resumed_tokens),
                logprobs=request.top_logprobs if request.logprobs else None, grammar=request.grammar,
                shares_prompt_with=self.attempt.name if choice.index > 0 else None))
        self._complete_if_all_ended()

    def absorb(self, engine: Engine) -> None:
        """Take whatever the engine produced for this run: text into the outbox, and the end if it came."""
        if self.ending is not None:
            return
        for choice in self.choices:
            if choice.stream is not None and choice.finish_reason is None:
                self._absorb_choice(choice, engine)
                if self.ending is not None:
                    return
        self._complete_if_all_ended()
        if self.ending is None and time.time() > self.deadline_at:
            self._cancel_engine(engine)
            self._fail(deadline_error(self.deadline_s))

    def _absorb_choice(self, choice: ChoiceRun, engine: Engine) -> None:
        outputs = choice.stream.drain()
        if not outputs:
            return
        finish_reason = outputs[-1].finish_reason
        if finish_reason == "error":
            self._cancel_engine(engine)
            self._fail(JobError(message=f"The model worker failed while generating: {outputs[-1].error}",
                                code="generation_failed"))
            return
        assembler = choice.assembler
        was_done = assembler.done
        token_ids = [t for output in outputs for t in output.token_ids]
        counted = assembler.token_count
        piece = assembler.feed(token_ids)
        if finish_reason is not None:
            piece += assembler.finish()
        self._emit(choice, piece, token_ids, self._logprob_entries(choice, outputs, assembler.token_count - counted))
        if finish_reason is not None:
            if self.cancel_requested and assembler.finish_reason is None:
                self.ending = Ending.cancelled()
            else:
                self._end_choice(choice, "length" if finish_reason == "length" else "stop")
        elif assembler.done and not was_done:
            engine.cancel(choice.engine_id)  # a stop sequence matched: the engine can drop it now

    def cancel_requested_by_client(self, engine: Engine) -> None:
        if not self.cancel_requested:
            self.cancel_requested = True
            self._cancel_engine(engine)

    def _cancel_engine(self, engine: Engine) -> None:
        for choice in self.choices:
            if choice.stream is not None and choice.finish_reason is None:
                engine.cancel(choice.engine_id)

    def end(self, status: str) -> None:
        self.status = status
        self.over.set()

    def _logprob_entries(self, choice: ChoiceRun, outputs, counted: int) -> list[dict]:
        """OpenAI's logprobs entries of the first `counted` tokens of outputs (those the text took: not the
        tokens after a stop sequence), less EOS (it adds no text)."""
        if choice.logprobs is None:
            return []
        eos = choice.assembler.eos_id
        pairs = [(token, lp) for output in outputs for token, lp in zip(output.token_ids, output.logprobs or [])]
        return [logprob_entry(token, logprob, list(top)) for token, (logprob, top) in pairs[:counted]
                if token != eos]

    # --- events
    def _emit(self, choice: ChoiceRun, text: str, token_ids: list[int], logprobs: Optional[list[dict]] = None,
              finish_reason: Optional[str] = None) -> None:
        """A delta event of `choice` once it has text (or, with n > 1, when it ends: its finish_reason)."""
        choice.unpublished_tokens += token_ids
        choice.unpublished_logprobs += logprobs or []
        if text or finish_reason:
            self.outbox.append(JobEvent(
                type="delta", text=text, token_ids=choice.unpublished_tokens,
                logprobs=choice.unpublished_logprobs if choice.logprobs is not None else None,
                index=choice.index if self.record.request.n > 1 else None, finish_reason=finish_reason))
            if choice.logprobs is not None:
                choice.logprobs += choice.unpublished_logprobs
            choice.unpublished_tokens, choice.unpublished_logprobs = [], []

    def _end_choice(self, choice: ChoiceRun, engine_reason: str) -> None:
        choice.finish_reason = choice.assembler.finish_reason or engine_reason
        if self.record.request.n > 1:  # its end is an event of its own (n = 1: the job's `done` says it)
            self._emit(choice, "", [], finish_reason=choice.finish_reason)

    def _complete_if_all_ended(self) -> None:
        if self.ending is not None or any(c.finish_reason is None for c in self.choices):
            return
        prompt_tokens = len(self.record.request.prompt_token_ids)
        completion_tokens = sum(c.assembler.token_count for c in self.choices)
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                      total_tokens=prompt_tokens + completion_tokens)
        first = self.choices[0]
        self.ending = Ending.completed(JobResult(
            text=first.assembler.text, finish_reason=first.finish_reason, usage=usage, logprobs=first.logprobs,
            choices=[c.result() for c in self.choices] if len(self.choices) > 1 else None))

    def _fail(self, error: JobError) -> None:
        self.ending = Ending.failed(error)
