"""Issue 15 through the whole stack with the official SDK (sync and async): logprobs and top_logprobs, logit_bias,
and response_format (json_object, json_schema, the SDK's `parse` with a pydantic model), streamed and not,
directly and in a batch; and their errors."""
from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.conftest import API_KEYS
from tests.integration.test_batches import upload, wait_batch

MODEL = "mistralai/mistral-7b-instruct-v0.2"
HELLO = [{"role": "user", "content": "Tell me about yourself."}]


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=150)
    nicknames: list[str] = Field(max_length=2)


PERSON_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                  "rank": {"enum": ["low", "high"]}},
                 "required": ["city", "rank"], "additionalProperties": False}


def joined_bytes(entries) -> str:
    return bytes(b for entry in entries for b in entry.bytes).decode("utf-8", errors="replace")


def test_logprobs_non_stream_and_stream_agree(client, stack):
    body = dict(model=MODEL, messages=HELLO, max_tokens=10, temperature=0.7, seed=4, logprobs=True, top_logprobs=3)
    completion = client.chat.completions.create(**body)
    content = completion.choices[0].logprobs.content
    assert len(content) == completion.usage.completion_tokens == 10
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.logprob <= entry.top_logprobs[0].logprob + 1e-6
    text = completion.choices[0].message.content
    assert joined_bytes(content).endswith(text) and len(joined_bytes(content)) - len(text) <= 1  # (leading "▁")

    chunks = list(client.chat.completions.create(stream=True, **body))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in content]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text

    plain = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4)
    assert plain.choices[0].logprobs is None


def test_logprobs_streamed_to_the_async_sdk(stack):
    async def read():
        client = openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key=API_KEYS[0])
        stream = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, logprobs=True,
                                                      stream=True)
        entries = [e async for c in stream if c.choices and c.choices[0].logprobs
                   for e in c.choices[0].logprobs.content]
        await client.close()
        return entries
    entries = asyncio.run(read())
    assert len(entries) == 6 and all(e.top_logprobs == [] for e in entries)


def test_a_large_logit_bias_forces_a_token(client):
    hello = 22557  # "▁Hello"
    completion = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, temperature=1.0,
                                                logit_bias={str(hello): 100})
    assert completion.choices[0].message.content == "Hello Hello Hello Hello Hello"
    chunks = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, stream=True,
                                            logit_bias={str(hello): 100})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello Hello Hello"


@pytest.mark.parametrize("body,param", [
    ({"logit_bias": {"32000": 1}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"top_logprobs": 3}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
])
def test_bad_values_are_400s_naming_the_field(client, body, param):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, **body)
    assert error.value.status_code == 400 and error.value.body["param"].startswith(param)


def test_parse_returns_a_pydantic_object(client):
    completion = client.chat.completions.parse(model=MODEL, messages=HELLO, response_format=Person, max_tokens=400)
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Person)
    assert Person.model_validate_json(message.content) == message.parsed


def test_json_schema_streamed_validates(client):
    response_format = {"type": "json_schema", "json_schema": {"name": "place", "schema": PERSON_SCHEMA,
                                                              "strict": True}}
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=300, stream=True,
                                                 temperature=0.9, seed=3, response_format=response_format))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), PERSON_SCHEMA)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_json_object_mode(client):
    """Any JSON object: its keys and strings are free, and a random model's wander for long, so a bias toward the
    quote and the closing brace (ids 28739 and 28752, and '"}' 17395) makes it end within the test's tokens."""
    completion = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=300,
                                                response_format={"type": "json_object"},
                                                logit_bias={"28739": 8, "28752": 8, "17395": 8})
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(completion.choices[0].message.content), dict)


def test_json_schema_in_a_batch(client):
    lines = [json.dumps({"custom_id": f"j-{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": MODEL, "messages": [{"role": "user", "content": f"Place {i}"}], "max_tokens": 300, "seed": i,
        "response_format": {"type": "json_schema", "json_schema": {"name": "place", "schema": PERSON_SCHEMA}},
        "logprobs": True}}) for i in range(6)]
    lines.append(json.dumps({"custom_id": "two", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": MODEL, "messages": HELLO, "max_tokens": 4, "n": 2, "temperature": 1.0,
        "logit_bias": {"22557": 100}}}))
    lines.append(json.dumps({"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": MODEL, "messages": HELLO, "response_format": {"type": "json_schema",
                                                              "json_schema": {"name": "x", "schema": {"type": 5}}}}}))
    batch = client.batches.create(input_file_id=upload(client, lines).id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    done = wait_batch(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 7 and done.request_counts.failed == 1
    for line in map(json.loads, client.files.content(done.output_file_id).text.splitlines()):
        if line["custom_id"] == "two":  # n = 2 with a forcing logit_bias: both choices are that token
            body = line["response"]["body"]
            assert [c["message"]["content"] for c in body["choices"]] == ["Hello Hello Hello Hello"] * 2
            assert body["usage"]["completion_tokens"] == 8
            continue
        choice = line["response"]["body"]["choices"][0]
        jsonschema.validate(json.loads(choice["message"]["content"]), PERSON_SCHEMA)
        assert choice["finish_reason"] == "stop" and choice["logprobs"]["content"]
    error = json.loads(client.files.content(done.error_file_id).text.splitlines()[0])
    assert error["custom_id"] == "bad" and error["response"]["body"]["error"]["param"] == "body.response_format"


def test_n_choices_non_stream_and_stream(client):
    body = dict(model=MODEL, messages=HELLO, max_tokens=8, temperature=0.9, seed=11)
    one = client.chat.completions.create(**body)
    three = client.chat.completions.create(n=3, logprobs=True, **body)
    assert [c.index for c in three.choices] == [0, 1, 2]
    texts = [c.message.content for c in three.choices]
    assert texts[0] == one.choices[0].message.content  # choice 0 draws what n = 1 draws
    assert len(set(texts)) == 3 and all(c.finish_reason == "length" for c in three.choices)
    assert three.usage.completion_tokens == 3 * 8 and three.usage.prompt_tokens == one.usage.prompt_tokens
    assert all(len(c.logprobs.content) == 8 for c in three.choices)

    chunks = list(client.chat.completions.create(n=3, stream=True, stream_options={"include_usage": True},
                                                 **body))
    streamed, finishes = {}, {}
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert [streamed[i] for i in range(3)] == texts and finishes == {0: "length", 1: "length", 2: "length"}
    assert chunks[-1].usage.completion_tokens == 24

    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(n=9, **body)
    assert error.value.body["param"] == "n"


def test_n_choices_of_a_background_job_are_cancelled_together(client, stack):
    import httpx

    response = httpx.post(stack.base_url + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEYS[0]}"},
                          json={"model": MODEL, "messages": HELLO, "max_tokens": 2000, "n": 4, "background": True},
                          timeout=30)
    job = response.json()
    cancelled = httpx.post(stack.base_url + f"/v1/chat/completions/{job['id']}/cancel",
                           headers={"Authorization": f"Bearer {API_KEYS[0]}"}, timeout=30).json()
    from tests.conftest import wait_until
    final = wait_until(lambda: (j := httpx.get(stack.base_url + f"/v1/chat/completions/{job['id']}",
                                               headers={"Authorization": f"Bearer {API_KEYS[0]}"},
                                               timeout=30).json())["status"] in ("cancelled", "completed") and j,
                       60, "the job to end")
    assert cancelled["status"] in ("cancelled", "in_progress", "queued") and final["status"] == "cancelled"
