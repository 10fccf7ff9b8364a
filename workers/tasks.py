"""Celery tasks and worker lifecycle. Imported only by worker processes.

The worker runs the threads pool: each Celery thread runs one job against the worker's one engine. The
engine and its model live in a process of their own (workers/engine/process.py), spawned and loaded once,
when the worker is ready, so no user request waits for it.

Each worker also pumps its pool's fair dispatch (jobs/fair_dispatch.py): when it takes a message off the
Celery queue or ends a job, the next parked jobs, round-robin across keys, take the room.
"""
from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
from typing import Callable, Optional

from celery.signals import task_received, worker_ready, worker_shutdown

from config.logging import job_context
from config.settings import get_settings
from jobs.celery_app import RUN_CHAT_COMPLETION, celery_app, send_chat_completion
from jobs.chat_format import raw_tokenizer
from jobs.fair_dispatch import FairDispatcher, LiveSlots, PumpThread
from jobs.models import model_entry
from jobs.records import JobError, JobStatus
from jobs.shards import ShardedJobStore
from jobs.transition import Attempt, Ending, Outcome

log = logging.getLogger("workers")


class WorkerRuntime:
    """What one worker process holds: the model, its engine, the tokenizer, the leases of its running jobs,
    and a housekeeping thread (heartbeat, lease renewal, and the reaper that requeues dead workers' jobs)."""

    def __init__(self):
        from workers.engine.process import EngineProcess
        from workers.engine_setup import build_engine

        self.settings = get_settings()
        # Node name (worker.1, ...) @ host : pid of the worker process (its engine runs in a child of it).
        self.name = f"{os.environ.get('HONCHO_PROCESS_NAME', 'worker')}@{socket.gethostname()}:{os.getpid()}"
        self.store = ShardedJobStore.from_settings(self.settings)
        self.tokenizer = raw_tokenizer()
        # The model and its engine live in a process of their own, so the decode loop never waits for this
        # process's GIL (the publisher, Celery's threads). If it dies, this worker exits: the supervisor
        # starts a fresh one, and the running jobs are picked up through their leases.
        self.engine = EngineProcess(functools.partial(build_engine, self.settings, self.tokenizer.eos_id),
                                    on_exit=_engine_process_died)
        info = self.engine.info
        log.info("serving model %s on %s (%s); loaded in %.1f s, engine warmed up in %.1f s (engine process %s)",
                 info["model"], info["device"], info["reason"], info["load_s"], info["warmup_s"], self.engine.pid)
        self.model_name = info["model"]
        from workers.publisher import Publisher
        self.publisher = Publisher(self.store, self.engine, self.settings.redis_retry_s,
                                   min_interval_s=self.settings.stream_interval_s,
                                   max_events_per_s=self.settings.effective_stream_events_per_s)
        self.leases: set[Attempt] = set()  # the attempts running here (two of one job can be: one stale)
        self._leases_lock = threading.Lock()
        self._stop = threading.Event()
        self._started_at = time.time()
        threading.Thread(target=self._housekeeping, name="housekeeping", daemon=True).start()
        s = self.settings
        dispatcher = FairDispatcher(self.store.fair, send_chat_completion, s.fair_dispatch_margin,
                                    s.fair_dispatch_reserve, LiveSlots(self.store), s.job_deadline_s,
                                    s.fair_dispatch_active_s)
        self.fair_pump = PumpThread(dispatcher, s.interactive_queue, s.fair_dispatch_tick_s)
        self.fair_pump.start()
        from workers.deliveries import DeliveryRecorder
        self.deliveries = DeliveryRecorder(lambda job_id: self.store.mark_delivered(job_id, self.name))
        from jobs.batch_queue import BatchQueueProducer
        from workers.batch_consumer import BatchConsumer
        self._requeue_batch = BatchQueueProducer(self.settings)
        self.batch_consumer = BatchConsumer(self.settings, lambda job_id: execute_job(self, job_id))
        self.batch_consumer.start(self.settings.effective_batch_slots)

    # --- leases of the attempts running in this process
    def hold(self, attempt: Attempt) -> None:
        with self._leases_lock:
            self.leases.add(attempt)

    def release(self, attempt: Attempt) -> None:
        with self._leases_lock:
            self.leases.discard(attempt)

    def _housekeeping(self) -> None:
        s = self.settings
        period = min(s.heartbeat_interval_s, s.job_lease_s / 3, s.reaper_interval_s)
        while not self._stop.is_set():
            for chore in (self._check_engine, self._heartbeat, self._renew_leases, self._reap):
                try:
                    chore()
                except Exception as exc:  # Redis away: keep trying, the worker itself is fine
                    log.warning("%s failed: %s", chore.__name__.strip("_"), exc)
            self._stop.wait(period)

    def _heartbeat(self) -> None:
        info = {"name": self.name, "model": self.model_name, "model_id": self.settings.served_model_name,
                "queue": self.settings.interactive_queue,
                "started_at": self._started_at, "running_jobs": len(self.leases),
                "concurrency": self.settings.worker_concurrency or self.settings.max_num_seqs,
                "batch_slots": self.settings.effective_batch_slots}
        stats = getattr(self.engine, "stats", None)
        if stats:
            info.update(stats())
        self.store.heartbeat(self.name, info, self.settings.heartbeat_ttl_s, model=model_entry(self.settings))

    def _check_engine(self) -> None:
        """A hung engine must not keep its jobs: past `engine_stall_s` without a step, end it and this
        worker (its jobs' leases lapse and other workers resume them; the supervisor starts a fresh worker)."""
        stalled = self.engine.stalled_for()
        if stalled >= self.settings.engine_stall_s:
            log.critical("the engine made no step for %.0f s while it had work: exiting, so that this worker's "
                         "jobs resume elsewhere", stalled)
            self.engine.kill()
            logging.shutdown()
            os._exit(71)

    def _renew_leases(self) -> None:
        """Renew the leases of the attempts running here, but only while the engine makes progress: the
        lease is the promise that this worker is moving the job along."""
        with self._leases_lock:
            leases = set(self.leases)
        if leases and self.engine.stalled_for() < self.settings.engine_stall_s:
            for attempt in self.store.renew(leases):
                log.warning("job %s: attempt %s lost its lease; its next write stops it", attempt.job_id,
                            attempt.name)

    def _reap(self) -> None:
        """Jobs whose worker died: back on their queue (exactly one reaper gets each)."""
        lost = self.store.reap_lost(self.settings.lost_delivery_s)
        for job_id, _, _ in lost:
            log.warning("job %s: queued, its queue empty, never started: its message was lost; sent again", job_id)
        # Straight to their queues, not through fair dispatch: they waited their turn once already
        # (JobStore.reap). A send that fails is retried by a later pass (reap_lost watches them).
        sent = []
        try:
            for job_id, kind, queue in self.store.reap() + lost:
                log.warning("job %s: back on queue %s", job_id, queue)
                if kind == "batch":
                    self._requeue_batch.put(job_id, queue)
                else:
                    send_chat_completion(job_id, queue)
                    sent.append(job_id)
        finally:
            self.store.fair.confirm_sent(sent)  # one a dispatcher had taken and never sent: sent now

    def stop(self) -> None:
        self._stop.set()
        self.fair_pump.stop()
        self.deliveries.stop()
        self.batch_consumer.stop()
        try:
            self.store.remove_heartbeat(self.name)
        except Exception:
            pass
        self.engine.shutdown()


def _engine_process_died() -> None:
    log.critical("the engine process died: exiting, so that this worker's jobs go to a fresh worker")
    logging.shutdown()
    os._exit(70)


_runtime: WorkerRuntime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> WorkerRuntime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = WorkerRuntime()
        return _runtime


@worker_ready.connect
def _load_on_ready(sender=None, **_):
    pool_module = type(getattr(sender, "pool", None)).__module__  # celery.concurrency.{thread,solo,prefork}
    if pool_module.endswith("prefork"):
        log.warning("prefork pool: the model loads in each child on its first job; use --pool threads")
        return
    get_runtime()


@task_received.connect
def _note_delivery(request=None, **_):
    """This worker holds the job's message now (it starts it when a thread is free): on record unless it starts
    at once (workers/deliveries.py), so that if this worker dies first, a reaper sends the job again at once
    instead of after the visibility timeout."""
    if _runtime is None or request is None or request.name != RUN_CHAT_COMPLETION or not request.args:
        return
    _runtime.deliveries.received(request.args[0])


@worker_shutdown.connect
def _stop_runtime(**_):
    if _runtime is not None:
        _runtime.stop()


@celery_app.task(name=RUN_CHAT_COMPLETION)
def run_chat_completion(job_id: str) -> str:
    """A job from its pool's Celery queue. Its message left that queue (room for a parked job), and its end frees
    a slot and its key's share: each time the pool is pumped, unless the job's start or end saw no job parked on
    the pool (then there is nothing to take: Transition.parked)."""
    runtime = get_runtime()

    def pool_news(parked: Optional[bool]) -> None:
        if parked is not False:
            runtime.fair_pump.wake()

    try:
        return execute_job(runtime, job_id, pool_news)
    except BaseException:
        runtime.fair_pump.wake()
        raise


def _no_news(parked: Optional[bool]) -> None:
    pass


def execute_job(runtime: WorkerRuntime, job_id: str, pool_news: Callable[[Optional[bool]], None] = _no_news) -> str:
    with job_context(job_id):  # every log line of this job carries its id
        return _execute_job(runtime, job_id, pool_news)


def _execute_job(runtime: WorkerRuntime, job_id: str,
                 pool_news: Callable[[Optional[bool]], None] = _no_news) -> str:
    """Run one attempt of a job by id (from Celery's interactive queue or the batch queue); returns what
    became of it. A job delivered again after it finished, or still running elsewhere, is skipped.
    `pool_news(parked)`: told what the start, then the end, saw of the pool's parked jobs (None: unknown)."""
    from workers.job_runner import JobRun, Published, deadline_error, retry_redis

    settings, store = runtime.settings, runtime.store
    retry_s = settings.redis_retry_s
    runtime.deliveries.started(job_id)  # the start says who holds it (the batch queue's jobs were never noted)
    # One round trip: the start, and the record it leaves (the job, the cancel flag).
    started, attempt, record = retry_redis(lambda: store.start_with_record(job_id, runtime.name), retry_s)
    pool_news(started.parked)
    if started.outcome is Outcome.MISSING:
        log.warning("job %s: no record (expired?), skipped", job_id)
        return "missing"
    if started.outcome is Outcome.TERMINAL:
        log.info("job %s: already %s, skipped", job_id, started.detail[0])
        return started.detail[0]
    if not started.applied:  # another attempt runs it (a duplicate delivery): that one sees a cancel or deadline
        log.info("job %s: not started (%s), skipped", job_id, started.outcome.value)
        return "skipped"
    number = started.detail[0]
    deadline_at = record.created_at + settings.job_deadline_s
    if started.cancel_requested or time.time() > deadline_at:
        # Asked to stop, or out of time, before it ran (put back by the reaper after its worker died, say):
        # this attempt ends it at once, as the holder.
        ending = (Ending.cancelled() if started.cancel_requested else
                  Ending.failed(deadline_error(settings.job_deadline_s)))
        done = retry_redis(lambda: store.write(attempt, [], ending), retry_s)
        pool_news(done.parked)
        return ending.event.type if done.applied else "skipped"
    runtime.hold(attempt)
    began = time.perf_counter()
    run = None
    try:
        # A first attempt has nothing to resume: events are written only under a lease, which only an
        # attempt takes (a job cancelled while queued is over, and its start was refused).
        published = Published() if number == 1 else retry_redis(lambda: Published.read(store, job_id), retry_s)
        if number > settings.max_attempts:  # it keeps killing its workers: stop trying
            ending = Ending.failed(JobError(message=f"The job was started {number - 1} times without finishing.",
                                            code="too_many_attempts"))
            retry_redis(lambda: store.write(attempt, [], ending), retry_s)
            return JobStatus.FAILED.value
        if number > 1:
            log.warning("job %s: attempt %d resumes after %d published tokens", job_id, number,
                        sum(len(c.token_ids) for c in published.choices.values()))
        run = JobRun(record, attempt, runtime.tokenizer, published, deadline_at, settings.job_deadline_s)
        status = runtime.publisher.run(run)
    finally:
        runtime.release(attempt)
        pool_news(run.pool_parked if run is not None else None)
    log.info("job %s: %s in %.2f s (attempt %d)", job_id, status, time.perf_counter() - began, number)
    return status
