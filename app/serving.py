"""Chat completions: validate and tokenize, record and enqueue the job, then relay its events.

The order matters: the job record is written first (the source of truth), then the API listens for the
job's events (app/relay.py), and only then is the job enqueued, so no event can be published unheard.
Background jobs skip the relay: they answer 202 at once and are polled, or their events replayed.

Enqueued means parked: the record is written waiting in its key's queue of its pool (jobs/fair_queue.py),
and the API pumps that pool at once (jobs/fair_dispatch.py): an idle pool starts the job with no added
wait, a busy one takes it in its key's turn.
"""
from __future__ import annotations

import hashlib
import json
import math
import logging
import time
from typing import Iterator, Optional

from flask import Response, stream_with_context
from pydantic import ValidationError

from app import protocol
from app.errors import APIError, from_validation_error
from app.metrics import StreamTimer, observe_completion, observe_error, timing_headers
from app.relay import EventRelay, ShardedEventHub, StreamInterrupted
from config.logging import bind_job
from jobs import vocabulary
from jobs.chat_format import ConversationError, Message, encode_conversation, min_tokens
from jobs.fair_dispatch import FairDispatcher
from jobs.models import ModelDirectory, ModelRoute
from jobs.records import GenerationRequest, JobError, JobRecord
from jobs.store import REDIS_DOWN, JobNotFound, JobStore
from jobs.structured_output import GrammarError, grammar_for
from jobs.transition import Ending

log = logging.getLogger(__name__)

# Retry-After for a full queue that no worker drains yet: a model still loading gives no rate to go by.
NO_WORKER_RETRY_S = 5


def resolve_model(directory: ModelDirectory, requested: str) -> ModelRoute:
    """The pool serving the model a request names (its id or an alias, case-insensitive), or 404."""
    route = directory.resolve(requested)
    if route is None:
        raise APIError(404, f"The model '{requested}' does not exist or you do not have access to it.",
                       param="model", code="model_not_found")
    return route


def system_fingerprint(model_id: str) -> str:
    return "fp_" + hashlib.sha256(f"llm-queue:{model_id}:nf4".encode()).hexdigest()[:10]


def parse_request(data) -> protocol.ChatCompletionRequest:
    """A decoded JSON body -> a validated request (APIError 400 naming the field otherwise)."""
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    messages = data.get("messages")
    if isinstance(messages, list) and len(messages) > protocol.MAX_MESSAGES:
        raise APIError(400, f"'messages' has {len(messages)} items; at most {protocol.MAX_MESSAGES} are allowed.",
                       param="messages", code="invalid_value")
    for index, message in enumerate(messages if isinstance(messages, list) else []):
        parts = message.get("content") if isinstance(message, dict) else None
        if isinstance(parts, list) and len(parts) > protocol.MAX_CONTENT_PARTS:
            raise APIError(400, f"messages[{index}].content has more than {protocol.MAX_CONTENT_PARTS} parts.",
                           param=f"messages[{index}].content", code="invalid_value")
    try:
        request = protocol.ChatCompletionRequest.model_validate(data, strict=True)
    except ValidationError as exc:
        raise from_validation_error(exc)
    if request.top_logprobs and not request.logprobs:
        raise APIError(400, "Invalid value for 'top_logprobs': top_logprobs requires logprobs to be true.",
                       param="top_logprobs", code="invalid_value")
    return request


def decode_json_body(body: bytes):
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError, MemoryError):
        raise APIError(400, "We could not parse the JSON body of your request. The body must be valid JSON.",
                       code="invalid_json")


def build_generation_request(request: protocol.ChatCompletionRequest, max_model_len: int,
                             route: ModelRoute) -> GenerationRequest:
    """Validate the conversation against the model and tokenize it: everything a worker needs."""
    model = route.id
    messages = [Message(m.role, m.text) for m in request.messages]
    max_tokens = request.effective_max_tokens
    at_least = min_tokens(messages)
    if at_least + max_tokens > max_model_len:  # surely too long: refuse without spending time tokenizing
        raise APIError(
            400, f"This model's maximum context length is {max_model_len} tokens. However, your messages have at "
                 f"least {at_least} tokens, with {max_tokens} in the completion. Please reduce the length of the "
                 f"messages or completion.", param="messages", code="context_length_exceeded",
            n_prompt_tokens=at_least, n_ctx=max_model_len)
    try:
        prompt_ids = encode_conversation(messages)
    except ConversationError as exc:
        raise APIError(400, exc.message, param=exc.param, code="invalid_conversation")
    if len(prompt_ids) + max_tokens > max_model_len:
        raise APIError(
            400, f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                 f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the messages, {max_tokens} in "
                 f"the completion). Please reduce the length of the messages or completion.",
            param="messages", code="context_length_exceeded", n_prompt_tokens=len(prompt_ids), n_ctx=max_model_len)
    return GenerationRequest(
        model=model, prompt_token_ids=prompt_ids, max_tokens=max_tokens, temperature=request.temperature,
        top_p=request.top_p, frequency_penalty=request.frequency_penalty,
        presence_penalty=request.presence_penalty, seed=request.seed, stop=request.stop_sequences,
        logit_bias=checked_logit_bias(request.logit_bias), logprobs=request.logprobs,
        top_logprobs=request.top_logprobs or 0, grammar=compiled_grammar(request.response_format), n=request.n)


def checked_logit_bias(logit_bias: Optional[dict[str, float]]) -> dict[int, float]:
    """The bias by token id; an id the tokenizer does not have is a 400 naming logit_bias."""
    size = vocabulary.vocab_size()
    biases = {int(key): bias for key, bias in (logit_bias or {}).items()}
    outside = sorted(token for token in biases if token >= size)
    if outside:
        raise APIError(400, f"Invalid logit_bias: token id {outside[0]} is outside the vocabulary (0..{size - 1}).",
                       param="logit_bias", code="invalid_value")
    return biases


def compiled_grammar(response_format) -> Optional[str]:
    """response_format's grammar (None for text), or a 400 naming response_format, before anything is queued."""
    if response_format is None:
        return None
    try:
        return grammar_for(response_format.model_dump(by_alias=True))
    except GrammarError as exc:
        raise APIError(400, f"Invalid response_format: {exc}", param="response_format", code="invalid_value")


class ChatService:
    def __init__(self, settings, store: JobStore, models: ModelDirectory, dispatcher: FairDispatcher):
        self.settings = settings
        self.store = store
        self.hub = ShardedEventHub(store)  # this process's pub/sub connection per shard, for all its streams
        self.models = models
        self.dispatcher = dispatcher

    # --- POST /v1/chat/completions
    def create(self, body: bytes, owner: str):
        request = parse_request(decode_json_body(body))
        route = resolve_model(self.models, request.model)
        generation = build_generation_request(request, self.settings.max_model_len, route)
        self._check_capacity(owner, route)
        if request.background:
            record = JobRecord.new(generation, kind="background", owner=owner, queue=route.queue)
            self._record_and_enqueue(record)
            return protocol.job_object(record, system_fingerprint(record.request.model)), 202
        record = JobRecord.new(generation, kind="interactive", owner=owner, queue=route.queue)
        bind_job(record.id)
        # Listening before the job exists: its stream needs no read of its log (EventRelay, `new_job`).
        relay = EventRelay(self.store, self.hub, record.id, after_seq=-1, keepalive_s=self.settings.sse_keepalive_s,
                           new_job=True)
        try:
            self._record_and_enqueue(record)
        except Exception:
            relay.close()
            raise
        if request.stream:
            return self.stream_response(record, relay, request.include_usage, cancel_on_disconnect=True,
                                        timer=StreamTimer())
        return self._complete(record, relay)

    # --- background jobs: GET, cancel, list, events
    def get_job(self, job_id: str, owner: str) -> dict:
        record = self._owned(job_id, owner)
        if record is None:
            return protocol.expired_job_object(job_id)
        return protocol.job_object(record, system_fingerprint(record.request.model))

    def cancel_job(self, job_id: str, owner: str) -> dict:
        record = self._owned(job_id, owner)
        if record is None:
            return protocol.expired_job_object(job_id)
        if not record.status.is_terminal:
            self.store.cancel(job_id)  # ends it if queued (maybe put back by the reaper); else asks its attempt
            record = self.store.get(job_id)
        return protocol.job_object(record, system_fingerprint(record.request.model))

    def list_jobs(self, owner: str, limit: int, after: Optional[str]) -> dict:
        ids, has_more = self.store.list_owner_jobs(owner, limit, after)
        data = []
        for job_id in ids:
            try:
                record = self.store.get(job_id)
                data.append(protocol.job_object(record, system_fingerprint(record.request.model)))
            except JobNotFound:
                data.append(protocol.expired_job_object(job_id))
        return {"object": "list", "data": data, "first_id": ids[0] if ids else None,
                "last_id": ids[-1] if ids else None, "has_more": has_more}

    def job_events(self, job_id: str, owner: str, after_seq: int) -> Response:
        record = self._owned(job_id, owner)
        if record is None:
            raise APIError(404, f"Job '{job_id}' has expired: its events are no longer kept.", code="job_expired")
        relay = EventRelay(self.store, self.hub, job_id, after_seq=after_seq, keepalive_s=self.settings.sse_keepalive_s)
        return self.stream_response(record, relay, include_usage=True, cancel_on_disconnect=False)

    def _owned(self, job_id: str, owner: str) -> Optional[JobRecord]:
        """The caller's job; None if it was theirs but has expired; 404 if it is not (or never was) theirs."""
        try:
            record = self.store.get(job_id)
        except JobNotFound:
            if self.store.owns(owner, job_id):
                return None
            raise _job_not_found(job_id)
        if record.owner != owner:
            raise _job_not_found(job_id)
        return record

    def _check_capacity(self, owner: str, route: ModelRoute) -> None:
        """429 with Retry-After, never a timeout: caps on the queue and on each key's unfinished jobs. A full
        queue of a model with no live worker yet (still loading) is a 503: nothing is wrong with the client."""
        depth, unfinished = self.store.admission_counts(route.queue, owner,
                                                        older_than_s=self.settings.job_deadline_s)
        if depth >= self.settings.max_queued_jobs:
            if not route.slots:  # no live worker drains it yet (a fresh start): no rate to estimate from
                raise APIError(503, f"The model '{route.id}' has no live worker yet and its queue is full "
                                    f"({depth} jobs waiting). Retry in {NO_WORKER_RETRY_S} s.",
                               code="queue_full", headers={"Retry-After": str(NO_WORKER_RETRY_S)})
            retry_after = min(120, max(1, 2 * math.ceil(depth / route.slots)))
            raise APIError(429, f"The queue is full ({depth} jobs waiting). Retry in {retry_after} s.",
                           code="queue_full", headers={"Retry-After": str(retry_after)})
        if unfinished >= self.settings.max_unfinished_per_key:
            raise APIError(429, f"This API key has {unfinished} unfinished jobs, the most allowed. Wait for "
                                f"some to finish.", code="too_many_jobs", headers={"Retry-After": "5"})

    def _record_and_enqueue(self, record: JobRecord) -> None:
        """Record the job parked, and send it: at once if nobody waits on its pool and Celery's list has room
        (the record's own script took it: FairDispatcher.offer), else by pumping its pool, which sends it now if
        the pool has room (and other keys' jobs in their turn). If Redis went away before anything could take
        it, or this job's own send failed, the client gets a 503 and will retry: withdraw the record so that it
        never runs behind the client's back. If even that fails, it is sent later (parked: by a dispatcher;
        taken: by the lost-delivery reaper). Another job's failed send is the reaper's, not this client's,
        concern."""
        taken = self.store.create(record, parked=True, offer=self.dispatcher.offer(record.queue))
        try:
            pumped = (self.dispatcher.send_taken(record.queue, [record.id]) if taken else
                      self.dispatcher.pump(record.queue))
        except Exception:
            self._withdraw(record)
            raise
        if record.id in pumped.unsent:
            self._withdraw(record)
            raise pumped.error

    def _withdraw(self, record: JobRecord) -> None:
        error = JobError(message="The job could not be queued; it was not run.", type="service_unavailable",
                         code="queue_unavailable")
        try:
            self.store.end(record.id, Ending.failed(error))
        except REDIS_DOWN:
            log.warning("job %s: neither queued nor withdrawn, Redis is unavailable", record.id)

    def _cancel_quietly(self, job_id: str) -> None:
        try:
            self.store.request_cancel(job_id)
        except REDIS_DOWN:  # the deadline still ends the job
            log.warning("job %s: could not record the cancel, Redis is unavailable", job_id)

    # --- job -> response
    def _complete(self, record: JobRecord, relay: EventRelay):
        deadline = time.monotonic() + self.settings.request_timeout_s
        try:
            for event in relay_events_or_503(relay, deadline):
                if event is None or not event.is_final:
                    continue
                if event.type == "error":
                    raise APIError(500, event.error.message, type=event.error.type, code=event.error.code)
                if event.type == "cancelled":
                    raise APIError(409, "The job was cancelled.", code="job_cancelled",
                                   headers={"x-should-retry": "false"})
                final = self.store.get(record.id)
                observe_completion(final)
                return (protocol.completion_from_record(final, system_fingerprint(record.request.model)), 200,
                        timing_headers(final))
            self._cancel_quietly(record.id)
            raise APIError(504, f"The job did not finish within {self.settings.request_timeout_s:g} s.",
                           code="timeout")
        finally:
            relay.close()

    def stream_response(self, record: JobRecord, relay: EventRelay, include_usage: bool,
                        cancel_on_disconnect: bool, timer: Optional[StreamTimer] = None) -> Response:
        chunks = protocol.ChunkFormatter(record.id, int(record.created_at), record.request.model,
                                         system_fingerprint(record.request.model), include_usage)

        def generate() -> Iterator[str]:
            finished = client_gone = False
            try:
                if relay.after_seq < 0:
                    for index in range(record.request.n):
                        yield sse(chunks.role(index))
                for event in relay.events(deadline=None):
                    if event is None:
                        # A write lets WSGI notice a client that went away. No blank line after the comment:
                        # one would end an event, and the SDK, which keeps the last `id:` across events,
                        # would dispatch it with empty data (json.loads("") ends the user's stream).
                        yield ": keep-alive\n"
                    elif event.type == "delta" and event.finish_reason:  # one of n > 1 choices ended
                        yield sse(chunks.finish(event.finish_reason, event.index or 0), event.seq)
                    elif event.type == "delta":
                        if timer is not None and event.text:
                            timer.delta()
                        yield sse(chunks.delta(event.text, event.logprobs, event.index or 0), event.seq)
                    elif event.type == "done":
                        finished = True
                        if timer is not None:
                            timer.done(event.usage)
                        if record.request.n == 1:  # (with n > 1, each choice's end came as it ended)
                            yield sse(chunks.finish(event.finish_reason), event.seq)
                        if include_usage:
                            yield sse(chunks.usage(event.usage))
                        yield "data: [DONE]\n\n"
                        return
                    else:  # error or cancelled: an error event, then the end
                        finished = True
                        error = event.error.model_dump() if event.error else {
                            "message": "The job was cancelled.", "type": "invalid_request_error",
                            "code": "job_cancelled", "param": None}
                        observe_error(error.get("code"))
                        yield sse({"error": error}, event.seq)
                        return
                finished = True  # resumed after the job's last event: nothing was left to send
                yield "data: [DONE]\n\n"
            except StreamInterrupted:
                observe_error("stream_interrupted")
                yield sse({"error": {
                    "message": f"Lost the connection to the job queue. The job goes on: resume with GET "
                               f"/v1/chat/completions/{record.id}/events and the Last-Event-ID header.",
                    "type": "service_unavailable", "param": None, "code": "stream_interrupted"}})
            except GeneratorExit:
                # The server closes the stream because a write to the client failed: the client is gone.
                # (A server shutdown kills the greenlet instead, and the job goes on for a resume.)
                client_gone = True
                raise
            finally:
                relay.close()
                if client_gone and not finished and cancel_on_disconnect:  # free the worker
                    log.info("job %s: client disconnected, cancelling", record.id)
                    self._cancel_quietly(record.id)

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return Response(stream_with_context(generate()), mimetype="text/event-stream", headers=headers)


def _job_not_found(job_id: str) -> APIError:
    return APIError(404, f"No job found with id '{job_id}'.", param="job_id", code="job_not_found")


def relay_events_or_503(relay: EventRelay, deadline: Optional[float]):
    try:
        yield from relay.events(deadline)
    except StreamInterrupted:
        raise APIError(503, f"Lost the connection to the job queue; the job goes on. Poll "
                            f"/v1/chat/completions/{relay.job_id} or retry shortly.", code="queue_unavailable",
                       headers={"Retry-After": "5", "x-should-retry": "false"})


def sse(payload: dict, event_id: Optional[int] = None) -> str:
    """One SSE event; `id:` is the job event's seq, so a client can resume with Last-Event-ID."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}data: {json.dumps(payload, ensure_ascii=False)}\n\n"
