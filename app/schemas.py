"""The response models of the HTTP API, and the multipart upload form (read by app/files.py).

These, with `app.protocol.ChatCompletionRequest`, are the contract that `/openapi.json` (app/openapi.py) is
generated from. The responses are built as plain dicts (app/protocol.py, app/routes.py, jobs/files.py,
jobs/batches.py) in the exact shapes OpenAI's SDK parses; tests/unit/test_openapi.py checks that the real
responses validate against these models. Models forbid unknown fields, so a field added to a response
without its model fails that test (an error may carry extra fields, e.g. `n_ctx`).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from app.files import UPLOAD_PURPOSES

FinishReason = Literal["stop", "length"]
JobStatus = Literal["queued", "in_progress", "completed", "failed", "cancelled", "expired"]
BatchStatus = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                      "cancelled"]
Count = Annotated[int, Field(ge=0)]


class Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. n_prompt_tokens and n_ctx with context_length_exceeded

    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class Error(Response):
    """Every error (app/errors.py); an event stream's error event carries the same object."""
    error: ErrorBody


class Usage(Response):
    prompt_tokens: Count
    completion_tokens: Count
    total_tokens: Count


# --- chat completions
class AssistantMessage(Response):
    role: Literal["assistant"]
    content: str


class TopLogprob(Response):
    token: str = Field(description="The token's text; part of a character: 'bytes:' and its bytes as \\xNN.")
    logprob: float
    bytes: list[Annotated[int, Field(ge=0, le=255)]]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(max_length=20)


class ChoiceLogprobs(Response):
    content: list[TokenLogprob]
    refusal: None


class Choice(Response):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChoiceLogprobs] = Field(description="With logprobs: true; else null.")
    finish_reason: FinishReason


class ChatCompletion(Response):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[Choice] = Field(min_length=1, max_length=8)  # n (app.protocol.MAX_CHOICES)
    usage: Usage


class Delta(Response):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChunkChoice(Response):
    index: int
    delta: Delta
    logprobs: Optional[ChoiceLogprobs] = Field(description="With logprobs: true, the delta's tokens; else null.")
    finish_reason: Optional[FinishReason]


class ChatCompletionChunk(Response):
    """One `data:` event of a stream. With stream_options.include_usage, every chunk has `usage: null`
    but the last one, which has no choices and the usage."""
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice] = Field(max_length=1)
    usage: Optional[Usage] = None


class ChatCompletionJob(Response):
    """A background job, as it is polled (`expired` once its record is gone)."""
    id: str
    object: Literal["chat.completion.job"]
    status: JobStatus
    created_at: Optional[int]
    started_at: Optional[int]
    completed_at: Optional[int]
    model: Optional[str]
    result: Optional[ChatCompletion]
    error: Optional[ErrorBody]


class Page(Response):
    """A page of a list, newest first; `after=last_id` asks for the next one."""
    object: Literal["list"]
    first_id: Optional[str]
    last_id: Optional[str]
    has_more: bool


class ChatCompletionJobList(Page):
    data: list[ChatCompletionJob]


# --- files and batches
class File(Response):
    id: str
    object: Literal["file"]
    bytes: Count
    created_at: int
    filename: str
    purpose: Literal["batch", "batch_output", "batch_error"]
    status: str
    expires_at: Optional[int]
    status_details: Optional[str]


class FileList(Page):
    data: list[File]


class FileDeleted(Response):
    id: str
    object: Literal["file"]
    deleted: bool


class RequestCounts(Response):
    total: Count
    completed: Count
    failed: Count


class Batch(Response):
    id: str
    object: Literal["batch"]
    endpoint: str
    errors: Optional[dict[str, Any]]
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: Optional[str]
    error_file_id: Optional[str]
    created_at: int
    expires_at: int
    in_progress_at: Optional[int]
    finalizing_at: Optional[int]
    completed_at: Optional[int]
    failed_at: Optional[int]
    expired_at: Optional[int]
    cancelling_at: Optional[int]
    cancelled_at: Optional[int]
    request_counts: RequestCounts
    metadata: Optional[dict[str, str]]


class BatchList(Page):
    data: list[Batch]


class UploadFileRequest(BaseModel):
    """POST /v1/files, multipart/form-data (read by FileService.upload, app/files.py; other parts are ignored)."""
    file: Annotated[bytes, WithJsonSchema({"type": "string", "contentMediaType": "application/octet-stream"})] = (
        Field(description="UTF-8 JSONL: one request per line."))
    purpose: Literal[UPLOAD_PURPOSES]


# --- models and probes
class Model(Response):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(Response):
    object: Literal["list"]
    data: list[Model]


class Health(Response):
    status: Literal["ok"]


class Ready(Response):
    status: Literal["ready"]
    workers: int = Field(ge=1)
    models: list[str]
