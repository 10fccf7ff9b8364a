"""The service end to end on the real 4-bit path, on the CPU (issue 14, part 1): MODEL_SOURCE=hf with
MODEL_PATH a model directory (a tiny random-weight Mistral saved by the test), so the worker loads it with
the real loader in NF4 (bitsandbytes on the CPU) and serves it; the official SDK reads the answers."""
from __future__ import annotations

import pytest

from scripts.stack import Stack, chunk_text, stack_env
from workers.model_loader import build_tiny_random

pytest.importorskip("bitsandbytes")
MODEL = "mistralai/mistral-7b-instruct-v0.2"
KEY = "nf4-key"


@pytest.fixture
def stack(tmp_path):
    model_dir = tmp_path / "tiny-mistral"
    build_tiny_random(seed=3).save_pretrained(model_dir)
    s = Stack(stack_env(api_keys=(KEY,), MODEL_SOURCE="hf", MODEL_PATH=str(model_dir)), tmp_path)
    s.start_api()
    s.start_worker()
    with s.serving():
        yield s, model_dir


def test_the_worker_serves_the_directory_in_nf4_and_answers(stack):
    stack, model_dir = stack
    log = (stack.log_dir / "worker.log").read_text()
    assert f"serving model {model_dir} on cpu (MODEL_SOURCE=hf: NF4 4-bit on cpu, float32 compute)" in log
    client = stack.sdk(KEY)
    request = dict(model=MODEL, messages=[{"role": "user", "content": "Hello there"}], max_tokens=16, temperature=0)
    answer = client.chat.completions.create(**request)
    streamed = "".join(chunk_text(chunk) for chunk in client.chat.completions.create(**request, stream=True))
    assert answer.choices[0].message.content == streamed
    assert answer.usage.completion_tokens == 16 or answer.choices[0].finish_reason == "stop"
