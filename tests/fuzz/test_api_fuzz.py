"""Fuzzing and hostile input against the running stack (a real worker and the API under gunicorn/gevent).

1. `test_fuzz`: property-based fuzzing with schemathesis, driven by the API's own OpenAPI document
   (`GET /openapi.json`, app/openapi.py), one test per operation. Each draws cases that conform to the
   schema (positive) and cases that break it (negative), with a fixed budget (`FUZZ_EXAMPLES`) and a
   derandomized Hypothesis, so a run is repeatable and its length bounded. Path ids are random strings or,
   for part of the cases, real objects created beforehand (a finished job, files, a finished batch), so
   operations on existing objects are fuzzed too. Checks: no 5xx, documented status codes and content
   types, responses (and documented headers) that validate against the schemas, and event streams that end.
2. Explicit hostile inputs (`test_hostile_*`): each must get a clear 4xx in OpenAI's error shape
   `{"error": {"message", "type", "param", "code"}}` within `ANSWER_S`, never a 5xx or a hang.

Known bugs are marked `xfail(strict=True)` with their reproduction in the reason: remove the mark with the
fix (strict: a fixed bug makes the test XPASS, which fails, so the mark cannot outlive the bug).

Every request carries a timeout; an event stream is read for at most `STREAM_READ_S` seconds.
"""
from __future__ import annotations

import json
import socket
import threading
import time
import zlib
from collections import Counter, defaultdict

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_headers_conformance,
                                               response_schema_conformance, status_code_conformance)

from config.settings import HF_MODEL_ID, SERVED_MODEL_ID
from jobs.records import Keys
from tests.conftest import API_KEYS, TEST_MAX_MODEL_LEN

AUTH = {"Authorization": f"Bearer {API_KEYS[0]}"}
REQUEST_TIMEOUT_S = 30      # any single request; nothing here legitimately takes more than a few seconds
STREAM_READ_S = 3           # replaying a finished job's events takes milliseconds: 3 s without an end is a hang
ANSWER_S = 10               # hostile requests: the answer must come within this
MAX_BODY = 4 * 1024 * 1024  # Settings.max_body_bytes

# Examples per operation (~1700 in all). On a 2-core machine the fuzz run takes 1 to 1.5 minutes, depending
# on the load, plus ~20 s to start the stack. The chat POST gets most: it has by far the largest input space.
FUZZ_EXAMPLES = 100
FUZZ_EXAMPLES_BY_OPERATION = {"createChatCompletion": 400, "createBatch": 150, "uploadFile": 150,
                              "getChatCompletionJobEvents": 150}

# --- known bugs (found by this module): reproductions in the reasons. Remove a mark with its fix.
BUG_LIMIT_DIGITS = (
    "BUG: GET /v1/{chat/completions,files,batches}?limit=%C2%B2 ('²') -> 500: routes._limit() checks "
    "str.isdigit(), which is True for '²', then int('²') raises ValueError (unhandled).")
BUG_EVENTS_HUGE_ID = (
    "BUG: GET /v1/chat/completions/{job}/events?starting_after=18446744073709551615 (or header Last-Event-ID) "
    "-> gunicorn HTML 500: jobs.records.log_id() builds stream id '0-18446744073709551617', Redis XRANGE "
    "raises ResponseError 'Invalid stream ID' inside the response generator (not an APIError).")
BUG_EVENTS_NEVER_END = (
    "BUG (hang): GET /v1/chat/completions/{finished job}/events?starting_after=<its last seq or more> "
    "(or Last-Event-ID) never ends: EventRelay reads nothing from the log, then waits on pub/sub for events "
    "that will never come, sending keep-alives forever (and holding a Redis pub/sub connection).")
BUG_SURROGATE = (
    "BUG: a lone UTF-16 surrogate (JSON escape '\\ud800', which json.loads and pydantic accept) -> 500: in "
    "messages[].content sentencepiece raises RuntimeError 'Unable to cast Python instance of type str' "
    "(jobs/chat_format.encode_conversation); in stop, storing the job record raises "
    "PydanticSerializationError (UnicodeEncodeError: surrogates not allowed).")
BUG_BATCH_WINDOW = (
    "BUG: POST /v1/batches {\"endpoint\": \"/v1/chat/completions\", \"completion_window\": []} (or {}) -> 500: "
    "BatchService.create does `window not in COMPLETION_WINDOWS` (a dict): TypeError unhashable type.")
BUG_BATCH_POISON_LINE = (
    "BUG (hang): one bad batch input line raises out of BatchDispatcher._feed instead of becoming an error line: "
    "deeply nested JSON ('[' * 50000 + ']' * 50000: RecursionError, only ValueError is caught); a lone "
    "surrogate escape ('\\ud800') in custom_id (redis-py cannot encode it for SADD: UnicodeEncodeError) or "
    "in a message's content (the tokenizer raises RuntimeError, not ConversationError). Every tick fails at the "
    "same line: the batch never progresses and, as tick() aborts, the batches after it (any owner) starve.")
BUG_BATCH_NO_OUTPUT = (
    "BUG (hang): a batch that ends with neither output nor error lines (cancelled before any line finished; "
    "or over an empty / blank-lines file) never reaches its final status: BatchDispatcher._finalize calls "
    "BatchStore.update(id, **{}) -> redis hset with an empty mapping -> DataError on every tick (which also "
    "starves every other batch).")
BUG_BLOCKING_VALIDATION = (
    "BUG (DoS): {\"messages\": [1, 1, ...]} with 500k items (1.5 MB) blocks the gevent worker 5-15 s: "
    "app.errors.from_validation_error calls exc.errors() to read the first error, which builds all 500k "
    "error dicts (the 400 needs only the first). 1M items: 34 s (gunicorn WORKER TIMEOUT here -> SIGKILL, "
    "every open stream dropped); 2M items fit in 4 MiB (~70 s: past Procfile's --timeout 60).")
BUG_BLOCKING_TOKENIZE = (
    "BUG (DoS): a 3.6 MB prompt (or ~60k short turns) is tokenized on the gevent event loop before the "
    "context check: the whole API (even /health) stalls for seconds (13 s for 4 MiB).")
BUG_CHUNKED_413 = (
    "A chunked (no Content-Length) body over 4 MiB is cut at 4 MiB and answered 400 invalid_json, not 413 "
    "request_too_large (a valid JSON body over the limit reads as 'could not parse').")

KNOWN_FUZZ_FAILURES: dict[str, str] = {}  # what the (derandomized) fuzzer finds as the code stands

# One client for the module: a new httpx client per request (httpx.get, ...) costs ~0.1-0.3 s of setup.
HTTP = httpx.Client(timeout=REQUEST_TIMEOUT_S)
STATS: dict = defaultdict(Counter)
CREATED_BATCHES: list[str] = []


# ----------------------------------------------------------------------------------------------- helpers
def url(stack, path: str) -> str:
    return stack.base_url + path


def api_log_tail(stack, chars: int = 6000) -> str:
    try:
        return (stack.log_dir / "api.log").read_text(errors="replace")[-chars:]
    except OSError:
        return "(no api.log)"


def expect_error(stack, response, status: int, code=None, param=None, param_prefix=None) -> dict:
    """A 4xx in OpenAI's error shape; on a 5xx, the API log's tail is in the failure message."""
    text = response.text[:600]
    if response.status_code >= 500:
        pytest.fail(f"{response.status_code}: {text}\n--- api.log (tail) ---\n{api_log_tail(stack)}")
    assert response.status_code == status, text
    assert response.headers.get("content-type", "").startswith("application/json"), text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    if param_prefix is not None:
        assert (error["param"] or "").startswith(param_prefix), error
    return error


def post_raw(stack, path: str, content, content_type="application/json", headers=None, timeout=ANSWER_S):
    return HTTP.post(url(stack, path), content=content, timeout=timeout,
                      headers={**AUTH, **({"content-type": content_type} if content_type else {}), **(headers or {})})


def chat(stack, body: dict, timeout=ANSWER_S, headers=None):
    return post_raw(stack, "/v1/chat/completions", json.dumps(body).encode(), headers=headers, timeout=timeout)


def ok_body(**extra) -> dict:
    return {"model": SERVED_MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **extra}


def raw_http(stack, request: bytes, timeout: float = ANSWER_S) -> tuple[int, bytes]:
    """Send bytes as they are (httpx refuses control characters in header values); (status, response)."""
    with socket.create_connection(("127.0.0.1", stack.port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), data


def read_stream(stack, path: str, params=None, headers=None, budget_s: float = STREAM_READ_S):
    """(status, body, ended): reads an event stream for at most budget_s seconds."""
    start, body = time.monotonic(), b""
    with HTTP.stream("GET", url(stack, path), params=params, headers={**AUTH, **(headers or {})},
                      timeout=REQUEST_TIMEOUT_S) as response:
        if response.status_code != 200 or "text/event-stream" not in response.headers.get("content-type", ""):
            response.read()
            return response.status_code, response.content, True
        for chunk in response.iter_bytes():
            body += chunk
            if b"data: [DONE]" in body or b'data: {"error"' in body:
                return 200, body, True
            if time.monotonic() - start > budget_s:
                return 200, body, False
    return 200, body, True


def upload(stack, content: bytes, purpose="batch", key=API_KEYS[0]) -> str:
    response = HTTP.post(url(stack, "/v1/files"), headers={"Authorization": f"Bearer {key}"}, timeout=30,
                          files={"file": ("input.jsonl", content)}, data={"purpose": purpose})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def batch_line(custom_id: str, max_tokens: int = 2) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": max_tokens}})


def create_batch(stack, file_id: str) -> dict:
    response = HTTP.post(url(stack, "/v1/batches"), headers=AUTH, timeout=30, json={
        "input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    assert response.status_code == 200, response.text
    CREATED_BATCHES.append(response.json()["id"])
    return response.json()


def get_batch(stack, batch_id: str) -> dict:
    return HTTP.get(url(stack, f"/v1/batches/{batch_id}"), headers=AUTH, timeout=30).json()


FINAL = ("completed", "failed", "expired", "cancelled")
BATCH_WAIT_S = 10  # a batch of a few tiny lines finishes in about a second here


def wait_batch_final(stack, batch_id: str, timeout: float = BATCH_WAIT_S) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        batch = get_batch(stack, batch_id)
        if batch["status"] in FINAL or time.monotonic() > deadline:
            return batch
        time.sleep(0.25)


def wait_job_final(stack, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = HTTP.get(url(stack, f"/v1/chat/completions/{job_id}"), headers=AUTH, timeout=30).json()
        if job["status"] in ("completed", "failed", "cancelled") or time.monotonic() > deadline:
            return job
        time.sleep(0.1)


def health_latency_during(stack, action) -> tuple[object, float]:
    """Run `action` while probing /health from another thread: (action's result, worst /health latency).
    The API is one gevent worker: a request that hogs the CPU stalls every other request."""
    worst, done = [0.0], threading.Event()

    def probe():
        with httpx.Client(timeout=60) as client:
            while not done.is_set():
                start = time.monotonic()
                try:
                    client.get(url(stack, "/health"))
                except httpx.HTTPError:
                    pass
                worst[0] = max(worst[0], time.monotonic() - start)
                time.sleep(0.1)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    try:
        result = action()
    finally:
        done.set()
        thread.join(timeout=70)
    return result, worst[0]


def wait_api_healthy(stack, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if HTTP.get(url(stack, "/health"), timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def seeded(stack):
    """Real objects for the fuzzer's path parameters, by operation: a finished job, a file (and another one
    for deleteFile only), a finished batch, the served models (and aliases). At the end,
    any batch this module created that is not final is taken off the dispatcher's active set, so a batch
    stuck by a known bug cannot starve the batches of the tests that run after this module."""
    job = chat(stack, ok_body(background=True), timeout=30)
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    input_file = upload(stack, (batch_line("seed-1") + "\n").encode())
    doomed_file = upload(stack, (batch_line("seed-2") + "\n").encode())
    batch = create_batch(stack, input_file)
    assert wait_job_final(stack, job_id)["status"] == "completed"
    assert wait_batch_final(stack, batch["id"], 60)["status"] == "completed"
    models = [m["id"] for m in HTTP.get(url(stack, "/v1/models"), headers=AUTH).json()["data"]]
    ids = {"job_id": [job_id], "file_id": [input_file], "batch_id": [batch["id"]],
           "model_id": [*models, HF_MODEL_ID, SERVED_MODEL_ID.upper()]}
    yield {operation_id: ids for operation_id in OPERATIONS} | {"deleteFile": {"file_id": [doomed_file]}}
    active, deadline = Keys(stack.prefix).active_batches(), time.monotonic() + 15
    for batch_id in CREATED_BATCHES:
        if not stack.redis.sismember(active, batch_id):
            continue
        if wait_batch_final(stack, batch_id, max(0.0, deadline - time.monotonic()))["status"] not in FINAL:
            stack.redis.srem(active, batch_id)


@pytest.fixture(scope="module")
def api_schema(stack):
    config = schemathesis.Config.from_dict({"headers": AUTH, "request-timeout": REQUEST_TIMEOUT_S})
    return schemathesis.openapi.from_url(stack.base_url + "/openapi.json", config=config, timeout=30)


@pytest.fixture(scope="module", autouse=True)
def fuzz_report(stack, terminal_report):
    """Prints (and writes to the stack's log dir) what the fuzzer sent and got, per operation."""
    yield
    if not STATS:
        return
    lines = ["", "schemathesis fuzz: examples / seconds / status codes per operation"]
    total = 0
    for operation_id, counter in STATS.items():
        total += counter["examples"]
        codes = ", ".join(f"{k[1]}: {v}" for k, v in sorted(counter.items(), key=str) if isinstance(k, tuple))
        lines.append(f"  {operation_id:28} {counter['examples']:4d} ex  {counter['ms'] / 1000:6.1f} s   {codes}")
    lines.append(f"  total: {total} examples")
    (stack.log_dir / "fuzz-stats.txt").write_text("\n".join(lines) + "\n")
    terminal_report(lines)


# -------------------------------------------------------------------------------------------------- fuzzing
def event_stream_ends(ctx, response, case):
    """An event stream of an existing (finished) job must end ([DONE] or an error event), not idle forever."""
    if response.status_code == 200 and getattr(response, "stream_cut_short", False):
        raise AssertionError(f"the event stream did not end within {STREAM_READ_S} s (keep-alives only): "
                             f"{response.content[:200]!r}")


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance, event_stream_ends]

OPERATIONS = ["createChatCompletion", "listChatCompletionJobs", "getChatCompletionJob", "cancelChatCompletionJob",
              "getChatCompletionJobEvents", "uploadFile", "listFiles", "retrieveFile", "deleteFile", "downloadFile",
              "createBatch", "listBatches", "retrieveBatch", "cancelBatch", "listModels", "retrieveModel", "health",
              "ready"]


def _half(value) -> bool:
    """A deterministic coin: the same generated value always lands on the same side."""
    return zlib.crc32(repr(value).encode("utf-8", "surrogatepass")) % 2 == 0


def _cheap_chat_body(body, positive: bool) -> None:
    """Keep valid chat requests cheap and reaching the worker.

    The tiny model on CPU generates a few hundred tokens a second, and a valid request without max_tokens
    asks for 1024 (up to 4096 in this stack): a few hundred of those would take minutes. So a valid
    max_tokens / max_completion_tokens is clamped to 8 (a value that is not a valid integer is left as it
    is: that is what the negative cases test), and one is set when neither is given. `stream` is set to
    false: SSE responses are checked elsewhere, and a JSON answer keeps each example's response (and thus
    the run) deterministic and fully schema-checked. Half of the positive bodies get a conversation that
    the API accepts (roles alternating user/assistant, ending with user), which a JSON Schema cannot express;
    otherwise nearly every generated conversation stops at the role check.
    """
    if not isinstance(body, dict):
        return
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            body[name] = min(value, 8)
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 8
    if isinstance(body.get("stream"), bool):
        body["stream"] = False
    messages = body.get("messages")
    if positive and isinstance(messages, list) and messages and _half(messages):
        turns = [m for m in messages if isinstance(m, dict)]
        count = len(turns) if len(turns) % 2 else len(turns) - 1
        for index, message in enumerate(turns[:count]):
            message["role"] = "user" if index % 2 == 0 else "assistant"
        body["messages"] = turns[:count] or [{"role": "user", "content": "Hi"}]


def _strategy(operation, real_ids: dict):
    strategies = [operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)]
    names = [p.name for p in operation.path_parameters]
    for name in names:
        for value in real_ids.get(name, []):
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                strategies.append(operation.as_strategy(mode, path_parameters={name: value}))
    return st.one_of(strategies)


@pytest.mark.parametrize("operation_id", [
    pytest.param(op, marks=[pytest.mark.xfail(strict=True, reason=KNOWN_FUZZ_FAILURES[op])]
                 if op in KNOWN_FUZZ_FAILURES else []) for op in OPERATIONS])
def test_fuzz(api_schema, seeded, stack, operation_id):
    operation = api_schema.find_operation_by_id(operation_id)
    stats = STATS[operation_id]
    timeout = STREAM_READ_S if operation_id == "getChatCompletionJobEvents" else REQUEST_TIMEOUT_S
    examples = FUZZ_EXAMPLES_BY_OPERATION.get(operation_id, FUZZ_EXAMPLES)

    # derandomize: the same cases on every run. No shrink phase: a failure reports the case it found at once,
    # instead of re-sending dozens of variants (each up to a timeout) to minimize it.
    @settings(max_examples=examples, derandomize=True, deadline=None, database=None, report_multiple_bugs=False,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=_strategy(operation, seeded[operation_id]))
    def run(case):
        positive = case.meta is not None and case.meta.generation.mode == GenerationMode.POSITIVE
        if operation_id == "createChatCompletion":
            _cheap_chat_body(case.body, positive)
        if operation_id == "createBatch" and positive and isinstance(case.body, dict) and _half(case.body):
            case.body["input_file_id"] = seeded[operation_id]["file_id"][0]  # a real file: the batch runs
        stats["examples"] += 1
        started = time.monotonic()
        try:
            response = case.call_and_validate(headers=AUTH, timeout=timeout, checks=CHECKS)
        finally:
            stats["ms"] += int((time.monotonic() - started) * 1000)
        stats[("status", response.status_code)] += 1
        if operation_id == "createBatch" and response.status_code == 200:
            CREATED_BATCHES.append(json.loads(response.content)["id"])

    run()


def test_openapi_document_is_served_without_auth(stack):
    response = HTTP.get(url(stack, "/openapi.json"), timeout=30)
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.1")
    request_schema = document["components"]["schemas"]["ChatCompletionRequest"]
    assert request_schema["additionalProperties"] is False and "messages" in request_schema["required"]
    operations = {op["operationId"] for item in document["paths"].values() for op in item.values()}
    assert operations == set(OPERATIONS)


# ------------------------------------------------------------------------------------ hostile: size, shape
def test_hostile_body_over_4_mib_is_413(stack):
    body = json.dumps(ok_body(messages=[{"role": "user", "content": "x" * MAX_BODY}])).encode()
    expect_error(stack, post_raw(stack, "/v1/chat/completions", body), 413, code="request_too_large")
    expect_error(stack, post_raw(stack, "/v1/batches", b" " * (MAX_BODY + 1)), 413, code="request_too_large")


def test_hostile_chunked_body_over_4_mib_is_413(stack):
    body = json.dumps(ok_body(messages=[{"role": "user", "content": "x" * (MAX_BODY + 1024)}])).encode()
    chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))  # an iterator: sent chunked
    expect_error(stack, post_raw(stack, "/v1/chat/completions", chunks), 413, code="request_too_large")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/batches"])
@pytest.mark.parametrize("shape", ["array", "object", "messages"])
def test_hostile_deeply_nested_json(stack, path, shape):
    depth = 100_000
    body = {"array": b"[" * depth + b"]" * depth,
            "object": b'{"a":' * depth + b"1" + b"}" * depth,
            "messages": b'{"messages":[{"role":"user","content":' + b"[" * depth + b"]" * depth + b"}]}"}[shape]
    expect_error(stack, post_raw(stack, path, body), 400, code="invalid_json")


def test_hostile_huge_json_array(stack):
    body = b"[" + b"0," * 1_500_000 + b"0]"  # 3 MB
    expect_error(stack, post_raw(stack, "/v1/chat/completions", body), 400, code="invalid_json")
    body = json.dumps(ok_body(stop=["s"] * 500_000)).encode()
    expect_error(stack, post_raw(stack, "/v1/chat/completions", body), 400, param="stop")


def test_hostile_huge_invalid_messages_array_does_not_stall_the_api(stack):
    body = json.dumps({"messages": [1] * 500_000}).encode()  # 1.5 MB
    try:
        response, stalled_s = health_latency_during(
            stack, lambda: post_raw(stack, "/v1/chat/completions", body, timeout=60))
        expect_error(stack, response, 400, param_prefix="messages")
        assert stalled_s < 2, f"/health waited {stalled_s:.1f} s while the API validated one request"
    finally:
        wait_api_healthy(stack)


def test_hostile_3_mib_prompt_does_not_stall_the_api(stack):
    body = json.dumps(ok_body(messages=[{"role": "user", "content": "hello " * 600_000}])).encode()  # 3.6 MB
    try:
        response, stalled_s = health_latency_during(
            stack, lambda: post_raw(stack, "/v1/chat/completions", body, timeout=60))
        expect_error(stack, response, 400, code="context_length_exceeded")
        assert stalled_s < 2, f"/health waited {stalled_s:.1f} s while the API tokenized one prompt"
    finally:
        wait_api_healthy(stack)


@pytest.mark.parametrize("body", [
    b"\xff\xfe\xfd",
    b'{"messages": [{"role": "user", "content": "\xc3\x28 \xed\xa0\x80 \xf8\x88\x80\x80\x80"}]}',
    b'{"messages": [{"role": "user", "content": "hi"}], "user": "\x80"}',
], ids=["garbage", "invalid-utf8-in-string", "lone-continuation-byte"])
def test_hostile_invalid_utf8(stack, body):
    expect_error(stack, post_raw(stack, "/v1/chat/completions", body), 400, code="invalid_json")


@pytest.mark.parametrize("body", [b"", b"null", b"[]", b'"messages"', b"42", b"true", b"{", b"{}}", b"NaN"],
                         ids=["empty", "null", "array", "string", "number", "bool", "truncated", "trailing",
                              "nan"])
def test_hostile_not_an_object(stack, body):
    for path in ("/v1/chat/completions", "/v1/batches"):
        expect_error(stack, post_raw(stack, path, body), 400, code="invalid_json")


# ------------------------------------------------------------------------------------ hostile: chat fields
SAMPLES = {"string": "x", "int": 7, "float": 0.5, "bool": True, "list": ["x"], "object": {"k": "v"}}
FIELD_TYPES = {  # the JSON types each field takes (null too, but for messages); every other type is a 400
    "model": {"string"}, "messages": {"list"}, "max_tokens": {"int"}, "max_completion_tokens": {"int"},
    "stream": {"bool"}, "stream_options": {"object"}, "temperature": {"int", "float"}, "top_p": {"int", "float"},
    "stop": {"string", "list"}, "frequency_penalty": {"int", "float"}, "presence_penalty": {"int", "float"},
    "seed": {"int"}, "background": {"bool"}, "n": {"int"}, "user": {"string"}, "logprobs": {"bool"},
}
MESSAGE_FIELD_TYPES = {"role": {"string"}, "content": {"string", "list"}, "name": {"string"}}
WRONG_TYPES = [(field, kind) for field, kinds in FIELD_TYPES.items() for kind in SAMPLES if kind not in kinds]
WRONG_MESSAGE_TYPES = [(field, kind) for field, kinds in MESSAGE_FIELD_TYPES.items()
                       for kind in SAMPLES if kind not in kinds]


@pytest.mark.parametrize("field,kind", WRONG_TYPES, ids=[f"{f}={k}" for f, k in WRONG_TYPES])
def test_hostile_wrong_type_for_every_field(stack, field, kind):
    expect_error(stack, chat(stack, ok_body(**{field: SAMPLES[kind]})), 400, param_prefix=field)


@pytest.mark.parametrize("field,kind", WRONG_MESSAGE_TYPES, ids=[f"{f}={k}" for f, k in WRONG_MESSAGE_TYPES])
def test_hostile_wrong_type_in_messages(stack, field, kind):
    message = {"role": "user", "content": "Hi", field: SAMPLES[kind]}
    expect_error(stack, chat(stack, ok_body(messages=[message])), 400, param_prefix=f"messages[0].{field}")


@pytest.mark.parametrize("messages,param", [
    (None, "messages"), ([None], "messages[0]"), (["hi"], "messages[0]"), ([[]], "messages[0]"),
    ([{"role": "user", "content": [{"type": "image_url", "text": "x"}]}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "messages[0].content"),
    ([{"role": "user", "content": [None]}], "messages[0].content"),
])
def test_hostile_malformed_messages(stack, messages, param):
    expect_error(stack, chat(stack, ok_body(messages=messages)), 400, param_prefix=param)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [10**18, 2**63, 10**30, TEST_MAX_MODEL_LEN])
def test_hostile_huge_max_tokens(stack, field, value):
    body = ok_body(**{field: value})
    if field == "max_completion_tokens":
        del body["max_tokens"]
    error = expect_error(stack, chat(stack, body), 400, code="context_length_exceeded", param="messages")
    assert error["n_ctx"] == TEST_MAX_MODEL_LEN


OUT_OF_RANGE = [("seed", str(2**64)), ("seed", str(-(2**63) - 1)), ("temperature", "1" + "0" * 400),
                ("top_p", "-1e999"), ("frequency_penalty", "1e999"), ("presence_penalty", "2.0000001"),
                ("n", str(2**70)), ("max_tokens", "-" + "9" * 30), ("max_tokens", "0"),
                ("max_completion_tokens", "-1")]


@pytest.mark.parametrize("field,literal", OUT_OF_RANGE, ids=[f"{f}={v[:12]}" for f, v in OUT_OF_RANGE])
def test_hostile_out_of_range_numbers(stack, field, literal):
    text = json.dumps(ok_body(**{field: 0})).replace(f'"{field}": 0', f'"{field}": {literal}')
    expect_error(stack, post_raw(stack, "/v1/chat/completions", text.encode()), 400, param=field)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field", ["temperature", "top_p", "frequency_penalty", "presence_penalty", "max_tokens",
                                   "seed"])
def test_hostile_non_finite_numbers(stack, field, literal):
    text = json.dumps(ok_body(**{field: 0})).replace(f'"{field}": 0', f'"{field}": {literal}')
    expect_error(stack, post_raw(stack, "/v1/chat/completions", text.encode()), 400, param=field)


def test_hostile_prompt_over_the_context(stack):
    body = ok_body(messages=[{"role": "user", "content": "hello " * (TEST_MAX_MODEL_LEN + 100)}])
    error = expect_error(stack, chat(stack, body), 400, code="context_length_exceeded", param="messages")
    assert error["n_ctx"] == TEST_MAX_MODEL_LEN and error["n_prompt_tokens"] > TEST_MAX_MODEL_LEN
    turns = [{"role": r, "content": "hello"} for r in ("user", "assistant") * 2000] + [{"role": "user",
                                                                                          "content": "hi"}]
    expect_error(stack, chat(stack, ok_body(messages=turns)), 400, code="context_length_exceeded")


@pytest.mark.parametrize("stop", [["s"] * 5000, ["x" * 257], "x" * 100_000, [""], "", [None], [["a"]]],
                         ids=["5000-stops", "long-item", "long-string", "empty-item", "empty", "null-item",
                              "nested"])
def test_hostile_stop_sequences(stack, stop):
    expect_error(stack, chat(stack, ok_body(stop=stop)), 400, param="stop")


@pytest.mark.parametrize("content", ["a\x00b", "\x00" * 1000, "".join(map(chr, range(32))) + "\x7f\x85\u2028",
                                     "\u202e\u200b\ufeff\ufffe\uffff", "\U0010ffff\U0001f600"])
def test_hostile_control_characters_in_content(stack, content):
    """Valid (if odd) text: answered normally; never a 5xx."""
    response = chat(stack, ok_body(messages=[{"role": "system", "content": content},
                                             {"role": "user", "content": content}], stop=content[:256]))
    assert response.status_code == 200, f"{response.text[:400]}\n{api_log_tail(stack)}"
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("where", ["content", "stop"])
def test_hostile_lone_surrogate(stack, where):
    body = json.dumps(ok_body(messages=[{"role": "user", "content": "CONTENT"}], stop="STOP"))
    body = body.replace('"CONTENT"' if where == "content" else '"STOP"', '"a\\ud800b"')
    response = post_raw(stack, "/v1/chat/completions", body.encode())
    expect_error(stack, response, 400, param_prefix="messages" if where == "content" else "stop")


@pytest.mark.parametrize("override,param", [
    ({"unknown": 1}, "unknown"), ({"functions": []}, "functions"), ({"tools": [{"type": "function"}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"), ({"logit_bias": {"1": 100}}, "logit_bias"),
    ({"stream_options": {"include_usage": True, "x": 1}}, "stream_options.x"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "x": 1}]}]}, "messages[0].content"),
    ({"\u0000": 1}, None), ({"a" * 100_000: 1}, None),
])
def test_hostile_unknown_fields(stack, override, param):
    error = expect_error(stack, chat(stack, ok_body(**override)), 400)
    if param is not None:
        assert (error["param"] or "").startswith(param), error


def test_hostile_very_long_model_names(stack):
    expect_error(stack, chat(stack, ok_body(model="m" * 1_000_000)), 404, code="model_not_found", param="model")
    expect_error(stack, chat(stack, ok_body(model="")), 404, code="model_not_found")
    expect_error(stack, chat(stack, ok_body(model="\x00\u202e" + SERVED_MODEL_ID)), 404, code="model_not_found")
    response = HTTP.get(url(stack, "/v1/models/" + "m" * 2000), headers=AUTH, timeout=ANSWER_S)
    expect_error(stack, response, 404, code="model_not_found")
    # Past gunicorn's request-line limit (4094 bytes) the answer is gunicorn's own 414, in HTML.
    response = HTTP.get(url(stack, "/v1/models/" + "m" * 5000), headers=AUTH, timeout=ANSWER_S)
    assert response.status_code == 414


@pytest.mark.parametrize("content_type,body", [
    ("text/plain", b"hello"), ("application/x-www-form-urlencoded", b"model=x&messages=hi"),
    ("multipart/form-data; boundary=xyz", b"--xyz\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nb\r\n--xyz--"),
    ("multipart/form-data", b"no boundary"), ("application/xml", b"<messages/>"), (None, b"messages=hi"),
])
def test_hostile_wrong_content_type(stack, content_type, body):
    for path in ("/v1/chat/completions", "/v1/batches"):
        expect_error(stack, post_raw(stack, path, body, content_type=content_type), 400, code="invalid_json")


def test_wrong_content_type_with_a_json_body_is_read_as_json(stack):
    """Documented behaviour, not a bug: like OpenAI's API, the body is parsed as JSON whatever the
    Content-Type says (the SDKs always send application/json)."""
    response = post_raw(stack, "/v1/chat/completions", json.dumps(ok_body()).encode(), content_type="text/plain")
    assert response.status_code == 200, response.text


# ----------------------------------------------------------------------------- hostile: headers and ids
@pytest.mark.parametrize("header", [
    b"Authorization: Bearer " + API_KEYS[0].encode() + b"\x00",
    b"Authorization: Bearer " + API_KEYS[0].encode() + b"\x01",
    b"Authorization: Bearer " + API_KEYS[0].encode() + b"\r\nX-Evil: a\x00b",
    b"Authorization: Bearer " + API_KEYS[0].encode() + b"\r\nLast-Event-ID: 1\x7f",
], ids=["nul-in-auth", "ctrl-in-auth", "nul-in-other", "del-in-last-event-id"])
def test_hostile_control_characters_in_header_values(stack, header):
    """gunicorn refuses these before the app sees them: a 400 (its own HTML page, not OpenAI's shape)."""
    body = json.dumps(ok_body()).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n" + header + b"\r\n\r\n"
               + body)
    status, _ = raw_http(stack, request)
    assert status == 400


@pytest.mark.parametrize("authorization", [
    None, "", "Bearer", "Basic dGVzdDp0ZXN0", "bearer wrong", "Bearer " + "k" * 6000,
    "Bearer " + API_KEYS[0] + "x", "Bearer\t" + API_KEYS[0], "Bearer  " + API_KEYS[1] + "\t" + API_KEYS[0],
])
def test_hostile_bad_authorization(stack, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/files"), ("GET", "/v1/models")):
        response = HTTP.request(method, url(stack, path), headers=headers, json=ok_body(), timeout=ANSWER_S)
        expect_error(stack, response, 401, code="invalid_api_key")


def test_non_ascii_authorization_bytes(stack):
    request = (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer "
               + "ключ🔑".encode() + b"\r\n\r\n")
    status, data = raw_http(stack, request)
    assert status == 401 and b'"invalid_api_key"' in data


ID_PATHS = ["/v1/chat/completions/{id}", "/v1/chat/completions/{id}/events", "/v1/files/{id}",
            "/v1/files/{id}/content", "/v1/batches/{id}"]
HOSTILE_IDS = ["..%2F..%2Fetc%2Fpasswd", "..%2F..%2Fhealth", "%2e%2e", "..", "%00", "a%00b", "%FF%FE", "%C0%AF",
               "файл", "😀", "%E2%80%AE", "*", "%2A", "~", "a" * 2000, "file-" + "0" * 32 + "%0d%0aX:1"]


@pytest.mark.parametrize("path", ID_PATHS)
@pytest.mark.parametrize("object_id", HOSTILE_IDS, ids=[i[:24] for i in HOSTILE_IDS])
def test_hostile_ids(stack, path, object_id):
    response = HTTP.get(url(stack, path.replace("{id}", object_id)), headers=AUTH, timeout=ANSWER_S)
    expect_error(stack, response, 404)


@pytest.mark.parametrize("object_id", ["..%2F..%2Fetc%2Fpasswd", "%00", "файл", "*", "a" * 2000])
def test_hostile_ids_on_writes(stack, object_id):
    for method, path in (("DELETE", "/v1/files/{id}"), ("POST", "/v1/chat/completions/{id}/cancel"),
                         ("POST", "/v1/batches/{id}/cancel")):
        response = HTTP.request(method, url(stack, path.replace("{id}", object_id)), headers=AUTH,
                                 timeout=ANSWER_S)
        expect_error(stack, response, 404)


def test_hostile_model_ids(stack):
    for model_id in ("..%2F..%2Fetc", "%FF", "файл", "%00", "mistralai%2Fmistral-7b-instruct-v0.2%00"):
        response = HTTP.get(url(stack, "/v1/models/" + model_id), headers=AUTH, timeout=ANSWER_S)
        expect_error(stack, response, 404, code="model_not_found")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/files", "/v1/batches"])
@pytest.mark.parametrize("limit", ["0", "101", "-1", "1.5", "1e2", "", " 5", "0x10", "10" * 50, "NaN"])
def test_hostile_limit(stack, path, limit):
    response = HTTP.get(url(stack, path), params={"limit": limit}, headers=AUTH, timeout=ANSWER_S)
    expect_error(stack, response, 400, param="limit")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/files", "/v1/batches"])
def test_hostile_limit_with_superscript_digit(stack, path):
    response = HTTP.get(url(stack, path), params={"limit": "²"}, headers=AUTH, timeout=ANSWER_S)
    expect_error(stack, response, 400, param="limit")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/files", "/v1/batches"])
def test_hostile_after_cursor(stack, path):
    for after in ("\x00", "../..", "*", "файл", "x" * 3000, "+inf", "(1"):
        response = HTTP.get(url(stack, path), params={"after": after}, headers=AUTH, timeout=ANSWER_S)
        assert response.status_code == 200, response.text[:300]
        assert response.json()["data"] == []


# --------------------------------------------------------------------------------- hostile: job events
@pytest.fixture(scope="module")
def finished_job(stack):
    job = chat(stack, ok_body(background=True), timeout=30)
    assert job.status_code == 202, job.text
    assert wait_job_final(stack, job.json()["id"])["status"] == "completed"
    status, body, ended = read_stream(stack, f"/v1/chat/completions/{job.json()['id']}/events")
    assert status == 200 and ended
    last_seq = max(int(line[4:]) for line in body.decode().splitlines() if line.startswith("id: "))
    return job.json()["id"], last_seq


@pytest.mark.parametrize("value", ["x", "1.5", "", "1e3", "--1"])
def test_hostile_events_cursor_not_an_integer(stack, finished_job, value):
    job_id, _ = finished_job
    for params, headers in (({"starting_after": value}, None), (None, {"Last-Event-ID": value})):
        response = HTTP.get(url(stack, f"/v1/chat/completions/{job_id}/events"), params=params, headers={
            **AUTH, **(headers or {})}, timeout=ANSWER_S)
        expect_error(stack, response, 400, param="starting_after")


@pytest.mark.parametrize("value", ["-1", "-99999999999999999999", "0"])
def test_events_replay_from_the_start(stack, finished_job, value):
    job_id, _ = finished_job
    status, body, ended = read_stream(stack, f"/v1/chat/completions/{job_id}/events", params={"starting_after": value})
    assert status == 200 and ended, body[-300:]


@pytest.mark.parametrize("value", [str(2**64), "9" * 40])
@pytest.mark.parametrize("via", ["query", "header"])
def test_hostile_events_cursor_beyond_64_bits(stack, finished_job, value, via):
    job_id, _ = finished_job
    params, headers = ({"starting_after": value}, None) if via == "query" else (None, {"Last-Event-ID": value})
    status, body, ended = read_stream(stack, f"/v1/chat/completions/{job_id}/events", params=params,
                                      headers=headers)
    assert status < 500, f"{status}: {body[:300]!r}\n--- api.log (tail) ---\n{api_log_tail(stack)}"
    assert ended


@pytest.mark.parametrize("offset", [0, 1, 2**62])
def test_hostile_events_replay_after_the_last_event_ends(stack, finished_job, offset):
    job_id, last_seq = finished_job
    status, body, ended = read_stream(stack, f"/v1/chat/completions/{job_id}/events",
                                      params={"starting_after": str(last_seq + offset)})
    assert status < 500, body[:300]
    assert ended, f"no end after {STREAM_READ_S} s: {body[:120]!r}"


# ---------------------------------------------------------------------------- hostile: files and batches
def test_hostile_uploads(stack):
    def post(headers=None, **kwargs):
        return HTTP.post(url(stack, "/v1/files"), headers={**AUTH, **(headers or {})}, timeout=ANSWER_S, **kwargs)
    expect_error(stack, post(files={"file": ("a.jsonl", b"ok\n\xff\xfe\n")}, data={"purpose": "batch"}), 400,
                 code="invalid_file")
    expect_error(stack, post(data={"purpose": "batch"}), 400, param="file")
    expect_error(stack, post(files={"file": ("a.jsonl", b"{}\n")}, data={"purpose": "fine-tune"}), 400,
                 param="purpose")
    expect_error(stack, post(files={"file": ("a.jsonl", b"{}\n")}), 400, param="purpose")
    expect_error(stack, post(json={"file": "x", "purpose": "batch"}), 400)
    expect_error(stack, post(content=b"\x00" * 1000, headers={"content-type": "multipart/form-data"}), 400)
    many_parts = {f"k{i}": "v" for i in range(2000)}
    expect_error(stack, post(files={"file": ("a.jsonl", b"{}\n")}, data={"purpose": "batch", **many_parts}), 413)
    # Odd but valid: any file name, NUL bytes in lines. Stored as given.
    response = post(files={"file": ("../../etc/passwd\x00.jsonl", b"a\x00b\n")}, data={"purpose": "batch"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("body,param", [
    ({"endpoint": "/v1/chat/completions", "completion_window": "24h", "input_file_id": 5}, "input_file_id"),
    ({"endpoint": "/v1/chat/completions", "completion_window": "24h", "input_file_id": ["x"]}, "input_file_id"),
    ({"endpoint": "/v1/chat/completions", "completion_window": "24h", "input_file_id": "..%2F"}, "input_file_id"),
    ({"endpoint": ["/v1/chat/completions"], "completion_window": "24h", "input_file_id": "x"}, "endpoint"),
    ({"endpoint": {"a": 1}, "completion_window": "24h", "input_file_id": "x"}, "endpoint"),
    ({"endpoint": "/v1/embeddings", "completion_window": "24h", "input_file_id": "x"}, "endpoint"),
    ({"endpoint": "/v1/chat/completions", "completion_window": 24, "input_file_id": "x"}, "completion_window"),
    ({"endpoint": "/v1/chat/completions", "completion_window": "24h", "input_file_id": "x", "metadata": []},
     "metadata"),
    ({"endpoint": "/v1/chat/completions", "completion_window": "24h", "input_file_id": "x",
      "metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ({"endpoint": "/v1/chat/completions", "completion_window": "24h", "input_file_id": "x", "metadata": {"a": 1}},
     "metadata"),
    ({"endpoint": "/v1/chat/completions", "completion_window": "24h", "input_file_id": "x", "extra": 1}, "extra"),
])
def test_hostile_batch_create(stack, body, param):
    response = HTTP.post(url(stack, "/v1/batches"), headers=AUTH, json=body, timeout=ANSWER_S)
    assert response.status_code in (400, 404), response.text
    expect_error(stack, response, response.status_code, param=param)


@pytest.mark.parametrize("window", [[], {}, ["24h"]])
def test_hostile_batch_completion_window_of_a_wrong_type(stack, window):
    response = HTTP.post(url(stack, "/v1/batches"), headers=AUTH, timeout=ANSWER_S, json={
        "endpoint": "/v1/chat/completions", "completion_window": window, "input_file_id": "file-x"})
    expect_error(stack, response, 400, param="completion_window")


def test_hostile_batch_lines(stack):
    """Bad lines become error lines; the batch completes."""
    lines = [batch_line("good"), "not json", "null", "[1]", json.dumps({"custom_id": 5}),
             json.dumps({"custom_id": "a" * 10_000, "method": "GET", "url": "/v1/chat/completions", "body": {}}),
             json.dumps({"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": None}),
             json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**18}}),
             json.dumps({"custom_id": "d", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"messages": [{"role": "user", "content": "hi"}], "stream": True}}),
             json.dumps({"custom_id": "good", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"messages": [{"role": "user", "content": "dup"}], "max_tokens": 1}})]
    batch = create_batch(stack, upload(stack, ("\n".join(lines) + "\n").encode()))
    done = wait_batch_final(stack, batch["id"], 60)
    assert done["status"] == "completed", done
    assert done["request_counts"] == {"total": len(lines), "completed": 1, "failed": len(lines) - 1}


def _active_batches_stuck(stack, batch_id: str):
    stack.redis.srem(Keys(stack.prefix).active_batches(), batch_id)  # stop the dispatcher tripping on it


POISON_LINES = {
    "deep-json": "[" * 50_000 + "]" * 50_000,
    "surrogate-custom-id": batch_line("a\ud800b"),
    "surrogate-content": batch_line("s").replace('"Hi"', '"a\\ud800b"'),
}


@pytest.mark.parametrize("line", POISON_LINES.values(), ids=POISON_LINES.keys())
def test_hostile_batch_poison_line(stack, line):
    batch = create_batch(stack, upload(stack, (batch_line("good") + "\n" + line + "\n").encode()))
    try:
        done = wait_batch_final(stack, batch["id"])
        assert done["status"] == "completed", done
        assert done["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    finally:
        _active_batches_stuck(stack, batch["id"])


@pytest.mark.parametrize("case", ["cancelled-at-once", "empty-file", "blank-lines"])
def test_hostile_batch_without_any_output_line_finishes(stack, case):
    content = {"cancelled-at-once": "\n".join(batch_line(f"l{i}", max_tokens=64) for i in range(50)) + "\n",
               "empty-file": "", "blank-lines": "\n\n  \n"}[case]
    batch = create_batch(stack, upload(stack, content.encode()))
    try:
        if case == "cancelled-at-once":
            response = HTTP.post(url(stack, f"/v1/batches/{batch['id']}/cancel"), headers=AUTH, timeout=30)
            assert response.status_code == 200
        done = wait_batch_final(stack, batch["id"])
        assert done["status"] == ("cancelled" if case == "cancelled-at-once" else "completed"), done
    finally:
        _active_batches_stuck(stack, batch["id"])
