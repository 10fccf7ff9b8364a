"""The prefix cache in the running service (the real stack, the official openai SDK): requests that share a system
prompt, a chat that resends its history and the lines of a batch find their prefix in the worker's cache, as
/metrics' prefix-cache counters show, and a greedy reply is the same text whether its prefix was computed or
found in the cache, streamed or not."""
from __future__ import annotations

import asyncio
import io
import json

from openai import AsyncOpenAI

from tests.conftest import API_KEYS, wait_until
from tests.integration.test_metrics_and_logs import scrape, total

MODEL = "mistralai/mistral-7b-instruct-v0.2"
# About 300 tokens: some 18 full blocks of 16.
SYSTEM = ("You are the archivist of the PREFIX-CACHE-7781 library. " + "Answer briefly and cite the shelf. " * 40)


def hits_and_queries(stack) -> tuple[float, float]:
    samples = scrape(stack.base_url)
    return total(samples, "llmq_prefix_cache_hits_total"), total(samples, "llmq_prefix_cache_queries_total")


def hits_grow_by(stack, before: float, at_least: float) -> float:
    """Wait for a heartbeat that reports at least `at_least` more hit tokens (heartbeats come every 2 s)."""
    return wait_until(lambda: (h := hits_and_queries(stack)[0]) - before >= at_least and h, timeout=20,
                      what=f"{at_least} more prefix-cache hit tokens in /metrics")


def ask(client, question: str, **extra):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        max_tokens=12, temperature=0, **extra)


def test_a_shared_system_prompt_is_found_in_the_cache_and_the_reply_is_the_same(stack, client):
    first = ask(client, "Where is the atlas?")  # may itself hit what an earlier test left: either way
    before, _ = hits_and_queries(stack)
    again = ask(client, "Where is the atlas?")
    other = ask(client, "Where is the dictionary?")
    assert again.choices[0].message.content == first.choices[0].message.content
    assert other.usage.prompt_tokens > 16 * 18
    hits_grow_by(stack, before, 2 * 16 * 18)  # both found at least the system prompt's full blocks


def test_a_streamed_reply_from_the_cache_equals_the_computed_one(stack, client):
    computed = ask(client, "Which shelf holds the maps of PREFIX-STREAM-12?").choices[0].message.content

    async def streamed() -> str:
        async with AsyncOpenAI(base_url=stack.base_url + "/v1", api_key=API_KEYS[0], max_retries=0) as sdk:
            stream = await sdk.chat.completions.create(
                model=MODEL, messages=[{"role": "system", "content": SYSTEM},
                                       {"role": "user", "content": "Which shelf holds the maps of PREFIX-STREAM-12?"}],
                max_tokens=12, temperature=0, stream=True)
            return "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])

    assert asyncio.run(streamed()) == computed


def test_a_chat_that_resends_its_history_prefills_only_the_new_turn(stack, client):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Open the PREFIX-CHAT-5 ledger."}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    before, _ = hits_and_queries(stack)
    messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                 {"role": "user", "content": "And the next page?"}]
    turn = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert turn.choices[0].finish_reason in ("length", "stop")
    hits_grow_by(stack, before, 16 * 18)


def test_the_lines_of_a_batch_meet_their_shared_prefix(stack, client):
    lines = [json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": MODEL, "max_tokens": 4, "temperature": 0,
                                  "messages": [{"role": "system", "content": SYSTEM + " PREFIX-BATCH-3."},
                                               {"role": "user", "content": f"Line {i}?"}]}})
             for i in range(8)]
    before, _ = hits_and_queries(stack)
    upload = client.files.create(file=("prefix.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    done = wait_until(lambda: (b := client.batches.retrieve(batch.id)).status in
                      ("completed", "failed", "expired", "cancelled") and b, 240, "the batch", interval=0.5)
    assert done.status == "completed" and done.request_counts.completed == 8
    # One worker: at most the first line computes the prefix, the other 7 find its full blocks.
    hits_grow_by(stack, before, 7 * 16 * 18)
