"""`GET /openapi.json`: the OpenAPI 3.1 document of the HTTP API, generated from its pydantic models.

The contract is the models (pydantic emits JSON Schema 2020-12, which is what OpenAPI 3.1 uses):
  - request bodies: `app.protocol.ChatCompletionRequest` and `CreateBatchRequest`, the models the chat and
    batch routes validate with, and `app.schemas.UploadFileRequest`, which describes the multipart form that
    app/files.py reads;
  - responses: the models of `app/schemas.py`, which the real responses validate against (tested), every
    error being OpenAI's `{"error": {"message", "type", "param", "code"}}` (`schemas.Error`).
This module only says which route takes and answers which model, with which status codes, parameters and
security. Rules that no JSON Schema can say (alternating roles, prompt + max_tokens within the context
window, which models are served) are in the models' descriptions; breaking them is a 400 (404 for the model).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

from flask import Blueprint, jsonify
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from app import schemas as s
from app.protocol import ChatCompletionRequest, CreateBatchRequest

openapi = Blueprint("openapi", __name__)

REF = "#/components/schemas/{model}"
REQUESTS = (ChatCompletionRequest, CreateBatchRequest, s.UploadFileRequest)
RESPONSES = (s.Error, s.ChatCompletion, s.ChatCompletionChunk, s.ChatCompletionJob, s.ChatCompletionJobList,
             s.File, s.FileList, s.FileDeleted, s.Batch, s.BatchList, s.Model, s.ModelList, s.Health, s.Ready)


def component_schemas() -> dict:
    """The request and response models, and every model they use, as `components/schemas` (by class name)."""
    models = [(model, "validation") for model in REQUESTS] + [(model, "serialization") for model in RESPONSES]
    return models_json_schema(models, ref_template=REF)[1]["$defs"]


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": REF.format(model=model.__name__)}


def _json(description: str, model: type[BaseModel], headers: Optional[dict] = None) -> dict:
    response = {"description": description, "content": {"application/json": {"schema": _ref(model)}}}
    return {**response, "headers": headers} if headers else response


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "string"}}}
ERRORS = {
    "400": _json("Invalid request: `error.param` names the offending field.", s.Error),
    "401": _json("Missing or wrong API key (only when the server has API_KEYS).", s.Error),
    "404": _json("No such object (or model), or not yours.", s.Error),
    "405": _json("Method not allowed.", s.Error),
    "409": _json("The job was cancelled before it finished.", s.Error),
    "413": _json("Request body too large.", s.Error),
    "429": _json("Too many requests.", s.Error, _RETRY_AFTER),
    "500": _json("The worker failed (sent with x-should-retry: false).", s.Error,
                 {"x-should-retry": {"schema": {"type": "string"}}}),
    "503": _json("Redis or the job queue is unavailable, or the model's queue is full while no worker serves it "
                 "yet.", s.Error, _RETRY_AFTER),
    "504": _json("The job did not finish within REQUEST_TIMEOUT_S (it is cancelled).", s.Error),
}
COMMON = ("400", "401", "404", "405", "429", "503")
SSE = {"text/event-stream": {"schema": {
    "type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"},
                                     "id": {"type": "string"}},
    "description": (
        "`data: {chat.completion.chunk}` events (ChatCompletionChunk), then `data: [DONE]`; or one "
        "`data: {\"error\": {...}}` event (Error) if the job fails or is cancelled. While idle, `: keep-alive` "
        "comment lines, each without a blank line after it, so that it never ends an event. Each job event has "
        "an `id:` (its sequence number) for Last-Event-ID. Each event, as a client parses it, is described here.")}}}

LIMIT = {"name": "limit", "in": "query", "required": False, "description": "Page size (1 to 100, default 20).",
         "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}}
AFTER = {"name": "after", "in": "query", "required": False,
         "description": "An id from the previous page: list the objects older than it.", "schema": {"type": "string"}}
EVENT_ID = {"type": "integer", "minimum": -1}
EVENTS_CURSOR = [
    {"name": "starting_after", "in": "query", "required": False, "schema": EVENT_ID,
     "description": "Replay the events after this event id (default: from the start)."},
    {"name": "Last-Event-ID", "in": "header", "required": False, "schema": EVENT_ID,
     "description": "As starting_after (the query parameter wins)."}]


def _path_param(name: str, description: str) -> dict:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": {"type": "string"}}


JOB_ID = _path_param("job_id", "A chat completion (job) id, `chatcmpl-...`.")
FILE_ID = _path_param("file_id", "A file id, `file-...`.")
BATCH_ID = _path_param("batch_id", "A batch id, `batch_...`.")
MODEL_ID = _path_param("model_id", "A model id (it may contain '/').")


def _op(operation_id: str, summary: str, tag: str, ok: dict, errors=COMMON, *, parameters: Optional[list] = None,
        body: Optional[type[BaseModel]] = None, media: str = "application/json", public: bool = False) -> dict:
    """One operation: `ok` are its success responses, `errors` the codes of its error responses."""
    op = {"operationId": operation_id, "summary": summary, "tags": [tag],
          "responses": {**ok, **{code: ERRORS[code] for code in errors}}}
    if parameters:
        op["parameters"] = parameters
    if body:
        op["requestBody"] = {"required": True, "content": {media: {"schema": _ref(body)}}}
    if public:
        op["security"] = []
    return op


def paths() -> dict:
    chat_ok = {"200": {"description": "The completion; with `stream: true`, server-sent events.",
                       "content": {"application/json": {"schema": _ref(s.ChatCompletion)}, **SSE}},
               "202": _json("With `background: true`: the job, queued.", s.ChatCompletionJob)}
    job = {"200": _json("The job.", s.ChatCompletionJob)}
    file = {"200": _json("The file.", s.File)}
    batch = {"200": _json("The batch.", s.Batch)}
    return {
        "/v1/chat/completions": {
            "post": _op("createChatCompletion", "Create a chat completion (JSON, streamed, or in the background).",
                        "chat", chat_ok, ("400", "401", "404", "405", "409", "413", "429", "500", "503", "504"),
                        body=ChatCompletionRequest),
            "get": _op("listChatCompletionJobs", "List your chat completion jobs, newest first.", "chat",
                       {"200": _json("A page of jobs.", s.ChatCompletionJobList)}, parameters=[LIMIT, AFTER]),
        },
        "/v1/chat/completions/{job_id}": {
            "get": _op("getChatCompletionJob", "Poll a job (status `expired` once its record is gone).", "chat", job,
                       parameters=[JOB_ID]),
        },
        "/v1/chat/completions/{job_id}/cancel": {
            "post": _op("cancelChatCompletionJob", "Cancel a job (a no-op once it has finished).", "chat", job,
                        parameters=[JOB_ID]),
        },
        "/v1/chat/completions/{job_id}/events": {
            "get": _op("getChatCompletionJobEvents", "Replay a job's stream from the start or after an event id.",
                       "chat", {"200": {"description": "Server-sent events, as a streamed completion.",
                                        "content": SSE}}, parameters=[JOB_ID, *EVENTS_CURSOR]),
        },
        "/v1/files": {
            "post": _op("uploadFile", "Upload a batch input file (multipart/form-data).", "files", file,
                        (*COMMON, "413"), body=s.UploadFileRequest, media="multipart/form-data"),
            "get": _op("listFiles", "List your files, newest first.", "files",
                       {"200": _json("A page of files.", s.FileList)}, parameters=[LIMIT, AFTER]),
        },
        "/v1/files/{file_id}": {
            "get": _op("retrieveFile", "A file's metadata.", "files", file, parameters=[FILE_ID]),
            "delete": _op("deleteFile", "Delete a file.", "files", {"200": _json("Deleted.", s.FileDeleted)},
                          parameters=[FILE_ID]),
        },
        "/v1/files/{file_id}/content": {
            "get": _op("downloadFile", "A file's content (JSONL).", "files", {"200": {
                "description": "The file's lines.",
                "content": {"application/octet-stream": {"schema": {"type": "string"}}}}}, parameters=[FILE_ID]),
        },
        "/v1/batches": {
            "post": _op("createBatch", "Start a batch over an uploaded file.", "batches", batch, (*COMMON, "413"),
                        body=CreateBatchRequest),
            "get": _op("listBatches", "List your batches, newest first.", "batches",
                       {"200": _json("A page of batches.", s.BatchList)}, parameters=[LIMIT, AFTER]),
        },
        "/v1/batches/{batch_id}": {
            "get": _op("retrieveBatch", "A batch.", "batches", batch, parameters=[BATCH_ID]),
        },
        "/v1/batches/{batch_id}/cancel": {
            "post": _op("cancelBatch", "Cancel a batch (a no-op once it has finished).", "batches", batch,
                        parameters=[BATCH_ID]),
        },
        "/v1/models": {
            "get": _op("listModels", "The model this deployment serves (from its start, before its first "
                                     "worker is up) and the models that have live workers now.", "models",
                       {"200": _json("The models.", s.ModelList)}, ("401", "405", "429", "503")),
        },
        "/v1/models/{model_id}": {
            "get": _op("retrieveModel", "A served model, by its id or an alias (case-insensitive).", "models",
                       {"200": _json("The model.", s.Model)}, ("401", "404", "405", "429", "503"),
                       parameters=[MODEL_ID]),
        },
        "/health": {
            "get": _op("health", "The process is up (touches nothing else).", "ops",
                       {"200": _json("Up.", s.Health)}, (), public=True),
        },
        "/ready": {
            "get": _op("ready", "Redis answers and at least one worker's heartbeat is fresh.", "ops",
                       {"200": _json("Ready.", s.Ready), "503": _json("Not ready.", s.Error, _RETRY_AFTER)}, (),
                       public=True),
        },
    }


def build_document() -> dict:
    return {
        "openapi": "3.1.0",
        "info": {"title": "llm-queue", "version": "0.1.0", "description": (
            "An OpenAI-compatible chat-completion API served from a Redis-backed Celery job queue.")},
        "security": [{"bearerAuth": []}],
        "tags": [{"name": name} for name in ("chat", "files", "batches", "models", "ops")],
        "paths": paths(),
        "components": {
            "schemas": component_schemas(),
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "description": (
                "One of API_KEYS. When the server runs without API_KEYS, auth is off.")}},
        },
    }


@lru_cache(maxsize=1)
def _document() -> dict:
    return build_document()


@openapi.get("/openapi.json")
def openapi_json():
    return jsonify(_document())
