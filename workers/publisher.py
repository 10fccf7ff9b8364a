"""The worker's publisher: one thread that advances every job run of the process and writes all their events
in one Redis pipeline per cycle.

Each cycle: wait until the engine produced something (or a short tick), let every run absorb its outputs
(detokenize, match stops: all off the engine's thread), then one pipeline carries every run's deltas and
final writes. Each write also renews the run's lease and reports a client's cancel; a write refused because
the lease is gone (FENCED) stops that run. While Redis is away, events wait in the runs' outboxes and the
same writes are retried (they are idempotent), for up to `redis_retry_s`.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from jobs.store import FENCED, REDIS_DOWN, JobStore
from workers.job_runner import JobRun

if TYPE_CHECKING:  # an Engine, or the EngineProcess in front of one (same interface)
    from workers.engine.engine import Engine

log = logging.getLogger(__name__)


class Publisher:
    def __init__(self, store: JobStore, engine: Engine, retry_s: float, cancel_poll_s: float = 0.25,
                 min_interval_s: float = 0.0, max_events_per_s: float = 0.0):
        self.store = store
        self.engine = engine
        self.retry_s = retry_s
        self.cancel_poll_s = cancel_poll_s
        # At most one cycle per interval: under load, a cycle then carries several tokens per job, so every
        # hop after it (Redis, the API, the client) handles fewer, larger events (vLLM's stream_interval).
        self.min_interval_s = min_interval_s
        # ... and with many streams, at most `max_events_per_s` events in all: each cycle writes up to one
        # event per run, so the interval grows with the number of runs (the relay's cost is per event).
        self.max_events_per_s = max_events_per_s
        self._runs: dict[str, JobRun] = {}
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        # A run's first output cuts a cycle's pause short: the pacing is for the flow of tokens, not for
        # the time to first token. Runs signal through `_first_output` until their first event is out.
        self._first_output = threading.Event()
        self._first_output_signal = _SetBoth(self._wakeup, self._first_output)
        self._outage_since: float | None = None
        threading.Thread(target=self._loop, name="publisher", daemon=True).start()

    def run(self, job_run: JobRun) -> str:
        """Run a job to its end (called from the job's own thread, which waits here); returns its status."""
        job_run.start(self.engine)
        if job_run.stream is not None:
            job_run.stream.notify = self._first_output_signal
        with self._lock:
            self._runs[job_run.id] = job_run
        self._wakeup.set()
        job_run.over.wait()
        return job_run.status

    def _loop(self) -> None:
        last_cycle = 0.0
        while True:
            self._wakeup.wait(self.cancel_poll_s)
            pause = self.cycle_interval(len(self._runs)) - (time.monotonic() - last_cycle)
            if pause > 0:
                self._first_output.wait(pause)
            last_cycle = time.monotonic()
            self._wakeup.clear()
            self._first_output.clear()
            with self._lock:
                runs = list(self._runs.values())
            if not runs:
                continue
            try:
                self._cycle(runs)
            except Exception:  # a bug must not stop every job of the worker: fail loudly, go on
                log.exception("publisher cycle failed")
                time.sleep(0.1)

    def cycle_interval(self, runs: int) -> float:
        """The least time between two cycles with `runs` jobs running."""
        if self.max_events_per_s <= 0:
            return self.min_interval_s
        return max(self.min_interval_s, runs / self.max_events_per_s)

    def _cycle(self, runs: list[JobRun]) -> None:
        now = time.monotonic()
        for run in runs:
            run.absorb(self.engine)
        due = [run for run in runs
               if run.outbox or run.final is not None or now - run.last_checked >= self.cancel_poll_s]
        if not due:
            return
        try:
            answers = self._write(due)
        except REDIS_DOWN as exc:
            self._outage_since = self._outage_since or now
            if now - self._outage_since > self.retry_s:
                log.error("Redis unavailable for %.0f s; giving up the running attempts", now - self._outage_since)
                for run in due:
                    self._close(run, "abandoned")  # their leases lapse; the reaper requeues them
            else:
                log.warning("Redis unavailable (%s); keeping %d runs' events to retry", exc, len(due))
                time.sleep(0.2)
            return
        self._outage_since = None
        self.store.telemetry.record(  # metrics: first text published, jobs finished (best effort)
            first_tokens=[run.id for run, (delta, _) in zip(due, answers)
                          if delta != FENCED and run.outbox and run.outbox[0].seq == 0],
            states=[(run.id, run.final.status) for run, (_, final) in zip(due, answers) if final == 1])
        for run, (delta_answer, final_answer) in zip(due, answers):
            run.last_checked = now
            if delta_answer == FENCED or final_answer == FENCED:
                log.warning("job %s: this attempt lost its lease to another attempt; stopped", run.id)
                self._close(run, "fenced")
                continue
            if run.outbox and run.stream is not None:
                run.stream.notify = self._wakeup  # its first event is out: paced from now on
            run.outbox = []
            if delta_answer == 1:
                run.cancel_requested_by_client(self.engine)
            if final_answer is not None:
                self._close(run, run.final.status.value if final_answer == 1 else "skipped")

    def _write(self, runs: list[JobRun]) -> list[tuple]:
        """One pipeline: each run's deltas (with lease renewal and cancel check), then its final write."""
        slots: list[bool] = []

        def fill(pipe) -> None:
            slots.clear()  # filled again if the scripts had to be loaded again
            for run in runs:
                self.store.publish_deltas(run.id, run.token, run.outbox, client=pipe)
                has_final = run.final is not None
                if has_final:
                    final = run.final
                    self.store.finish(run.id, final.status, final.event, result=final.result, error=final.error,
                                      token=run.token, client=pipe)
                slots.append(has_final)

        results = self.store.scripts.run(fill, transaction=False, raise_on_error=False)
        answers, i = [], 0
        for has_final in slots:
            delta = results[i]
            final = results[i + 1] if has_final else None
            i += 2 if has_final else 1
            for result in (delta, final):
                if isinstance(result, Exception):  # Redis away (retried next cycle), or a bug (logged)
                    raise result
            answers.append((int(delta), None if final is None else int(final)))
        return answers

    def _close(self, run: JobRun, status: str) -> None:
        if status in ("fenced", "abandoned"):
            self.engine.cancel(run.id)
        with self._lock:
            self._runs.pop(run.id, None)
        run.end(status)


class _SetBoth:
    """Sets two events at once (what a run's stream notifies until its first event is out)."""

    def __init__(self, *events: threading.Event):
        self.events = events

    def set(self) -> None:
        for event in self.events:
            event.set()
