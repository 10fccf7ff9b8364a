"""Flask app factory: `gunicorn 'app:create_app()'`."""
from __future__ import annotations

import logging

from flask import Flask

from app.errors import register_error_handlers
from app.routes import api, ops
from app.playground import playground
from app.serving import ChatService
from config.settings import get_settings
from jobs.store import JobStore
from app.protocol import now


def create_app(settings=None, enqueue=None) -> Flask:
    settings = settings or get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = Flask(__name__)
    app.config.update(SETTINGS=settings, STARTED_AT=now(), MAX_CONTENT_LENGTH=settings.max_body_bytes)
    app.json.sort_keys = False
    store = JobStore.from_settings(settings)
    app.extensions["chat_service"] = ChatService(settings, store, enqueue or _celery_enqueue(settings))
    from workers.chat_format import get_tokenizer
    get_tokenizer()  # load it now, not on the first request
    register_error_handlers(app)
    app.register_blueprint(api)
    app.register_blueprint(ops)
    app.register_blueprint(playground)
    return app


def _celery_enqueue(settings):
    from workers.celery_app import RUN_CHAT_COMPLETION, celery_app

    def enqueue(record) -> None:
        celery_app.send_task(RUN_CHAT_COMPLETION, args=[record.id], queue=settings.interactive_queue)

    return enqueue
