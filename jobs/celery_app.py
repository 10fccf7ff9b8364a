"""The Celery application shared by the API (which only sends tasks) and the workers (which run them).

Importing this module must stay cheap and torch-free: the API imports it to enqueue. The task module,
which loads the model, is imported only by worker processes (`include`).
"""
from __future__ import annotations

from celery import Celery

from config.settings import get_settings
from jobs.redis_connection import broker_settings, is_sentinel_url

RUN_CHAT_COMPLETION = "workers.tasks.run_chat_completion"


def make_celery(settings=None) -> Celery:
    settings = settings or get_settings()
    # REDIS_URL may name a Sentinel set: kombu then gets its sentinel:// URL and the master's name
    # (jobs/redis_connection.py).
    broker_url, transport_options = broker_settings(
        settings.redis_url,
        # The Redis broker redelivers unacked messages after this, counted from delivery: keep it above the
        # longest job, or a long job runs twice.
        {"visibility_timeout": settings.visibility_timeout_s})
    app = Celery("llmq", broker=broker_url, include=["workers.tasks"])
    if is_sentinel_url(settings.redis_url):  # kombu's Sentinel transport, surviving a failover's reconnect
        from jobs.sentinel_broker import TRANSPORT
        app.conf.broker_transport = TRANSPORT
    app.conf.update(
        # Long GPU jobs: acknowledge only when done, so a dead worker's job is delivered again ...
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A broker hiccup (Redis restart) must not cancel running generations: their jobs keep their
        # leases and buffer their output until Redis is back (workers/job_runner.py).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Enqueueing while Redis is down fails fast (the API answers 503), instead of hanging.
        broker_connection_timeout=3,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5,
                                   "interval_max": 1},
        # ... and never let one worker reserve jobs it cannot start (other workers could).
        worker_prefetch_multiplier=1,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.interactive_queue,
        # Results live in our own job record (jobs.records), not in Celery's result backend.
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
    )
    return app


celery_app = make_celery()


def send_chat_completion(job_id: str, queue: str) -> None:
    """The job's message on its pool's Celery queue: what fair dispatch and the reapers send."""
    celery_app.send_task(RUN_CHAT_COMPLETION, args=[job_id], queue=queue)
