"""Chat completions through the whole stack (Redis, Celery worker with the tiny model, gunicorn), with the
official openai SDK as the client."""
from __future__ import annotations

import asyncio
import json

import httpx
from openai import AsyncOpenAI

from tests.conftest import API_KEYS

HELLO = [{"role": "user", "content": "Hello, who are you?"}]
MODEL = "mistralai/mistral-7b-instruct-v0.2"


def stream_deltas(client, **kwargs) -> tuple[list[str], list]:
    chunks = list(client.chat.completions.create(model=MODEL, stream=True, **kwargs))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    return deltas, chunks


def test_non_stream_shape_and_usage(client):
    completion = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12)
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == MODEL
    assert completion.system_fingerprint and completion.system_fingerprint.startswith("fp_")
    choice = completion.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert completion.usage.completion_tokens == 12
    # The real tokenizer's count: [INST] Hello, who are you? [/INST] with BOS.
    from jobs.chat_format import Message, encode_conversation
    assert completion.usage.prompt_tokens == len(encode_conversation([Message("user", HELLO[0]["content"])]))
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 12
    assert len(choice.message.content) > 0


def test_stream_chunks_follow_openai_shape(client):
    deltas, chunks = stream_deltas(client, messages=HELLO, max_tokens=8)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all(c.usage is None for c in chunks)  # no usage unless asked
    assert deltas


def test_stream_include_usage_and_done_marker(stack):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", stack.base_url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEYS[0]}"}, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(line[6:]) for line in lines[:-1]]
    assert all("usage" in p and p["usage"] is None for p in payloads[:-1])
    last = payloads[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 6
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 6


def test_stream_joined_equals_non_stream_for_same_seed(client):
    kwargs = dict(messages=HELLO, max_tokens=40, temperature=0.9, top_p=0.95, seed=1234)
    full = client.chat.completions.create(model=MODEL, **kwargs).choices[0].message.content
    deltas, _ = stream_deltas(client, **kwargs)
    assert "".join(deltas) == full


def test_async_stream(stack, client):
    kwargs = dict(messages=HELLO, max_tokens=20, temperature=0.7, seed=7)
    expected = client.chat.completions.create(model=MODEL, **kwargs).choices[0].message.content

    async def run():
        async with AsyncOpenAI(base_url=stack.base_url + "/v1", api_key=API_KEYS[0], max_retries=0) as aclient:
            stream = await aclient.chat.completions.create(model=MODEL, stream=True, **kwargs)
            parts = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
            done = await aclient.chat.completions.create(model=MODEL, **kwargs)
            return "".join(parts), done.choices[0].message.content

    streamed, non_streamed = asyncio.run(run())
    assert streamed == expected == non_streamed


def test_seed_reproduces_and_differs(client):
    kwargs = dict(messages=HELLO, max_tokens=30, temperature=1.0)
    a = client.chat.completions.create(model=MODEL, seed=42, **kwargs).choices[0].message.content
    b = client.chat.completions.create(model=MODEL, seed=42, **kwargs).choices[0].message.content
    c = client.chat.completions.create(model=MODEL, seed=43, **kwargs).choices[0].message.content
    assert a == b
    assert a != c


def test_default_seed_is_deterministic(client):
    kwargs = dict(messages=HELLO, max_tokens=20, temperature=1.0)
    assert (client.chat.completions.create(model=MODEL, **kwargs).choices[0].message.content
            == client.chat.completions.create(model=MODEL, **kwargs).choices[0].message.content)


def test_max_tokens_length_finish(client):
    for n in (1, 5):
        completion = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=n)
        assert completion.usage.completion_tokens == n
        assert completion.choices[0].finish_reason == "length"


def token_pieces(token_ids: list[int]) -> list[str]:
    """The text each generated token added, as the worker's detokenizer emits it."""
    from jobs.chat_format import raw_tokenizer
    from workers.text.detokenizer import IncrementalDetokenizer
    detokenizer = IncrementalDetokenizer(raw_tokenizer())
    return [detokenizer.feed(t) for t in token_ids]


def test_stop_sequence_spanning_tokens(stack, client):
    """Pick a stop string made of the end of one token's text and the start of the next."""
    kwargs = dict(messages=HELLO, max_tokens=40, temperature=0)
    pieces = token_pieces(generated_tokens(stack, client, **kwargs))
    full = "".join(pieces)
    split = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[split][-2:] + pieces[split + 1][:2]
    expected = full[:full.index(stop)]

    completion = client.chat.completions.create(model=MODEL, stop=stop, **kwargs)
    assert completion.choices[0].message.content == expected
    assert completion.choices[0].finish_reason == "stop"
    assert stop not in completion.choices[0].message.content

    streamed, chunks = stream_deltas(client, stop=[stop, "\x00never"], **kwargs)
    assert "".join(streamed) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    # Usage counts the tokens generated up to the one that completed the stop sequence.
    if full.index(stop) == len("".join(pieces[:split])) + len(pieces[split]) - 2:
        assert completion.usage.completion_tokens == split + 2


def test_stop_sequence_never_matching_changes_nothing(client):
    kwargs = dict(messages=HELLO, max_tokens=25, temperature=0)
    plain = client.chat.completions.create(model=MODEL, **kwargs).choices[0].message.content
    with_stop = client.chat.completions.create(model=MODEL, stop=["\x00\x01"], **kwargs)
    assert with_stop.choices[0].message.content == plain
    assert with_stop.choices[0].finish_reason == "length"


def generated_tokens(stack, client, **kwargs) -> list[int]:
    """The token ids a request generated, read from its job's event log (the SDK only sees text)."""
    completion = client.chat.completions.create(model=MODEL, **kwargs)
    entries = stack.job_redis(completion.id).xrange(f"{stack.prefix}:job:{completion.id}:log")
    events = [json.loads(fields["e"]) for _, fields in entries]
    return [t for e in events if e["type"] == "delta" for t in e.get("token_ids", [])]


def test_penalties_change_greedy_output(stack, client):
    """The tiny model's logits are close together, so a presence penalty of 2 forbids any repeat."""
    kwargs = dict(messages=HELLO, max_tokens=60, temperature=0)
    plain = generated_tokens(stack, client, **kwargs)
    penalized = generated_tokens(stack, client, presence_penalty=2.0, **kwargs)
    freq = generated_tokens(stack, client, frequency_penalty=2.0, **kwargs)
    assert len(plain) == len(penalized) == len(freq) == 60
    assert len(set(plain)) < len(plain), "the unpenalized greedy output should repeat itself"
    assert len(set(penalized)) == len(penalized)
    assert len(set(freq)) == len(freq)
    negative = generated_tokens(stack, client, presence_penalty=-2.0, **kwargs)
    assert len(set(negative)) <= len(set(plain))


def test_system_message_is_folded(client):
    messages = [{"role": "system", "content": "Be brief."}] + HELLO
    completion = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    from jobs.chat_format import Message, encode_conversation
    expected = encode_conversation([Message("system", "Be brief."), Message("user", HELLO[0]["content"])])
    assert completion.usage.prompt_tokens == len(expected)


def test_multi_turn_and_content_parts(client):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Tell me more."}]
    completion = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    assert completion.choices[0].finish_reason == "length"


def test_model_names(client, stack):
    for name in (MODEL, MODEL.upper(), "mistralai/Mistral-7B-Instruct-v0.2"):
        assert client.chat.completions.create(model=name, messages=HELLO, max_tokens=1).model == MODEL
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_default_model_when_omitted(stack):
    response = httpx.post(stack.base_url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2},
                          headers={"Authorization": f"Bearer {API_KEYS[1]}"}, timeout=60)
    assert response.status_code == 200
    assert response.json()["model"] == MODEL


def test_health_and_ready(stack):
    assert httpx.get(stack.base_url + "/health").json() == {"status": "ok"}
    ready = httpx.get(stack.base_url + "/ready").json()
    assert ready["status"] == "ready" and ready["workers"] >= 1 and ready["models"] == ["tiny-random"]


def test_client_disconnect_cancels_the_job(stack):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 3000, "stream": True}
    with httpx.stream("POST", stack.base_url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEYS[0]}"}, timeout=60) as response:
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
        job_id = json.loads(first[6:])["id"]
    # The client is gone; the next write fails, the API cancels, the worker drops the sequence.
    from tests.conftest import wait_until
    record = wait_until(lambda: (r := stack.job(job_id)) and r["status"] in ("cancelled", "completed") and r,
                        30, "the job to end")
    assert record["status"] == "cancelled"
    # The worker is free again.
    ok = httpx.post(stack.base_url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2},
                    headers={"Authorization": f"Bearer {API_KEYS[0]}"}, timeout=30)
    assert ok.status_code == 200
