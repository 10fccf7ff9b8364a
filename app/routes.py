"""HTTP routes: the OpenAI-compatible API (`/v1`) and the operational probes."""
from __future__ import annotations

import re

from flask import Blueprint, current_app, g, request

from app import protocol
from app.auth import check_bearer
from app.errors import APIError
from app.serving import decode_json_body, resolve_model

api = Blueprint("api", __name__, url_prefix="/v1")
ops = Blueprint("ops", __name__)


def _service():
    return current_app.extensions["chat_service"]


def _files():
    return current_app.extensions["file_service"]


def _batches():
    return current_app.extensions["batch_service"]


@api.before_request
def _authenticate():
    g.owner = check_bearer(current_app.config["SETTINGS"].api_keys)


def _body() -> bytes:
    """The request body, at most MAX_BODY_BYTES (413 beyond). Werkzeug enforces the limit when the body has
    a Content-Length; a chunked body has none, so it is read here up to one byte past the limit."""
    if request.content_length is not None:
        return request.get_data(cache=False)
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    data = request.environ["wsgi.input"].read(limit + 1)
    if len(data) > limit:
        raise APIError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
    return data


@api.post("/chat/completions")
def chat_completions():
    return _service().create(_body(), g.owner)


# --- background jobs (submit with "background": true, then poll)
def _limit() -> int:
    raw = request.args.get("limit", "20")
    if not re.fullmatch(r"[0-9]{1,3}", raw) or not 1 <= int(raw) <= 100:
        raise APIError(400, "limit must be an integer between 1 and 100.", param="limit", code="invalid_value")
    return int(raw)


@api.get("/chat/completions")
def list_jobs():
    return _service().list_jobs(g.owner, _limit(), request.args.get("after"))


@api.get("/chat/completions/<job_id>")
def get_job(job_id: str):
    return _service().get_job(job_id, g.owner)


@api.post("/chat/completions/<job_id>/cancel")
def cancel_job(job_id: str):
    return _service().cancel_job(job_id, g.owner)


@api.get("/chat/completions/<job_id>/events")
def job_events(job_id: str):
    """The job's stream from the start, or after `starting_after` / the Last-Event-ID header (a seq)."""
    raw = request.args.get("starting_after", request.headers.get("Last-Event-ID", "-1")).strip()
    if not re.fullmatch(r"-[0-9]+|[0-9]+", raw):
        raise APIError(400, "starting_after (or Last-Event-ID) must be an event id (an integer).",
                       param="starting_after", code="invalid_value")
    # Any negative id means "from the start"; ids past any real job's end are clamped (nothing follows them).
    return _service().job_events(job_id, g.owner, max(-1, min(int(raw), 10**15)))


# --- files and batches (OpenAI's Batch API)
@api.post("/files")
def upload_file():
    return _files().upload(g.owner)


@api.get("/files")
def list_files():
    return _files().list(g.owner, _limit(), request.args.get("after"))


@api.get("/files/<file_id>")
def get_file(file_id: str):
    return _files().get(file_id, g.owner)


@api.get("/files/<file_id>/content")
def file_content(file_id: str):
    return _files().content(file_id, g.owner)


@api.delete("/files/<file_id>")
def delete_file(file_id: str):
    return _files().delete(file_id, g.owner)


@api.post("/batches")
def create_batch():
    return _batches().create(decode_json_body(_body()), g.owner)


@api.get("/batches")
def list_batches():
    return _batches().list(g.owner, _limit(), request.args.get("after"))


@api.get("/batches/<batch_id>")
def get_batch(batch_id: str):
    return _batches().get(batch_id, g.owner)


@api.post("/batches/<batch_id>/cancel")
def cancel_batch(batch_id: str):
    return _batches().cancel(batch_id, g.owner)


@api.get("/models")
def list_models():
    """The model this deployment serves (even before its first worker is up) and those with live workers."""
    created = current_app.config["STARTED_AT"]
    listed = sorted(route.id for route in current_app.extensions["models"].listed())
    return {"object": "list", "data": [protocol.model_card(model_id, created) for model_id in listed]}


@api.get("/models/<path:model_id>")
def get_model(model_id: str):
    route = resolve_model(current_app.extensions["models"], model_id)
    return protocol.model_card(route.id, current_app.config["STARTED_AT"])


@ops.get("/health")
def health():
    """The process is up. Touches nothing else, so it answers even when Redis is down."""
    return {"status": "ok"}


@ops.get("/ready")
def ready():
    """Ready to serve: Redis answers and at least one worker's heartbeat is fresh."""
    store = _service().store
    try:
        store.ping()  # every Redis node
        workers = store.live_workers()
    except Exception as exc:
        raise APIError(503, f"Redis is not reachable: {type(exc).__name__}.", code="redis_unavailable",
                       headers={"Retry-After": "5"})
    if not workers:
        raise APIError(503, "No model worker is alive.", code="no_workers", headers={"Retry-After": "5"})
    return {"status": "ready", "workers": len(workers), "models": sorted({w.get("model", "") for w in workers})}
