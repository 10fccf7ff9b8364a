"""The engine on its own, with the real tiny model: greedy output equals Hugging Face `generate()`, seeds
reproduce, EOS / max_tokens / cancel end a request with the right reason."""
from __future__ import annotations

import pytest
import torch

from workers.engine.engine import Engine, EngineRequest
from workers.engine.sampling import SamplingParams
from workers.model_loader import build_tiny_random

EOS = 2


@pytest.fixture(scope="module")
def model():
    return build_tiny_random()


@pytest.fixture(scope="module")
def engine(model):
    engine = Engine(model, torch.device("cpu"), eos_token_id=EOS)
    yield engine
    engine.shutdown()


def run(engine, prompt, max_tokens, request_id="r", **sampling):
    stream = engine.submit(EngineRequest(request_id, prompt, SamplingParams(**sampling), max_tokens))
    tokens, reason = [], None
    for output in stream:
        tokens += output.token_ids
        reason = output.finish_reason
    return tokens, reason


def hf_greedy(model, prompt, max_tokens):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("prompt", [[1, 733, 16289, 28793], [1] + list(range(300, 340)), [1, 5, 7000, 12000, 31999]])
def test_greedy_matches_hf_generate(model, engine, prompt):
    tokens, reason = run(engine, prompt, 24, temperature=0.0)
    expected = hf_greedy(model, prompt, 24)
    if EOS in expected:  # the engine stops at EOS (and includes it); generate() here does not
        expected = expected[:expected.index(EOS) + 1]
    assert tokens == expected
    assert reason == ("stop" if tokens[-1] == EOS else "length")


def test_seeded_sampling_reproduces(engine):
    prompt = [1, 733, 16289, 28793, 22557]
    a, _ = run(engine, prompt, 30, temperature=1.0, top_p=0.9, seed=5)
    b, _ = run(engine, prompt, 30, temperature=1.0, top_p=0.9, seed=5)
    c, _ = run(engine, prompt, 30, temperature=1.0, top_p=0.9, seed=6)
    assert a == b and a != c


def test_max_tokens_is_exact(engine):
    tokens, reason = run(engine, [1, 733], 7, temperature=0.0)
    assert len(tokens) == 7 and reason == "length"


def test_eos_stops_with_reason_stop(model):
    # Make EOS the most likely token by biasing the output layer.
    biased = build_tiny_random()
    with torch.no_grad():
        biased.lm_head.weight[EOS] += 5.0
    engine = Engine(biased, torch.device("cpu"), eos_token_id=EOS)
    try:
        tokens, reason = run(engine, [1, 733, 16289], 50, temperature=0.0)
    finally:
        engine.shutdown()
    assert tokens[-1] == EOS and reason == "stop" and len(tokens) < 50


def test_cancel_ends_the_request_and_the_next_one_runs(engine):
    stream = engine.submit(EngineRequest("long", [1, 733], SamplingParams(temperature=0.0), 100000))
    first = next(iter(stream))
    assert first.finish_reason is None
    engine.cancel("long")
    reasons = [o.finish_reason for o in stream]
    assert reasons[-1] == "cancelled"
    tokens, reason = run(engine, [1, 733], 3, request_id="after", temperature=0.0)
    assert len(tokens) == 3 and reason == "length"


def test_bad_request_reports_error_and_engine_survives(engine):
    tokens, reason = run(engine, [1, 10**6], 3, request_id="bad")  # token id outside the vocabulary
    assert reason == "error"
    assert run(engine, [1, 733], 2, request_id="good", temperature=0.0)[1] == "length"
