"""Every validation rule and auth, over HTTP against the running API. A bad request must be refused
before anything is queued: each case also checks that no job record was created."""
from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import API_KEYS, TEST_MAX_MODEL_LEN

MODEL = "mistralai/mistral-7b-instruct-v0.2"
OK_MESSAGES = [{"role": "user", "content": "Hi"}]
AUTH = {"Authorization": f"Bearer {API_KEYS[0]}"}


def post(stack, body=None, *, content=None, headers=AUTH):
    return httpx.post(stack.base_url + "/v1/chat/completions", json=body, content=content,
                      headers={**headers, **({"content-type": "application/json"} if content else {})}, timeout=30)


def job_count(stack) -> int:
    return sum(1 for node in stack.shards for key in node.scan_iter(match=f"{stack.prefix}:job:*", count=1000)
               if not key.endswith(":cancel"))


def assert_openai_error(response, status, param=None, code=None, type_="invalid_request_error"):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["message"]
    assert error["type"] == type_
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


BAD_FIELDS = [
    ({"temperature": -0.1}, "temperature"), ({"temperature": 1.01}, "temperature"),
    ({"temperature": "0.5"}, "temperature"), ({"top_p": -0.5}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"frequency_penalty": -2.01}, "frequency_penalty"), ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"presence_penalty": -3}, "presence_penalty"), ({"presence_penalty": 2.01}, "presence_penalty"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -5}, "max_tokens"), ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"), ({"stop": ""}, "stop"), ({"stop": ["ok", ""]}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": 5}, "stop"), ({"seed": "x"}, "seed"),
    ({"seed": 2**64}, "seed"), ({"stream": "yes"}, "stream"), ({"n": 9}, "n"), ({"n": 0}, "n"),
    ({"unknown_field": 1}, "unknown_field"), ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"content": "x"}]}, "messages[0].role"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
]


@pytest.mark.parametrize("override,param", BAD_FIELDS, ids=[p + "=" + repr(o)[:30] for o, p in BAD_FIELDS])
def test_field_rules(stack, override, param):
    before = job_count(stack)
    body = {"model": MODEL, "messages": OK_MESSAGES, **override}
    assert_openai_error(post(stack, body), 400, param=param)
    assert job_count(stack) == before


def test_boundary_values_are_accepted(stack):
    body = {"model": MODEL, "messages": OK_MESSAGES, "max_tokens": 1, "temperature": 1, "top_p": 0,
            "frequency_penalty": -2, "presence_penalty": 2, "seed": -(2**63), "stop": ["a", "b", "c", "d"]}
    assert post(stack, body).status_code == 200
    body.update(temperature=0, top_p=1, frequency_penalty=2, presence_penalty=-2, seed=2**63 - 1, stop="x")
    assert post(stack, body).status_code == 200
    body.update(max_tokens=None, temperature=None, stop=None)  # null means "the default"
    body["max_tokens"] = 2
    assert post(stack, body).status_code == 200


def test_missing_messages(stack):
    assert_openai_error(post(stack, {"model": MODEL}), 400, param="messages", code="missing_required_parameter")


@pytest.mark.parametrize("messages,param", [
    ([], "messages"),
    ([{"role": "assistant", "content": "hi"}], "messages[0].role"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "messages[1].role"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "messages"),
    ([{"role": "user", "content": ""}], "messages[0].content"),
    ([{"role": "system", "content": "only a system prompt"}], "messages"),
    ([{"role": "tool", "content": "x"}], "messages[0].role"),
    ([{"role": "wizard", "content": "x"}], "messages[0].role"),
])
def test_invalid_conversations(stack, messages, param):
    before = job_count(stack)
    error = assert_openai_error(post(stack, {"model": MODEL, "messages": messages}), 400, param=param)
    assert job_count(stack) == before
    assert "messages" in error["message"] or "role" in error["message"] or "Conversation" in error["message"]


def test_invalid_json_and_non_object(stack):
    assert_openai_error(post(stack, content=b"{not json"), 400, code="invalid_json")
    assert_openai_error(post(stack, content=b"[1, 2]"), 400, code="invalid_json")
    assert_openai_error(post(stack, content=b"\xff\xfe\x00"), 400, code="invalid_json")


def test_context_length_exceeded(stack):
    long_text = "hello " * (TEST_MAX_MODEL_LEN - 100)
    response = post(stack, {"model": MODEL, "messages": [{"role": "user", "content": long_text}], "max_tokens": 200})
    error = assert_openai_error(response, 400, param="messages", code="context_length_exceeded")
    assert error["n_ctx"] == TEST_MAX_MODEL_LEN and error["n_prompt_tokens"] > TEST_MAX_MODEL_LEN - 200
    assert str(TEST_MAX_MODEL_LEN) in error["message"] and str(error["n_prompt_tokens"]) in error["message"]
    # max_tokens alone over the window: the default of 1024 fits, 5000 does not.
    assert_openai_error(post(stack, {"model": MODEL, "messages": OK_MESSAGES, "max_tokens": 5000}), 400,
                        code="context_length_exceeded")


def test_unknown_model_is_404(stack, client):
    assert_openai_error(post(stack, {"model": "gpt-4o", "messages": OK_MESSAGES}), 404, param="model",
                        code="model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_sdk_raises_bad_request_with_param(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=OK_MESSAGES, temperature=1.5)
    assert info.value.body["param"] == "temperature"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"},
                                     {"Authorization": "Bearer"}])
def test_auth_refused(stack, headers):
    assert_openai_error(post(stack, {"model": MODEL, "messages": OK_MESSAGES}, headers=headers), 401,
                        code="invalid_api_key", type_="authentication_error")
    assert_openai_error(httpx.get(stack.base_url + "/v1/models", headers=headers), 401,
                        type_="authentication_error")


def test_sdk_with_wrong_key(stack):
    bad = openai.OpenAI(base_url=stack.base_url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=OK_MESSAGES, max_tokens=1)


def test_every_configured_key_works(stack):
    for key in API_KEYS:
        response = post(stack, {"model": MODEL, "messages": OK_MESSAGES, "max_tokens": 1},
                        headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200


def test_unknown_route_and_method(stack):
    assert_openai_error(httpx.get(stack.base_url + "/v1/nope", headers=AUTH), 404)
    assert_openai_error(httpx.delete(stack.base_url + "/v1/chat/completions", headers=AUTH), 405)


def test_body_too_large(stack):
    huge = b'{"messages": [{"role": "user", "content": "' + b"a" * (5 * 1024 * 1024) + b'"}]}'
    assert_openai_error(post(stack, content=huge), 413)
