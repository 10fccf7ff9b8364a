"""The wire format: the chat request model of the OpenAI-compatible API (pydantic), and the builders of its
responses (whose models are in app/schemas.py).

Validation rules here are the provider docs' ranges; `serving.py` holds the logic. Requests are parsed in
strict mode (a string is not a number) and unknown fields are refused, as OpenAI does. This model is also
the request schema of `/openapi.json` (app/openapi.py): a rule checked outside the pydantic types (a check
before validation, a validator, jobs/chat_format.py) is declared next to its field with `Rule`, so that the
schema shows it, and one that no JSON Schema can say is in the field's description.
"""
from __future__ import annotations

import time
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from config.settings import SERVED_MODEL_ID
from jobs.batches import COMPLETION_WINDOWS
from jobs.chat_format import SUPPORTED_ROLES, is_valid_unicode

DEFAULT_MAX_TOKENS = 1024
MAX_MESSAGES = 10000        # checked before validation, so a huge bad array cannot stall the server
MAX_CONTENT_PARTS = 256
MAX_STOP_SEQUENCES = 4      # OpenAI's limit
MAX_STOP_LENGTH = 256       # characters per stop sequence
INT64_MAX = 2**63 - 1
NOT_NULLABLE = ("messages",)  # every other field takes `null` for "the default" (_null_means_default)


class Rule:
    """JSON Schema keywords for a rule that is checked outside the pydantic type: `Annotated[T, Rule(...)]`
    adds them to T's schema, and leaves validation (and its error messages) as they are."""

    def __init__(self, **keywords):
        self.keywords = keywords

    def __get_pydantic_json_schema__(self, core_schema, handler):
        return {**handler(core_schema), **self.keywords}


def _nullable(schema: dict) -> dict:
    """`schema` or null (keeping the title, description and default outside the anyOf)."""
    if "anyOf" in schema and {"type": "null"} in schema["anyOf"]:
        return schema
    outer = {k: schema.pop(k) for k in ("title", "description", "default") if k in schema}
    return {"anyOf": [schema, {"type": "null"}], **outer}


def _null_for_defaults(schema: dict, model=None) -> None:
    """A model's `json_schema_extra`: every field but those NOT_NULLABLE also takes null."""
    for name, field in schema["properties"].items():
        if name not in NOT_NULLABLE:
            schema["properties"][name] = _nullable(field)


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TextContentPart(StrictModel):
    type: Literal["text"]
    text: str


StopString = Annotated[str, Rule(minLength=1, maxLength=MAX_STOP_LENGTH)]  # _check_stop


class ChatMessage(StrictModel):
    role: Annotated[str, Rule(enum=list(SUPPORTED_ROLES))] = Field(description=(
        "Checked with the conversation (jobs/chat_format.py): another role is a 400 invalid_conversation."))
    # An empty content is refused with the conversation; the number of parts is checked before validation.
    content: Union[Annotated[str, Rule(minLength=1)],
                   Annotated[list[TextContentPart], Rule(minItems=1, maxItems=MAX_CONTENT_PARTS)]]
    name: Optional[str] = None

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(StrictModel):
    include_usage: bool = False


class TextFormat(StrictModel):
    type: Literal["text"]


class JsonObjectFormat(StrictModel):
    type: Literal["json_object"]


class JsonSchemaSpec(StrictModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: Optional[str] = None
    # (`schema` would shadow a pydantic method: the field is schema_ under the wire name "schema")
    schema_: Optional[dict] = Field(default=None, alias="schema", description=(
        "A JSON Schema the output must be valid against, enforced token by token; an unsupported or invalid "
        "schema is a 400 naming response_format. Absent: any JSON value."))
    strict: Optional[bool] = None


class JsonSchemaFormat(StrictModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[Union[TextFormat, JsonObjectFormat, JsonSchemaFormat], Field(discriminator="type")]
MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 8
MAX_LOGIT_BIAS = 300  # entries (OpenAI's limit)


_MAX_TOKENS = f"At least 1; defaults to {DEFAULT_MAX_TOKENS}. Prompt + max_tokens must fit the context."


class ChatCompletionRequest(StrictModel):
    model_config = ConfigDict(json_schema_extra=_null_for_defaults)

    model: str = Field(default=SERVED_MODEL_ID, description=(
        f"A served model (GET /v1/models), by its id or an alias, case-insensitive; default '{SERVED_MODEL_ID}'. "
        "Any other name is a 404 model_not_found."))
    # The array's length is checked before validation (serving.parse_request).
    messages: Annotated[list[ChatMessage], Rule(minItems=1, maxItems=MAX_MESSAGES)] = Field(description=(
        "After optional system messages, user and assistant turns alternate, ending with a user turn. "
        "The prompt plus max_tokens must fit the context window (else 400 context_length_exceeded)."))
    max_tokens: Optional[int] = Field(default=None, ge=1, description=_MAX_TOKENS)
    # Newer OpenAI SDKs send this name; it means the same as max_tokens.
    max_completion_tokens: Optional[int] = Field(default=None, ge=1, description=_MAX_TOKENS)
    stream: bool = Field(default=False, description="Answer with server-sent events (text/event-stream).")
    stream_options: Optional[StreamOptions] = None
    temperature: float = Field(default=0.3, ge=0.0, le=1.0)
    top_p: float = Field(default=1.0, ge=0.0, le=1.0)
    stop: Union[StopString, Annotated[list[StopString], Rule(maxItems=MAX_STOP_SEQUENCES)], None] = None
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int = Field(default=0, ge=-(2**63), le=INT64_MAX)
    # Accepted for compatibility with what OpenAI clients send, within what this server does.
    # Submit and poll: answer 202 with a job object at once (GET /v1/chat/completions/{id} to poll).
    background: bool = Field(default=False, description=(
        "Answer 202 with a job object at once; poll or replay its events."))
    n: int = Field(default=1, ge=1, le=MAX_CHOICES, description=(
        "Choices to generate, each with its own randomness (choice 0 draws what n = 1 would); they share the "
        "prompt's prefill. usage counts all choices' tokens."))
    user: Optional[str] = None
    logprobs: bool = Field(default=False, description=(
        "Return each output token's log probability (of the model's own distribution, before temperature, "
        "penalties and logit_bias) in choices[].logprobs.content, streamed and not."))
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS, description=(
        "With logprobs: also the most likely tokens at each position, this many. Needs logprobs: true."))
    logit_bias: Optional[Annotated[dict[str, float], Rule(maxProperties=MAX_LOGIT_BIAS)]] = Field(
        default=None, description=(
            "Token id (as a string) to a bias in -100..100, added to the token's logit before sampling. "
            "An id outside the vocabulary is a 400 naming logit_bias."))
    response_format: Optional[ResponseFormat] = Field(default=None, description=(
        "{'type': 'text'} (the default), {'type': 'json_object'} (a JSON object) or {'type': 'json_schema', "
        "'json_schema': {'name', 'schema', 'strict'}}: the output is made to follow it by constrained decoding."))

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data):
        """OpenAI accepts `null` for optional fields: treat it as "not given"."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k in NOT_NULLABLE}
        return data

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        for stop in stops:
            if not stop:
                raise ValueError("stop sequences must not be empty")
            if not is_valid_unicode(stop):
                raise ValueError("stop sequences must be valid Unicode (no lone surrogates)")
            if len(stop) > MAX_STOP_LENGTH:
                raise ValueError(f"a stop sequence must be at most {MAX_STOP_LENGTH} characters")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value):
        if value is None:
            return value
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens may be biased")
        for key, bias in value.items():
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"keys must be token ids (non-negative integers as strings), got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"the bias of token {key} must be in -100..100, got {bias}")
        return value

    @property
    def stop_sequences(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def effective_max_tokens(self) -> int:
        return self.max_tokens or self.max_completion_tokens or DEFAULT_MAX_TOKENS

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# --- Responses. Built as plain dicts in the exact shapes OpenAI's SDK parses (../shared/NOTES.md §1).
def usage_dict(usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


def choice_logprobs(content: Optional[list]) -> Optional[dict]:
    """OpenAI's choices[].logprobs: {"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}."""
    return None if content is None else {"content": content, "refusal": None}


def chat_completion(job_id: str, created: int, model: str, fingerprint: str, choices: list, usage) -> dict:
    """choices: each with index, text, finish_reason and logprobs (jobs.records.ChoiceResult)."""
    return {
        "id": job_id, "object": "chat.completion", "created": created, "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                     "logprobs": choice_logprobs(c.logprobs), "finish_reason": c.finish_reason} for c in choices],
        "usage": usage_dict(usage),
    }


def completion_from_record(record, fingerprint: str) -> dict:
    result = record.result
    return chat_completion(record.id, int(record.created_at), record.request.model, fingerprint,
                           result.all_choices(), result.usage)


class ChunkFormatter:
    """The chat.completion.chunk objects of one stream: same id, created and model on every chunk."""

    def __init__(self, job_id: str, created: int, model: str, fingerprint: str, include_usage: bool):
        self.head = {"id": job_id, "object": "chat.completion.chunk", "created": created, "model": model,
                     "system_fingerprint": fingerprint}
        self.include_usage = include_usage

    def _chunk(self, delta: dict, finish_reason: Optional[str] = None, logprobs: Optional[list] = None,
               index: int = 0) -> dict:
        chunk = {**self.head, "choices": [{"index": index, "delta": delta, "logprobs": choice_logprobs(logprobs),
                                           "finish_reason": finish_reason}]}
        if self.include_usage:  # with include_usage, every chunk carries "usage": null but the last
            chunk["usage"] = None
        return chunk

    def role(self, index: int = 0) -> dict:
        return self._chunk({"role": "assistant", "content": ""}, index=index)

    def delta(self, text: str, logprobs: Optional[list] = None, index: int = 0) -> dict:
        return self._chunk({"content": text}, logprobs=logprobs, index=index)

    def finish(self, finish_reason: str, index: int = 0) -> dict:
        return self._chunk({}, finish_reason, index=index)

    def usage(self, usage) -> dict:
        return {**self.head, "choices": [], "usage": usage_dict(usage)}


def _ts(value: Optional[float]) -> Optional[int]:
    return int(value) if value is not None else None


def job_object(record, fingerprint: str) -> dict:
    """A background job as clients poll it (close to OpenAI's background responses)."""
    completed = record.status.value == "completed"
    return {
        "id": record.id, "object": "chat.completion.job", "status": record.status.value,
        "created_at": _ts(record.created_at), "started_at": _ts(record.started_at),
        "completed_at": _ts(record.finished_at), "model": record.request.model,
        "result": completion_from_record(record, fingerprint) if completed else None,
        "error": record.error.model_dump() if record.error else None,
    }


def expired_job_object(job_id: str) -> dict:
    return {"id": job_id, "object": "chat.completion.job", "status": "expired", "created_at": None,
            "started_at": None, "completed_at": None, "model": None, "result": None,
            "error": {"message": "The job's result has expired.", "type": "invalid_request_error",
                      "param": None, "code": "job_expired"}}


def model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "mistralai"}


def now() -> int:
    return int(time.time())


SUPPORTED_ENDPOINTS = ("/v1/chat/completions",)  # what a batch's lines may call


class CreateBatchRequest(StrictModel):
    """POST /v1/batches (OpenAI's fields). The input file's existence and purpose are checked after it."""
    input_file_id: str = Field(description="A file uploaded with purpose 'batch'.")
    endpoint: Literal[SUPPORTED_ENDPOINTS]
    completion_window: Literal[tuple(COMPLETION_WINDOWS)]
    metadata: Optional[dict[str, str]] = Field(default=None, max_length=16)
