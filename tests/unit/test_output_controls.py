"""Issue 15 in the engine: logit_bias, logprobs of the model's own distribution, and grammars (constrained
decoding with llguidance), on the tiny random model with the real tokenizer; alone, batched with other rows,
and through the CUDA-graph layouts (capture off)."""
from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from jobs.chat_format import raw_tokenizer
from jobs.structured_output import GrammarError, grammar_for, json_schema_grammar
from jobs.vocabulary import logprob_entry, token_bytes, token_text
from tests.unit.test_engine import EOS, finish_all, prompts_of
from workers.engine.cuda_graphs import DecodeGraphs, PiecewiseGraphs
from workers.engine.engine import Engine, EngineConfig, EngineRequest
from workers.engine.sampling import SamplingParams
from workers.model_loader import build_tiny_random

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def model():
    return build_tiny_random()


def collect(stream) -> dict:
    result = {"tokens": [], "reason": None, "error": None, "logprobs": []}
    for output in stream:
        result["tokens"] += output.token_ids
        result["logprobs"] += output.logprobs or []
        result["reason"], result["error"] = output.finish_reason, output.error
    return result


def make_engine(model, graph_layout: bool = False, prefix_caching: bool = True) -> Engine:
    engine = Engine(model, torch.device("cpu"), eos_token_id=EOS, config=EngineConfig(
        max_model_len=1024, max_num_seqs=8, enable_prefix_caching=prefix_caching))
    if graph_layout:
        engine.runner.graphs = DecodeGraphs(engine.runner, capture=False)
        engine.runner.piecewise = PiecewiseGraphs(engine.runner, capture=False)
    return engine


def run_all(engine, requests: list[EngineRequest]) -> list[dict]:
    """Submitted in order (at once), collected together."""
    import threading

    results = [None] * len(requests)
    streams = [engine.submit(request) for request in requests]

    def one(i):
        results[i] = collect(streams[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    finish_all(threads)
    return results


def test_a_large_logit_bias_makes_the_output_that_token(model):
    engine = make_engine(model)
    try:
        prompt = prompts_of([9])[0]
        forced = collect(engine.submit(EngineRequest("b", prompt, SamplingParams(temperature=1.0, logit_bias=(
            (22557, 100.0),)), 6)))
        assert forced["tokens"] == [22557] * 6
        banned = collect(engine.submit(EngineRequest("c", prompt, SamplingParams(temperature=0.0), 6)))
        first = banned["tokens"][0]
        again = collect(engine.submit(EngineRequest("d", prompt, SamplingParams(temperature=0.0, logit_bias=(
            (first, -100.0),)), 6)))
        assert first not in again["tokens"]
        bad = collect(engine.submit(EngineRequest("e", prompt, SamplingParams(logit_bias=((32000, 1.0),)), 3)))
        assert bad["reason"] == "error" and "outside the vocabulary" in bad["error"]
    finally:
        engine.shutdown()


def hf_logprobs(model, token_ids: list[int], prompt_len: int) -> torch.Tensor:
    """log_softmax of the model's logits at each output position: [n, V]."""
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0].float()
    return torch.log_softmax(logits[prompt_len - 1:len(token_ids) - 1], dim=-1)


@pytest.mark.parametrize("graph_layout", [False, True])
def test_logprobs_are_the_models_own_and_batched(model, graph_layout):
    """Each token's logprob and the top-k equal log_softmax of the model's raw logits (not the tempered,
    penalised or biased ones), for rows that ask, batched with rows that do not."""
    engine = make_engine(model, graph_layout)
    prompts = prompts_of([5, 17, 30, 8], seed=21)
    requests = [EngineRequest("lp0", prompts[0], SamplingParams(temperature=0.0), 10, logprobs=5),
                EngineRequest("lp1", prompts[1], SamplingParams(temperature=0.7, seed=1, presence_penalty=0.5), 10,
                              logprobs=0),
                EngineRequest("no", prompts[2], SamplingParams(temperature=0.3), 10),
                EngineRequest("lp3", prompts[3], SamplingParams(temperature=0.9, logit_bias=((100, 5.0),)), 10,
                              logprobs=20)]
    try:
        results = run_all(engine, requests)
    finally:
        engine.shutdown()
    assert results[2]["logprobs"] == []
    for request, result in zip(requests, results):
        if request.logprobs is None:
            continue
        assert len(result["logprobs"]) == len(result["tokens"]) == 10
        reference = hf_logprobs(model, request.prompt_token_ids + result["tokens"], len(request.prompt_token_ids))
        for position, (token, (logprob, top)) in enumerate(zip(result["tokens"], result["logprobs"])):
            assert abs(logprob - reference[position, token].item()) < 1e-4
            assert len(top) == request.logprobs
            values, ids = reference[position].topk(request.logprobs) if request.logprobs else ([], [])
            assert [t for t, _ in top] == list(ids.tolist() if request.logprobs else [])
            assert all(abs(v - w) < 1e-4 for (_, v), w in zip(top, list(values)))


def test_logprob_entries_in_openai_shape():
    tokenizer = raw_tokenizer()
    hello = tokenizer.encode("Hello", bos=False, eos=False)[0]
    entry = logprob_entry(hello, -0.5, [(hello, -0.5), (3 + 0xE6, -2.0)])
    assert entry == {"token": " Hello", "logprob": -0.5, "bytes": list(b" Hello"), "top_logprobs": [
        {"token": " Hello", "logprob": -0.5, "bytes": list(b" Hello")},
        {"token": "bytes:\\xe6", "logprob": -2.0, "bytes": [0xE6]}]}
    assert token_bytes()[EOS] == b"" and token_text("é".encode()) == "é"


@pytest.mark.parametrize("graph_layout", [False, True])
def test_grammars_make_valid_json_batched_with_free_rows(model, graph_layout):
    """Constrained rows (a JSON schema, any JSON object), greedy and sampled, batched with unconstrained ones:
    every constrained output parses and validates, and ends with "stop" when its JSON is complete."""
    engine = make_engine(model, graph_layout)
    person, any_object = grammar_for({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}), \
        grammar_for({"type": "json_object"})
    prompts = prompts_of([6, 12, 20, 9, 15], seed=5)
    requests = [EngineRequest("g0", prompts[0], SamplingParams(temperature=0.0), 300, grammar=person),
                EngineRequest("g1", prompts[1], SamplingParams(temperature=0.8, seed=2), 300, grammar=person),
                EngineRequest("free", prompts[2], SamplingParams(temperature=0.8, seed=3), 20),
                EngineRequest("g3", prompts[3], SamplingParams(temperature=0.5, seed=4, frequency_penalty=0.4), 300,
                              grammar=person, logprobs=2),
                EngineRequest("g4", prompts[4], SamplingParams(temperature=0.3, seed=5), 300, grammar=any_object)]
    try:
        results = run_all(engine, requests)
    finally:
        engine.shutdown()
    decode = raw_tokenizer().decode
    for request, result in zip(requests, results):
        if request.grammar is None:
            assert result["reason"] == "length"
            continue
        assert result["reason"] == "stop", result
        value = json.loads(decode(result["tokens"]))
        jsonschema.validate(value, PERSON if request.grammar == person else {"type": "object"})
    assert len(results[3]["logprobs"]) == len(results[3]["tokens"])


def test_a_resumed_constrained_request_continues_its_json(model):
    """A job cut after k tokens resumes with them as prompt: its matcher consumes them first, and the rest
    completes the same JSON as the uncut run (greedy)."""
    grammar = grammar_for({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    engine = make_engine(model)
    prompt = prompts_of([7], seed=8)[0]
    try:
        whole = collect(engine.submit(EngineRequest("w", prompt, SamplingParams(temperature=0.0), 300,
                                                    grammar=grammar)))
        cut = whole["tokens"][:5]
        rest = collect(engine.submit(EngineRequest("r", prompt + cut, SamplingParams(temperature=0.0), 295,
                                                   num_resumed_tokens=5, grammar=grammar)))
        refused = collect(engine.submit(EngineRequest("x", prompt + [29871, 29871], SamplingParams(), 10,
                                                      num_resumed_tokens=2, grammar=grammar)))
    finally:
        engine.shutdown()
    assert cut + rest["tokens"] == whole["tokens"] and rest["reason"] == "stop"
    assert refused["reason"] == "error" and "do not fit the grammar" in refused["error"]


@pytest.mark.parametrize("schema", [{"type": "nonsense"}, {"$ref": "#/nowhere"}, {"type": "string", "pattern": "("},
                                    "not an object"])
def test_invalid_schemas_are_refused_with_the_reason(schema):
    with pytest.raises(GrammarError) as error:
        json_schema_grammar(schema)
    assert str(error.value)


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_choices_share_the_prompts_prefill_and_draw_their_own_tokens(model, prefix_caching):
    """Issue 15, n: siblings (another choice of the same job) copy the prompt's KV from the first choice once it
    has computed it, and compute only the prompt's last token; each draws exactly what it would alone."""
    prompt = prompts_of([90], seed=13)[0]
    params = [SamplingParams(temperature=0.8, seed=s) for s in (1, 2, 3)]

    def requests(shared: bool) -> list[EngineRequest]:
        return [EngineRequest("job", prompt, params[0], 12)] + [
            EngineRequest(f"job#{i}", prompt, params[i], 12, shares_prompt_with="job" if shared else None)
            for i in (1, 2)]

    engine = make_engine(model, prefix_caching=prefix_caching)
    try:
        alone = [collect(engine.submit(r))["tokens"] for r in requests(shared=False)]
        assert engine.scheduler.num_shared_tokens == 0
        together = [r["tokens"] for r in run_all(engine, requests(shared=True))]
        # With the prefix cache the siblings find the prompt's full blocks there: only the partial last one
        # (89 = 5 x 16 + 9 tokens) is copied.
        copied = (len(prompt) - 1) % 16 if prefix_caching else len(prompt) - 1
        assert engine.scheduler.num_shared_tokens == 2 * copied
    finally:
        engine.shutdown()
    assert together == alone and len({tuple(t) for t in alone}) == 3


def test_the_compiled_mask_equals_the_tensor_ops(monkeypatch):
    """The constrained rows' -inf, from the packed bitmask: one compiled pass on the CPU, tensor ops on a GPU."""
    from workers.engine import cpu_kernels
    from workers.engine.grammar import GrammarSupport

    support = GrammarSupport(32000, 4, torch.device("cpu"))
    matchers = [support.matcher(grammar_for({"type": "json_object"})),
                support.matcher(grammar_for({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}),
                                [support._llg_tokenizer().tokenize_str('{"name":"ab')[0]])]
    logits = torch.randn(3, 32000, generator=torch.Generator().manual_seed(3))
    compiled = logits.clone()
    support.apply_(compiled, [0, 2], support.fill_async(matchers))
    monkeypatch.setattr(cpu_kernels, "enabled", False)
    tensor_ops = logits.clone()
    support.apply_(tensor_ops, [0, 2], support.fill_async(matchers))
    assert torch.equal(compiled, tensor_ops) and torch.equal(compiled[1], logits[1])
    assert 0 < int(torch.isfinite(compiled[0]).sum()) < 100 and 0 < int(torch.isfinite(compiled[2]).sum())


def test_the_compiled_mask_on_words_none_all_or_some_allowed_and_a_partial_last_word():
    """Words with no token allowed take the kernel's fill, words with all allowed are skipped, the rest go bit
    by bit; a vocabulary that is not a multiple of 32 ends in a partial word (its bits past V are ignored)."""
    from workers.engine import cpu_kernels

    if not cpu_kernels.enabled:
        pytest.skip("numba is not installed")
    vocab, gen = 1005, torch.Generator().manual_seed(4)
    words = torch.randint(-2**31, 2**31 - 1, (3, (vocab + 31) // 32), dtype=torch.int32, generator=gen)
    words[0] = 0
    words[1, ::2] = 0
    words[1, 1::4] = -1
    words[2, -1] = 0
    logits = torch.randn(4, vocab, generator=gen)
    rows = torch.tensor([3, 0, 1])
    compiled = logits.clone()
    assert cpu_kernels.apply_token_mask_(compiled, rows, words)
    bits = ((words.unsqueeze(2) >> torch.arange(32, dtype=torch.int32)) & 1).view(3, -1)[:, :vocab]  # [R, V]
    expected = logits.clone()
    expected[rows] = expected[rows].masked_fill(bits == 0, float("-inf"))
    assert torch.equal(compiled, expected) and torch.isinf(compiled[3]).all() and torch.equal(compiled[2], logits[2])


def test_an_engine_that_ignores_eos_still_ends_a_complete_grammar(model):
    """The benchmark's engine has eos_token_id=-1 (no row ends on EOS): a constrained row still ends with
    "stop" when its JSON is complete (the grammar knows the tokenizer's own EOS)."""
    engine = Engine(model, torch.device("cpu"), eos_token_id=-1, config=EngineConfig(max_model_len=1024))
    grammar = grammar_for({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    try:
        result = collect(engine.submit(EngineRequest("e", prompts_of([5])[0], SamplingParams(seed=1), 300,
                                                     grammar=grammar)))
    finally:
        engine.shutdown()
    assert result["reason"] == "stop"
    jsonschema.validate(json.loads(raw_tokenizer().decode(result["tokens"])), PERSON)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_top_k_by_blocks_equals_topk(k):
    from workers.engine.logits_processors import top_k_rows

    values = torch.randn(7, 32000, generator=torch.Generator().manual_seed(k))
    values[3, 1000:1128] += 5  # the top k in one block
    expected = values.topk(k, dim=-1)
    top, ids = top_k_rows(values, k)
    assert torch.equal(top, expected.values) and torch.equal(ids, expected.indices)


def test_logprobs_of_rows_spanning_hundreds_of_nats_equal_log_softmax():
    """A real model's rows span far more than float32's exp range (the floor that keeps exp fast must not change
    a logprob), and a token forced by logit_bias may lie hundreds of nats below the top: its logprob is exact."""
    from types import SimpleNamespace

    from workers.engine.logits_processors import LogprobsScratch, RawLogprobs

    logits = torch.randn(3, 32000, generator=torch.Generator().manual_seed(3)) * 60
    logits[2, 7] = logits[2].min() - 300
    rows = [SimpleNamespace(logprobs=5), SimpleNamespace(logprobs=None), SimpleNamespace(logprobs=0)]
    scratch = LogprobsScratch()
    RawLogprobs.of(logits.flip(1), [SimpleNamespace(logprobs=1)] * 3, scratch)  # the step before, same scratch
    entries = RawLogprobs.of(logits, rows, scratch).entries([11, 0, 7])
    expected = logits[[0, 2]].log_softmax(dim=-1)
    assert entries[1] is None
    assert abs(entries[0][0] - expected[0, 11].item()) < 1e-3 and abs(entries[2][0] - expected[1, 7].item()) < 1e-3
    top = expected[0].topk(5)
    assert [t for t, _ in entries[0][1]] == top.indices.tolist() and entries[2][1] == ()
    assert all(abs(v - w) < 1e-3 for (_, v), w in zip(entries[0][1], top.values.tolist()))


@pytest.mark.parametrize("asking", [(5, 5, 5), (5, None, 0)])
def test_logprobs_on_their_own_thread_read_the_logits_as_they_were_when_started(asking):
    """LogprobsPass's thread computes from a copy: the engine thread changes the step's logits in place (the
    draw's temperature, a grammar's mask) as soon as start() returns, and the logprobs are the raw ones still."""
    from types import SimpleNamespace

    from workers.engine.logits_processors import LogprobsPass, RawLogprobs

    logits = torch.randn(3, 32000, generator=torch.Generator().manual_seed(5)) * 8
    raw = logits.clone()
    rows = [SimpleNamespace(logprobs=k) for k in asking]
    pass_ = LogprobsPass(torch.device("cpu"), threaded=True)
    with torch.inference_mode():
        logits = logits.clone()  # an inference tensor, as the model's
        for step in range(3):  # the pass's scratch tensors are reused from step to step
            wait = pass_.start(logits, rows)
            logits.mul_(-3.0).add_(1.0)  # what the draw does to the step's own tensor meanwhile
            got = wait().entries([11, 0, 7])
            expected = RawLogprobs.of(raw, rows).entries([11, 0, 7])
            assert _same_entries(got, expected)
            logits.copy_(raw)


def _same_entries(got, expected) -> bool:
    for a, b in zip(got, expected):
        if (a is None) != (b is None):
            return False
        if a is not None and (abs(a[0] - b[0]) > 1e-4 or [t for t, _ in a[1]] != [t for t, _ in b[1]]):
            return False
    return True
