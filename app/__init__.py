"""Flask app factory: `gunicorn 'app:create_app()'`."""
from __future__ import annotations

from flask import Flask

from app.batches import BatchDispatcher, BatchService
from app.errors import register_error_handlers
from app.files import FileService
from app.metrics import setup_metrics
from app.openapi import openapi
from app.playground import playground
from app.protocol import now
from app.routes import api, ops
from app.serving import ChatService
from config.logging import setup_logging
from config.settings import get_settings
from jobs.batches import BatchStore
from jobs.fair_dispatch import FairDispatcher, LiveSlots
from jobs.files import FileStore
from jobs.models import ModelDirectory, model_entry
from jobs.shards import ShardedJobStore


def create_app(settings=None, enqueue=None, enqueue_batch_job=None, drive_batches: bool = True) -> Flask:
    """`enqueue(record)` / `enqueue_batch_job` put a job on its queue (Celery, through fair dispatch, and the
    batch queue by default; unit tests of this layer pass stand-ins)."""
    settings = settings or get_settings()
    setup_logging("api", secrets=settings.api_keys)
    app = Flask(__name__)
    app.config.update(SETTINGS=settings, STARTED_AT=now(), MAX_CONTENT_LENGTH=settings.max_body_bytes)
    app.json.sort_keys = False

    jobs = ShardedJobStore.from_settings(settings)  # one Redis, or several (REDIS_SHARDS)
    files = FileStore(jobs, settings.redis_prefix)  # each file on its shard, owners' indexes at home
    batches = BatchStore(jobs, settings.redis_prefix)  # a batch, its line jobs and outputs on one shard
    # The model this deployment serves is known before its first worker is up: its requests wait for it.
    models = ModelDirectory(jobs, settings.model_remember_s, configured=model_entry(settings))
    app.extensions["models"] = models
    dispatcher = FairDispatcher(jobs.fair, _send_with(enqueue, jobs), settings.fair_dispatch_margin,
                                settings.fair_dispatch_reserve, LiveSlots(jobs), settings.job_deadline_s,
                                settings.fair_dispatch_active_s)
    app.extensions["chat_service"] = ChatService(settings, jobs, models, dispatcher)
    app.extensions["file_service"] = FileService(files, settings.max_file_bytes)
    app.extensions["batch_service"] = BatchService(batches, files)
    if drive_batches:
        if enqueue_batch_job is None:
            from jobs.batch_queue import BatchQueueProducer
            enqueue_batch_job = BatchQueueProducer(settings)
        dispatcher = BatchDispatcher(settings, batches, files, jobs, models, enqueue_batch_job)
        dispatcher.start()
        app.extensions["batch_dispatcher"] = dispatcher

    from jobs.chat_format import get_tokenizer
    get_tokenizer()  # load it now, not on the first request
    register_error_handlers(app)
    app.register_blueprint(api)
    app.register_blueprint(ops)
    app.register_blueprint(playground)
    app.register_blueprint(openapi)
    setup_metrics(app, settings, jobs)  # request hooks, and GET /metrics when METRICS_ENABLED
    return app


def _send_with(enqueue, jobs: ShardedJobStore):
    """What fair dispatch sends a job with: `send(job id, queue)`, Celery's send_task by default; a stand-in
    `enqueue(record)` gets the job's record."""
    if enqueue is None:
        from jobs.celery_app import send_chat_completion
        return send_chat_completion
    return lambda job_id, queue: enqueue(jobs.get(job_id))
