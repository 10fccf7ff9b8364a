"""Celery tasks and worker lifecycle. Imported only by worker processes (it loads torch and the model).

The worker runs the threads pool: one process holds one model and one engine, and each Celery thread runs
one job against it. The model is loaded in this process (never in a parent that forks), once, when the
worker is ready, so no user request waits for it.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time

from celery.signals import worker_ready, worker_shutdown

from config.settings import get_settings
from jobs.records import JobError
from jobs.store import JobNotFound, JobStore
from workers.celery_app import RUN_CHAT_COMPLETION, celery_app
from workers.chat_format import raw_tokenizer

log = logging.getLogger("workers")


class WorkerRuntime:
    """What one worker process holds: the model, its engine, the tokenizer and a heartbeat."""

    def __init__(self):
        from workers.engine.engine import Engine
        from workers.model_loader import load_model

        self.settings = get_settings()
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.store = JobStore.from_settings(self.settings)
        self.tokenizer = raw_tokenizer()
        started = time.perf_counter()
        loaded = load_model(self.settings)
        log.info("serving model %s on %s (%s); loaded in %.1f s", loaded.name, loaded.device, loaded.reason,
                 time.perf_counter() - started)
        self.model_name = loaded.name
        self.engine = Engine(loaded.model, loaded.device, eos_token_id=self.tokenizer.eos_id)
        self._heartbeat_stop = threading.Event()
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()
        from workers.batch_consumer import BatchConsumer
        self.batch_consumer = BatchConsumer(self.settings, lambda job_id: execute_job(self, job_id))
        self.batch_consumer.start(self.settings.effective_batch_slots)

    def _heartbeat(self) -> None:
        info = {"name": self.name, "model": self.model_name, "queue": self.settings.interactive_queue,
                "started_at": time.time()}
        while not self._heartbeat_stop.is_set():
            try:
                self.store.heartbeat(self.name, info, self.settings.heartbeat_ttl_s)
            except Exception as exc:  # Redis away: keep trying, the worker itself is fine
                log.warning("heartbeat failed: %s", exc)
            self._heartbeat_stop.wait(self.settings.heartbeat_interval_s)

    def stop(self) -> None:
        self._heartbeat_stop.set()
        self.batch_consumer.stop()
        try:
            self.store.remove_heartbeat(self.name)
        except Exception:
            pass
        self.engine.shutdown()


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


@worker_shutdown.connect
def _stop_runtime(**_):
    if _runtime is not None:
        _runtime.stop()


@celery_app.task(name=RUN_CHAT_COMPLETION)
def run_chat_completion(job_id: str) -> str:
    return execute_job(get_runtime(), job_id)


def execute_job(runtime: WorkerRuntime, job_id: str) -> str:
    """Run one job by id (from Celery's interactive queue or the batch queue); returns its final status."""
    from workers.job_runner import JobEvents, run_job

    store = runtime.store
    try:
        record = store.get(job_id)
    except JobNotFound:
        log.warning("job %s: no record (expired?), skipped", job_id)
        return "missing"
    if record.status.is_terminal:  # delivered again after it finished: acknowledge and skip
        log.info("job %s: already %s, skipped", job_id, record.status.value)
        return record.status.value
    events = JobEvents(store, job_id)
    if store.is_cancel_requested(job_id):
        return events.cancelled().value
    if not store.mark_in_progress(job_id, runtime.name):  # cancelled (or finished) while it was queued
        return store.get(job_id).status.value
    started = time.perf_counter()
    try:
        status = run_job(runtime.engine, runtime.tokenizer, events, record)
    except Exception as exc:  # the client must hear about it, and the record must say why
        log.exception("job %s failed", job_id)
        runtime.engine.cancel(job_id)
        status = events.failed(JobError(message=f"The model worker failed: {type(exc).__name__}: {exc}",
                                        code="worker_error"))
    log.info("job %s: %s in %.2f s", job_id, status.value, time.perf_counter() - started)
    return status.value
