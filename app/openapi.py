"""`GET /openapi.json`: an OpenAPI 3.1 description of the whole HTTP API.

The chat request schema is generated from `app.protocol.ChatCompletionRequest` (pydantic emits JSON Schema
2020-12, which is what OpenAPI 3.1 uses), then completed with the rules that live outside the pydantic
field types, so that a client (or a fuzzer) generating "valid" requests from this document gets valid
requests: `null` means "the default" for every optional field (a `model_validator` does that), roles are
system/user/assistant (`jobs/chat_format.py`), contents and stop sequences are not empty, at most four
stop sequences of at most 256 characters. Rules that no JSON Schema can say (alternating roles, prompt +
max_tokens within the context window, which models are served) are in the descriptions; breaking them is
a 400 (404 for the model).

Responses are described as the code builds them (`app/protocol.py`, `jobs/files.py`, `jobs/batches.py`), and
every error is OpenAI's `{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import copy
from functools import lru_cache

from flask import Blueprint, jsonify

from app import protocol
from config.settings import SERVED_MODEL_ID

openapi = Blueprint("openapi", __name__)

REF = "#/components/schemas/{model}"


def _ref(name: str) -> dict:
    return {"$ref": REF.format(model=name)}


def _nullable(schema: dict) -> dict:
    """`schema` or null (keeping the title, description and default outside the anyOf)."""
    if "anyOf" in schema and any(s.get("type") == "null" for s in schema["anyOf"]):
        return schema
    outer = {k: schema.pop(k) for k in ("title", "description", "default") if k in schema}
    return {"anyOf": [schema, {"type": "null"}], **outer}


def chat_request_schemas() -> dict:
    """ChatCompletionRequest and the models it uses, as `components/schemas` entries."""
    schema = copy.deepcopy(protocol.ChatCompletionRequest.model_json_schema(ref_template=REF))
    defs = schema.pop("$defs", {})
    props = schema["properties"]

    # `null` is accepted for every field but `messages` (ChatCompletionRequest._null_means_default).
    for name in list(props):
        if name != "messages":
            props[name] = _nullable(props[name])

    props["model"]["description"] = (
        f"A served model (GET /v1/models), by its id or an alias, case-insensitive; default '{SERVED_MODEL_ID}'. "
        "Any other name is a 404 model_not_found.")
    props["messages"].update(minItems=1, description=(
        "After optional system messages, user and assistant turns alternate, ending with a user turn. "
        "The prompt plus max_tokens must fit the context window (else 400 context_length_exceeded)."))
    for name in ("max_tokens", "max_completion_tokens"):
        props[name]["description"] = "At least 1; defaults to %d. Prompt + max_tokens must fit the context." % (
            protocol.DEFAULT_MAX_TOKENS)
    stop_string = {"type": "string", "minLength": 1, "maxLength": protocol.MAX_STOP_LENGTH}
    props["stop"] = {"anyOf": [stop_string, {"type": "array", "items": stop_string,
                                             "maxItems": protocol.MAX_STOP_SEQUENCES},
                               {"type": "null"}], "default": None, "title": "Stop"}
    props["stream"]["description"] = "Answer with server-sent events (text/event-stream)."
    props["background"]["description"] = "Answer 202 with a job object at once; poll or replay its events."

    message = defs["ChatMessage"]
    message["properties"]["role"] = {"type": "string", "enum": ["system", "user", "assistant"], "title": "Role"}
    content = message["properties"]["content"]
    content["anyOf"][0]["minLength"] = 1   # an empty content is refused
    content["anyOf"][1]["minItems"] = 1
    return {**defs, "ChatCompletionRequest": schema}


# --- response schemas (as app/protocol.py, jobs/files.py and jobs/batches.py build them)
_STR_OR_NULL = {"type": ["string", "null"]}
_INT_OR_NULL = {"type": ["integer", "null"]}

ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": _STR_OR_NULL, "code": _STR_OR_NULL},
    }},
}
USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
         "properties": {k: {"type": "integer", "minimum": 0}
                        for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}
CHAT_COMPLETION = {
    "type": "object",
    "required": ["id", "object", "created", "model", "system_fingerprint", "choices", "usage"],
    "properties": {
        "id": {"type": "string"}, "object": {"const": "chat.completion"}, "created": {"type": "integer"},
        "model": {"type": "string"}, "system_fingerprint": {"type": "string"},
        "choices": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
            "type": "object", "required": ["index", "message", "logprobs", "finish_reason"],
            "properties": {
                "index": {"type": "integer"},
                "message": {"type": "object", "required": ["role", "content"],
                            "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}}},
                "logprobs": {"type": "null"},
                "finish_reason": {"enum": ["stop", "length"]},
            }}},
        "usage": _ref("Usage"),
    },
}
JOB_ERROR = {"type": "object", "required": ["message", "type"],
             "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                            "param": _STR_OR_NULL, "code": _STR_OR_NULL}}
JOB = {
    "type": "object",
    "required": ["id", "object", "status", "created_at", "started_at", "completed_at", "model", "result", "error"],
    "properties": {
        "id": {"type": "string"}, "object": {"const": "chat.completion.job"},
        "status": {"enum": ["queued", "in_progress", "completed", "failed", "cancelled", "expired"]},
        "created_at": _INT_OR_NULL, "started_at": _INT_OR_NULL, "completed_at": _INT_OR_NULL,
        "model": _STR_OR_NULL,
        "result": {"anyOf": [_ref("ChatCompletion"), {"type": "null"}]},
        "error": {"anyOf": [_ref("JobError"), {"type": "null"}]},
    },
}
FILE = {
    "type": "object",
    "required": ["id", "object", "bytes", "created_at", "filename", "purpose", "status"],
    "properties": {
        "id": {"type": "string"}, "object": {"const": "file"}, "bytes": {"type": "integer", "minimum": 0},
        "created_at": {"type": "integer"}, "filename": {"type": "string"},
        "purpose": {"enum": ["batch", "batch_output", "batch_error"]}, "status": {"type": "string"},
        "expires_at": _INT_OR_NULL, "status_details": _STR_OR_NULL,
    },
}
FILE_DELETED = {"type": "object", "required": ["id", "object", "deleted"],
                "properties": {"id": {"type": "string"}, "object": {"const": "file"},
                               "deleted": {"type": "boolean"}}}
BATCH = {
    "type": "object",
    "required": ["id", "object", "endpoint", "errors", "input_file_id", "completion_window", "status",
                 "output_file_id", "error_file_id", "created_at", "expires_at", "request_counts", "metadata"],
    "properties": {
        "id": {"type": "string"}, "object": {"const": "batch"}, "endpoint": {"type": "string"},
        "errors": {"anyOf": [{"type": "object"}, {"type": "null"}]},
        "input_file_id": {"type": "string"}, "completion_window": {"type": "string"},
        "status": {"enum": ["validating", "failed", "in_progress", "finalizing", "completed", "expired",
                            "cancelling", "cancelled"]},
        "output_file_id": _STR_OR_NULL, "error_file_id": _STR_OR_NULL,
        "created_at": {"type": "integer"}, "expires_at": {"type": "integer"},
        **{name: _INT_OR_NULL for name in ("in_progress_at", "finalizing_at", "completed_at", "failed_at",
                                           "expired_at", "cancelling_at", "cancelled_at")},
        "request_counts": {"type": "object", "required": ["total", "completed", "failed"],
                           "properties": {k: {"type": "integer", "minimum": 0}
                                          for k in ("total", "completed", "failed")}},
        "metadata": {"anyOf": [{"type": "object", "additionalProperties": {"type": "string"}},
                               {"type": "null"}]},
    },
}
MODEL = {"type": "object", "required": ["id", "object", "created", "owned_by"],
         "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                        "owned_by": {"type": "string"}}}


def _list_of(item: str, paged: bool = True) -> dict:
    schema = {"type": "object", "required": ["object", "data"],
              "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref(item)}}}
    if paged:
        schema["required"] += ["first_id", "last_id", "has_more"]
        schema["properties"].update(first_id=_STR_OR_NULL, last_id=_STR_OR_NULL, has_more={"type": "boolean"})
    return schema


# --- responses and parameters
def _json(description: str, schema: dict, headers: dict | None = None) -> dict:
    response = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def _error(description: str) -> dict:
    return _json(description, _ref("Error"))


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "string"}}}
ERRORS = {
    "400": _error("Invalid request: `error.param` names the offending field."),
    "401": _error("Missing or wrong API key (only when the server has API_KEYS)."),
    "404": _error("No such object (or model), or not yours."),
    "405": _error("Method not allowed."),
    "413": _error("Request body too large."),
    "429": _json("Too many requests.", _ref("Error"), _RETRY_AFTER),
    "503": _json("Redis or the job queue is unavailable, or the model's queue is full while no worker serves it "
                 "yet.", _ref("Error"), _RETRY_AFTER),
}


def _errors(*codes: str) -> dict:
    return {code: ERRORS[code] for code in codes}


_COMMON = ("400", "401", "404", "405", "429", "503")
_SSE = {"text/event-stream": {"schema": {
    "type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"},
                                     "id": {"type": "string"}},
    "description": (
    "`data: {chat.completion.chunk}` events, then `data: [DONE]`; or one `data: {\"error\": {...}}` event "
    "if the job fails or is cancelled. While idle, `: keep-alive` comment lines, each without a blank line "
    "after it, so that it never ends an event. Each job event has an `id:` "
    "(its sequence number) for Last-Event-ID. Each event, as a client parses it, is described here.")}}}

LIMIT = {"name": "limit", "in": "query", "required": False, "description": "Page size (1 to 100, default 20).",
         "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}}
AFTER = {"name": "after", "in": "query", "required": False,
         "description": "An id from the previous page: list the objects older than it.", "schema": {"type": "string"}}


def _path_param(name: str, description: str) -> dict:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": {"type": "string"}}


JOB_ID = _path_param("job_id", "A chat completion (job) id, `chatcmpl-...`.")
FILE_ID = _path_param("file_id", "A file id, `file-...`.")
BATCH_ID = _path_param("batch_id", "A batch id, `batch_...`.")


def _op(operation_id: str, summary: str, responses: dict, *, tags: list[str], parameters: list | None = None,
        request_body: dict | None = None, public: bool = False) -> dict:
    op = {"operationId": operation_id, "summary": summary, "tags": tags, "responses": responses}
    if parameters:
        op["parameters"] = parameters
    if request_body:
        op["requestBody"] = request_body
    if public:
        op["security"] = []
    return op


def build_document() -> dict:
    schemas = {
        **chat_request_schemas(),
        "Error": ERROR, "Usage": USAGE, "ChatCompletion": CHAT_COMPLETION, "JobError": JOB_ERROR,
        "ChatCompletionJob": JOB, "ChatCompletionJobList": _list_of("ChatCompletionJob"),
        "File": FILE, "FileList": _list_of("File"), "FileDeleted": FILE_DELETED,
        "Batch": BATCH, "BatchList": _list_of("Batch"),
        "CreateBatchRequest": {
            "type": "object", "additionalProperties": False,
            "required": ["input_file_id", "endpoint", "completion_window"],
            "properties": {
                "input_file_id": {"type": "string", "description": "A file uploaded with purpose 'batch'."},
                "endpoint": {"enum": ["/v1/chat/completions"]},
                "completion_window": {"enum": ["24h"]},
                "metadata": {"anyOf": [{"type": "object", "maxProperties": 16,
                                        "additionalProperties": {"type": "string"}}, {"type": "null"}]},
            },
        },
        "UploadFileRequest": {
            "type": "object", "required": ["file", "purpose"],
            "properties": {"file": {"type": "string", "contentMediaType": "application/octet-stream",
                                    "description": "UTF-8 JSONL: one request per line."},
                           "purpose": {"enum": ["batch"]}},
        },
        "Model": MODEL, "ModelList": _list_of("Model", paged=False),
        "Health": {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}},
        "Ready": {"type": "object", "required": ["status", "workers", "models"],
                  "properties": {"status": {"const": "ready"}, "workers": {"type": "integer", "minimum": 1},
                                 "models": {"type": "array", "items": {"type": "string"}}}},
    }
    chat_responses = {
        "200": {"description": "The completion; with `stream: true`, server-sent events.",
                "content": {"application/json": {"schema": _ref("ChatCompletion")}, **_SSE}},
        "202": _json("With `background: true`: the job, queued.", _ref("ChatCompletionJob")),
        **_errors("400", "401", "404", "405", "413", "429"),
        "409": _error("The job was cancelled before it finished."),
        "500": {**_error("The worker failed (sent with x-should-retry: false)."),
                "headers": {"x-should-retry": {"schema": {"type": "string"}}}},
        "503": ERRORS["503"],
        "504": _error("The job did not finish within REQUEST_TIMEOUT_S (it is cancelled)."),
    }
    paths = {
        "/v1/chat/completions": {
            "post": _op("createChatCompletion", "Create a chat completion (JSON, streamed, or in the background).",
                        chat_responses, tags=["chat"], request_body={
                            "required": True,
                            "content": {"application/json": {"schema": _ref("ChatCompletionRequest")}}}),
            "get": _op("listChatCompletionJobs", "List your chat completion jobs, newest first.",
                       {"200": _json("A page of jobs.", _ref("ChatCompletionJobList")), **_errors(*_COMMON)},
                       tags=["chat"], parameters=[LIMIT, AFTER]),
        },
        "/v1/chat/completions/{job_id}": {
            "get": _op("getChatCompletionJob", "Poll a job (status `expired` once its record is gone).",
                       {"200": _json("The job.", _ref("ChatCompletionJob")), **_errors(*_COMMON)},
                       tags=["chat"], parameters=[JOB_ID]),
        },
        "/v1/chat/completions/{job_id}/cancel": {
            "post": _op("cancelChatCompletionJob", "Cancel a job (a no-op once it has finished).",
                        {"200": _json("The job.", _ref("ChatCompletionJob")), **_errors(*_COMMON)},
                        tags=["chat"], parameters=[JOB_ID]),
        },
        "/v1/chat/completions/{job_id}/events": {
            "get": _op("getChatCompletionJobEvents", "Replay a job's stream from the start or after an event id.",
                       {"200": {"description": "Server-sent events, as a streamed completion.", "content": _SSE},
                        **_errors(*_COMMON)},
                       tags=["chat"], parameters=[
                           JOB_ID,
                           {"name": "starting_after", "in": "query", "required": False,
                            "description": "Replay the events after this event id (default: from the start).",
                            "schema": {"type": "integer", "minimum": -1}},
                           {"name": "Last-Event-ID", "in": "header", "required": False,
                            "description": "As starting_after (the query parameter wins).",
                            "schema": {"type": "integer", "minimum": -1}}]),
        },
        "/v1/files": {
            "post": _op("uploadFile", "Upload a batch input file (multipart/form-data).",
                        {"200": _json("The file.", _ref("File")), **_errors(*_COMMON, "413")}, tags=["files"],
                        request_body={"required": True, "content": {"multipart/form-data": {
                            "schema": _ref("UploadFileRequest")}}}),
            "get": _op("listFiles", "List your files, newest first.",
                       {"200": _json("A page of files.", _ref("FileList")), **_errors(*_COMMON)},
                       tags=["files"], parameters=[LIMIT, AFTER]),
        },
        "/v1/files/{file_id}": {
            "get": _op("retrieveFile", "A file's metadata.",
                       {"200": _json("The file.", _ref("File")), **_errors(*_COMMON)},
                       tags=["files"], parameters=[FILE_ID]),
            "delete": _op("deleteFile", "Delete a file.",
                          {"200": _json("Deleted.", _ref("FileDeleted")), **_errors(*_COMMON)},
                          tags=["files"], parameters=[FILE_ID]),
        },
        "/v1/files/{file_id}/content": {
            "get": _op("downloadFile", "A file's content (JSONL).",
                       {"200": {"description": "The file's lines.",
                                "content": {"application/octet-stream": {"schema": {"type": "string"}}}},
                        **_errors(*_COMMON)},
                       tags=["files"], parameters=[FILE_ID]),
        },
        "/v1/batches": {
            "post": _op("createBatch", "Start a batch over an uploaded file.",
                        {"200": _json("The batch.", _ref("Batch")), **_errors(*_COMMON, "413")}, tags=["batches"],
                        request_body={"required": True, "content": {"application/json": {
                            "schema": _ref("CreateBatchRequest")}}}),
            "get": _op("listBatches", "List your batches, newest first.",
                       {"200": _json("A page of batches.", _ref("BatchList")), **_errors(*_COMMON)},
                       tags=["batches"], parameters=[LIMIT, AFTER]),
        },
        "/v1/batches/{batch_id}": {
            "get": _op("retrieveBatch", "A batch.",
                       {"200": _json("The batch.", _ref("Batch")), **_errors(*_COMMON)},
                       tags=["batches"], parameters=[BATCH_ID]),
        },
        "/v1/batches/{batch_id}/cancel": {
            "post": _op("cancelBatch", "Cancel a batch (a no-op once it has finished).",
                        {"200": _json("The batch.", _ref("Batch")), **_errors(*_COMMON)},
                        tags=["batches"], parameters=[BATCH_ID]),
        },
        "/v1/models": {
            "get": _op("listModels", "The model this deployment serves (from its start, before its first "
                                     "worker is up) and the models that have live workers now.",
                       {"200": _json("The models.", _ref("ModelList")), **_errors("401", "405", "429", "503")},
                       tags=["models"]),
        },
        "/v1/models/{model_id}": {
            "get": _op("retrieveModel", "A served model, by its id or an alias (case-insensitive).",
                       {"200": _json("The model.", _ref("Model")), **_errors("401", "404", "405", "429", "503")},
                       tags=["models"], parameters=[_path_param("model_id", "A model id (it may contain '/').")]),
        },
        "/health": {
            "get": _op("health", "The process is up (touches nothing else).",
                       {"200": _json("Up.", _ref("Health"))}, tags=["ops"], public=True),
        },
        "/ready": {
            "get": _op("ready", "Redis answers and at least one worker's heartbeat is fresh.",
                       {"200": _json("Ready.", _ref("Ready")),
                        "503": _json("Not ready.", _ref("Error"), _RETRY_AFTER)}, tags=["ops"], public=True),
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "llm-queue", "version": "0.1.0", "description": (
            "An OpenAI-compatible chat-completion API served from a Redis-backed Celery job queue.")},
        "security": [{"bearerAuth": []}],
        "tags": [{"name": name} for name in ("chat", "files", "batches", "models", "ops")],
        "paths": paths,
        "components": {
            "schemas": schemas,
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
