"""The worker's publisher: one thread that advances every job run of the process and writes all their events
in one Redis pipeline per cycle.

Each cycle: wait until the engine produced something (or a short tick), let every run absorb its outputs
(detokenize, match stops: all off the engine's thread), then one round trip carries every run's events and
end (`JobStore.write_many`): each end is one job-store transition (jobs/transition.py), and the runs that
only have events share one script call. A client's cancel comes back with a run's end, and with its events
every `cancel_poll_s` (asking on every token would cost Redis a lookup per event for a rare answer). A write
refused because the attempt lost its lease (FENCED) stops that run; a write that fails with an error fails
that run alone. Runs are known by their attempt (job id, lease token), so a stale attempt of a job and a
new one on the same worker never touch each other. While Redis is away (or, with job state on several shards,
a run's shard: jobs/shards.py), events wait in the runs' outboxes and the same writes are retried (they are
idempotent), for up to `redis_retry_s`; the runs on other shards go on. Leases are renewed by the
worker's housekeeping, and only while the engine makes progress (workers/tasks.py).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from jobs.records import JobError
from jobs.store import REDIS_DOWN, JobStore
from jobs.transition import Attempt, Ending, Outcome, Transition, Write
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
        self._runs: dict[Attempt, JobRun] = {}  # by attempt: a stale attempt of a job never hides a new one
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        # A run's first output cuts a cycle's pause short: the pacing is for the flow of tokens, not for
        # the time to first token. Runs signal through `_first_output` until their first event is out.
        self._first_output = threading.Event()
        self._first_output_signal = _SetBoth(self._wakeup, self._first_output)
        self._away_since: dict[Attempt, float] = {}  # runs whose Redis did not answer: since when
        threading.Thread(target=self._loop, name="publisher", daemon=True).start()

    def run(self, job_run: JobRun, grace_s: float = 60.0) -> str:
        """Run a job to its end (called from the job's own thread, which waits here); returns its status.
        The wait is bounded: a run still here `grace_s` after its job's deadline (which its own cycle
        enforces) is given up, so no thread waits forever on a run that something failed to close."""
        job_run.start(self.engine)
        for stream in job_run.streams:
            stream.notify = self._first_output_signal
        with self._lock:
            self._runs[job_run.attempt] = job_run
        self._wakeup.set()
        if not job_run.over.wait(max(0.0, job_run.deadline_at + grace_s - time.time())):
            log.error("job %s: attempt %s still open past its deadline; given up", job_run.id, job_run.attempt.name)
            self._close(job_run, "abandoned")
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
               if run.outbox or run.ending is not None or now - run.last_checked >= self.cancel_poll_s]
        if not due:
            return
        writes = [Write(run.attempt, run.outbox, run.ending, run.acknowledged,
                        check_cancel=now - run.last_checked >= self.cancel_poll_s) for run in due]
        try:
            answers = self.store.write_many(writes)
        except REDIS_DOWN as exc:
            answers = [exc] * len(writes)
        waiting = [(run, done) for run, done in zip(due, answers) if isinstance(done, REDIS_DOWN)]
        if waiting:
            self._redis_away(waiting, now)
            if len(waiting) == len(due):
                time.sleep(0.2)
                return
        for run, done, write in zip(due, answers, writes):
            if isinstance(done, REDIS_DOWN):
                continue
            self._away_since.pop(run.attempt, None)
            if write.check_cancel:
                run.last_checked = now
            if isinstance(done, Exception):  # this run's write failed (a bug, bad data): this run fails
                self._fail_run(run, done)
            elif done.outcome is Outcome.FENCED:
                log.warning("job %s: attempt %s lost its lease to another attempt; stopped", run.id, run.attempt.name)
                self._close(run, "fenced")
            elif done.outcome is Outcome.GAP:  # Redis lost events it had acknowledged (a crash between syncs)
                log.error("job %s: its log lacks events attempt %s wrote; given up, to resume from the log",
                          run.id, run.attempt.name)
                self._close(run, "abandoned")  # its lease lapses; the reaper requeues the job
            elif done.outcome is not Outcome.APPLIED:  # over already (a retried end), or expired
                self._close(run, "skipped")
            else:
                if run.outbox:
                    for stream in run.streams:
                        stream.notify = self._wakeup  # its first event is out: paced from now on
                run.acknowledged += len(run.outbox)
                run.outbox = []
                if done.cancel_requested:
                    run.cancel_requested_by_client(self.engine)
                if run.ending is not None:
                    run.pool_parked = done.parked
                    self._close(run, run.ending.status.value)

    def _redis_away(self, waiting: list[tuple[JobRun, Exception]], now: float) -> None:
        """Runs whose Redis (their job's shard) did not answer: their events wait in their outboxes, and the
        same writes are retried next cycle, for up to `retry_s` from a run's first unanswered write."""
        given_up = []
        for run, _ in waiting:
            if now - self._away_since.setdefault(run.attempt, now) > self.retry_s:
                given_up.append(run)
                self._close(run, "abandoned")  # its lease lapses; the reaper requeues the job
        if given_up:
            log.error("Redis unavailable for over %.0f s; gave up %d running attempt(s)", self.retry_s, len(given_up))
        if len(given_up) < len(waiting):
            log.warning("Redis unavailable (%s); keeping %d runs' events to retry", waiting[0][1],
                        len(waiting) - len(given_up))

    def _fail_run(self, run: JobRun, error: Exception) -> None:
        """A run whose write the store refused with an error: end the job as failed if it can still be
        written; otherwise (its end was what failed) give the attempt up: its lease lapses, another
        attempt resumes it, and its attempts are counted."""
        log.error("job %s: attempt %s's write failed: %s", run.id, run.attempt.name, error)
        run.write_errors += 1
        if run.write_errors == 1:
            self.engine.cancel(run.attempt.name)
            run.outbox = []
            run.ending = Ending.failed(JobError(message="The job could not be recorded.", code="internal_error"))
        else:
            self._close(run, "abandoned")

    def _close(self, run: JobRun, status: str) -> None:
        if status in ("fenced", "abandoned"):
            self.engine.cancel(run.attempt.name)
        with self._lock:
            if self._runs.get(run.attempt) is run:
                del self._runs[run.attempt]
        self._away_since.pop(run.attempt, None)
        run.end(status)


class _SetBoth:
    """Sets two events at once (what a run's stream notifies until its first event is out)."""

    def __init__(self, *events: threading.Event):
        self.events = events

    def set(self) -> None:
        for event in self.events:
            event.set()
