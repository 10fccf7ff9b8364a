"""Chat completions: validate and tokenize, record and enqueue the job, then relay its events.

The order matters: the job record is written first (the source of truth), then the API subscribes to the
job's channel, and only then is the job enqueued, so no event can be published before someone listens.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Callable, Iterator, Optional

from flask import Response, stream_with_context
from pydantic import ValidationError

from app import protocol
from app.errors import APIError, from_validation_error
from config.settings import HF_MODEL_ID, SERVED_MODEL_ID
from jobs.records import GenerationRequest, JobEvent, JobRecord, JobStatus
from jobs.store import JobStore
from workers.chat_format import ConversationError, Message, encode_conversation

log = logging.getLogger(__name__)


def served_model_id(requested: str) -> str:
    """The canonical id of the model a request names (case-insensitive; docs' id or Hugging Face id)."""
    if requested.lower() in (SERVED_MODEL_ID.lower(), HF_MODEL_ID.lower()):
        return SERVED_MODEL_ID
    raise APIError(404, f"The model '{requested}' does not exist or you do not have access to it.",
                   param="model", code="model_not_found")


def system_fingerprint(model_id: str) -> str:
    return "fp_" + hashlib.sha256(f"llm-queue:{model_id}:nf4".encode()).hexdigest()[:10]


def parse_request(body: bytes) -> protocol.ChatCompletionRequest:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "We could not parse the JSON body of your request. The body must be valid JSON.",
                       code="invalid_json")
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        return protocol.ChatCompletionRequest.model_validate(data, strict=True)
    except ValidationError as exc:
        raise from_validation_error(exc)


class ChatService:
    def __init__(self, settings, store: JobStore, enqueue: Callable[[str], None]):
        self.settings = settings
        self.store = store
        self.enqueue = enqueue

    # --- request -> job
    def build_job(self, request: protocol.ChatCompletionRequest) -> JobRecord:
        model = served_model_id(request.model)
        messages = [Message(m.role, m.text) for m in request.messages]
        try:
            prompt_ids = encode_conversation(messages)
        except ConversationError as exc:
            raise APIError(400, exc.message, param=exc.param, code="invalid_conversation")
        max_tokens = request.effective_max_tokens
        limit = self.settings.max_model_len
        if len(prompt_ids) + max_tokens > limit:
            raise APIError(
                400, f"This model's maximum context length is {limit} tokens. However, you requested "
                     f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the messages, {max_tokens} in "
                     f"the completion). Please reduce the length of the messages or completion.",
                param="messages", code="context_length_exceeded", n_prompt_tokens=len(prompt_ids), n_ctx=limit)
        return JobRecord.new(GenerationRequest(
            model=model, prompt_token_ids=prompt_ids, max_tokens=max_tokens, temperature=request.temperature,
            top_p=request.top_p, frequency_penalty=request.frequency_penalty,
            presence_penalty=request.presence_penalty, seed=request.seed, stop=request.stop_sequences))

    def create(self, body: bytes) -> Response:
        request = parse_request(body)
        record = self.build_job(request)
        self.store.create(record)
        pubsub = self.store.subscribe(record.id)
        try:
            self.enqueue(record.id)
        except Exception:
            pubsub.close()
            raise
        relay = EventRelay(self.store, pubsub, record.id, self.settings.sse_keepalive_s)
        if request.stream:
            return self._stream(record, request, relay)
        return self._complete(record, relay)

    # --- job -> response
    def _complete(self, record: JobRecord, relay: "EventRelay") -> Response:
        deadline = time.monotonic() + self.settings.request_timeout_s
        try:
            for event in relay.events(deadline):
                if event is None or not event.is_final:
                    continue
                if event.type == "error":
                    raise APIError(500, event.error.message, type=event.error.type, code=event.error.code)
                if event.type == "cancelled":
                    raise APIError(409, "The job was cancelled.", code="job_cancelled",
                                   headers={"x-should-retry": "false"})
                done = self.store.get(record.id)
                fingerprint = system_fingerprint(record.request.model)
                return protocol.chat_completion(record.id, int(record.created_at), record.request.model,
                                                fingerprint, done.result.text, done.result.finish_reason,
                                                done.result.usage)
            self.store.request_cancel(record.id)
            raise APIError(504, f"The job did not finish within {self.settings.request_timeout_s:g} s.",
                           code="timeout")
        finally:
            relay.close()

    def _stream(self, record: JobRecord, request: protocol.ChatCompletionRequest, relay: "EventRelay") -> Response:
        model, created = record.request.model, int(record.created_at)
        fingerprint = system_fingerprint(model)
        include_usage = request.include_usage

        def chunk(delta: dict, finish_reason: Optional[str] = None) -> str:
            return sse(protocol.chat_chunk(record.id, created, model, fingerprint, delta, finish_reason,
                                           with_usage_field=include_usage))

        def generate() -> Iterator[str]:
            finished = False
            try:
                yield chunk({"role": "assistant", "content": ""})
                for event in relay.events(deadline=None):
                    if event is None:
                        yield ": keep-alive\n\n"  # lets WSGI notice a client that went away
                    elif event.type == "delta":
                        yield chunk({"content": event.text})
                    elif event.type == "done":
                        finished = True
                        yield chunk({}, event.finish_reason)
                        if include_usage:
                            yield sse(protocol.usage_chunk(record.id, created, model, fingerprint, event.usage))
                        yield "data: [DONE]\n\n"
                        return
                    else:  # error or cancelled: an error event, then the end
                        finished = True
                        error = event.error.model_dump() if event.error else {
                            "message": "The job was cancelled.", "type": "invalid_request_error",
                            "code": "job_cancelled", "param": None}
                        yield sse({"error": error})
                        return
            finally:
                relay.close()
                if not finished:  # the client went away: free the worker
                    log.info("job %s: client disconnected, cancelling", record.id)
                    self.store.request_cancel(record.id)

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return Response(stream_with_context(generate()), mimetype="text/event-stream", headers=headers)


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class EventRelay:
    """Reads a job's events from its pub/sub channel, in order; yields None as a keep-alive tick."""

    def __init__(self, store: JobStore, pubsub, job_id: str, keepalive_s: float):
        self.store = store
        self.pubsub = pubsub
        self.job_id = job_id
        self.keepalive_s = keepalive_s

    def events(self, deadline: Optional[float]) -> Iterator[Optional[JobEvent]]:
        last_message = time.monotonic()
        while deadline is None or time.monotonic() < deadline:
            message = self.pubsub.get_message(timeout=min(1.0, self.keepalive_s))
            if message is None:
                if time.monotonic() - last_message >= self.keepalive_s:
                    last_message = time.monotonic()
                    yield None
                continue
            last_message = time.monotonic()
            event = JobEvent.model_validate_json(message["data"])
            yield event
            if event.is_final:
                return

    def close(self) -> None:
        try:
            self.pubsub.close()
        except Exception:
            pass
