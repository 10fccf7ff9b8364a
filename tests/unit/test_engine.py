"""The engine on its own, with the real tiny model: greedy output equals Hugging Face `generate()` (alone and
batched with staggered arrivals and chunked prompts), seeds reproduce whatever the batch, EOS / max_tokens /
cancel end a request with the right reason, a small KV cache makes requests wait (or preempts) and they still
finish right, a request larger than the cache gets an error."""
from __future__ import annotations

import threading

import pytest
import torch

from workers.engine.config import EngineConfig
from workers.engine.engine import Engine, EngineRequest
from workers.engine.sampling import SamplingParams
from workers.model_loader import build_tiny_random

EOS = 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


# --- continuous batching over the paged KV cache

def start(engine, request_id, prompt, max_tokens, **sampling):
    """Submit and collect the stream on a thread; returns (result dict, first-output event, thread)."""
    stream = engine.submit(EngineRequest(request_id, prompt, SamplingParams(**sampling), max_tokens))
    result = {"tokens": [], "reason": None, "error": None}
    first = threading.Event()

    def collect():
        for output in stream:
            result["tokens"] += output.token_ids
            result["reason"], result["error"] = output.finish_reason, output.error
            first.set()
        first.set()

    thread = threading.Thread(target=collect, daemon=True)
    thread.start()
    return result, first, thread


def finish_all(threads, timeout=120):
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), "a request never finished"


def expected_greedy(model, prompt, max_tokens, eos=EOS):
    expected = hf_greedy(model, prompt, max_tokens)
    if eos in expected:
        expected = expected[:expected.index(eos) + 1]
    return expected


def prompts_of(lengths, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, 32000, (n - 1,), generator=gen).tolist() for n in lengths]


def test_staggered_batch_matches_hf_generate(model):
    """16 requests of 3..300 prompt tokens arrive one by one while the earlier ones decode; prompts are chunked
    (64 tokens a step). Each one's greedy output equals generate() run alone."""
    lengths = [3, 300, 17, 64, 65, 128, 5, 250, 33, 190, 7, 99, 150, 12, 280, 45]
    prompts = prompts_of(lengths)
    max_tokens = [20 + (i % 5) * 3 for i in range(len(prompts))]
    engine = Engine(model, torch.device("cpu"), eos_token_id=EOS,
                    config=EngineConfig(prefill_chunk_tokens=64, max_num_seqs=16))
    try:
        runs = []
        for i, prompt in enumerate(prompts):
            runs.append(start(engine, f"s{i}", prompt, max_tokens[i], temperature=0.0))
            runs[-1][1].wait(60)  # the next arrives once this one streams, while the others decode
        finish_all([thread for _, _, thread in runs])
        stats = engine.stats()
    finally:
        engine.shutdown()
    generated = 0
    for (result, _, _), prompt, n in zip(runs, prompts, max_tokens):
        expected = expected_greedy(model, prompt, n)
        assert result["tokens"] == expected, f"prompt of {len(prompt)} tokens"
        assert result["reason"] == ("stop" if expected[-1] == EOS else "length")
        generated += len(expected)
    # Batched: far fewer steps than tokens (one request at a time needs one step per token, plus chunks).
    assert stats["steps"] < generated * 0.6
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0
    assert stats["eager_steps"] == stats["steps"] and stats["graph_steps"] == 0  # on the CPU, every step is eager


def reference_sample(model, prompt, max_tokens, params: SamplingParams):
    """Slow reference: the whole sequence through Hugging Face each step, OpenAI's penalties in dense form over
    the generated tokens, then sampling.py's draw for that output position on the last logits."""
    from workers.engine.sampling import sample, sampling_tensors, seed_key
    temperature, top_p, _, _ = sampling_tensors([params], "cpu")
    counts = torch.zeros(model.config.vocab_size)
    tokens = list(prompt)
    with torch.no_grad():
        for position in range(max_tokens):
            logits = model(torch.tensor([tokens])).logits[:, -1, :].float()
            logits -= counts * params.frequency_penalty + (counts > 0).float() * params.presence_penalty
            token = int(sample(logits, temperature, top_p, torch.tensor([seed_key(params.seed)]),
                               torch.tensor([position]))[0])
            counts[token] += 1
            tokens.append(token)
            if token == EOS:
                break
    return tokens[len(prompt):]


def test_seeded_sampling_does_not_depend_on_the_batch(model, engine):
    """A request alone, twice, and the same request among 31 others (greedy, sampled and penalised, of every
    length) give the same tokens, and those of the slow reference."""
    prompt = [1, 733, 16289, 28793, 22557]
    params = dict(temperature=1.0, top_p=0.9, seed=7, frequency_penalty=0.5, presence_penalty=0.3)
    alone_a, _ = run(engine, prompt, 25, request_id="alone-a", **params)
    alone_b, _ = run(engine, prompt, 25, request_id="alone-b", **params)
    others = [start(engine, f"o{i}", p, 30, temperature=0.4 * (i % 3), top_p=(1.0, 0.8)[i % 2], seed=i,
                    presence_penalty=0.2 * (i % 2))
              for i, p in enumerate(prompts_of([4 + 7 * i for i in range(31)], seed=3))]
    together = start(engine, "together", prompt, 25, **params)
    finish_all([thread for _, _, thread in others] + [together[2]])
    assert alone_a == alone_b == together[0]["tokens"]
    assert alone_a == reference_sample(model, prompt, 25, SamplingParams(**params))


@pytest.mark.parametrize("params", [dict(temperature=0.8, top_p=0.95, seed=11),
                                    dict(temperature=0.3, seed=5, frequency_penalty=0.9, presence_penalty=0.6),
                                    dict(temperature=0.0, frequency_penalty=1.5)])
def test_a_resumed_request_continues_as_if_never_cut(params):
    """A job cut after k tokens resumes with prompt + those k tokens (num_resumed_tokens=k): it generates exactly
    the rest of the uncut output. Its draws continue at position k, and its penalties count the k tokens."""
    small = build_tiny_random(vocab_size=64)  # a small vocabulary repeats tokens: the penalties matter
    prompt = torch.randint(3, 64, (12,), generator=torch.Generator().manual_seed(8)).tolist()
    engine = Engine(small, torch.device("cpu"), eos_token_id=-1)  # no early EOS in a 64-token vocabulary
    try:
        uncut, _ = run(engine, prompt, 40, request_id="uncut", **params)
        assert len(uncut) == 40
        for cut in (1, 17, 39):
            stream = engine.submit(EngineRequest(f"resumed-{cut}", prompt + uncut[:cut], SamplingParams(**params),
                                                 len(uncut) - cut, num_resumed_tokens=cut))
            rest = [t for output in stream for t in output.token_ids]
            assert uncut[:cut] + rest == uncut, cut
        # The resumed tokens count for the penalties: treated as prompt, the tail would differ.
        if params.get("frequency_penalty"):
            blind, _ = run(engine, prompt + uncut[:17], len(uncut) - 17, request_id="blind", **params)
            assert uncut[:17] + blind != uncut
    finally:
        engine.shutdown()


def test_cancel_leaves_the_batch_and_frees_its_blocks(model):
    engine = Engine(model, torch.device("cpu"), eos_token_id=EOS, config=EngineConfig(num_kv_blocks=64))
    try:
        prompt = prompts_of([40], seed=5)[0]
        keep, _, keep_thread = start(engine, "keep", prompt, 40, temperature=0.0)
        stream = engine.submit(EngineRequest("drop", prompts_of([70], seed=6)[0], SamplingParams(temperature=0.0),
                                             100000))
        first = next(iter(stream))
        assert first.finish_reason is None
        used = engine.stats()["kv_blocks_used"]
        assert used >= 5  # 70 prompt tokens: 5 blocks of 16
        engine.cancel("drop")
        outputs = stream.next_outputs(timeout=30)
        while outputs[-1].finish_reason is None:
            outputs = stream.next_outputs(timeout=30)
        assert outputs[-1].finish_reason == "cancelled"
        finish_all([keep_thread])
        stats = engine.stats()
        assert stats["kv_blocks_used"] == 0 and stats["running"] == 0
    finally:
        engine.shutdown()
    assert keep["tokens"] == expected_greedy(model, prompt, 40)


def test_small_cache_requests_wait_then_all_complete(model):
    """10 blocks of 16 tokens hold about two requests at a time: the rest wait; decoding outgrows the cache, so
    the newest running request is preempted and recomputed later. All finish and match generate()."""
    lengths = [30, 45, 20, 60, 25, 50, 35, 40]
    prompts = prompts_of(lengths, seed=9)
    engine = Engine(model, torch.device("cpu"), eos_token_id=EOS,
                    config=EngineConfig(num_kv_blocks=10, prefill_chunk_tokens=48))
    try:
        runs = [start(engine, f"w{i}", p, 40, temperature=0.0) for i, p in enumerate(prompts)]
        finish_all([thread for _, _, thread in runs])
        stats = engine.stats()
    finally:
        engine.shutdown()
    for (result, _, _), prompt in zip(runs, prompts):
        assert result["tokens"] == expected_greedy(model, prompt, 40)
    assert engine.scheduler.num_preempted > 0
    assert stats["kv_blocks_used"] == 0 and stats["kv_blocks_total"] == 10


def test_request_larger_than_the_cache_gets_an_error(model):
    engine = Engine(model, torch.device("cpu"), eos_token_id=EOS, config=EngineConfig(num_kv_blocks=4))
    try:
        tokens, reason = run(engine, prompts_of([64], seed=2)[0], 5, request_id="huge")  # 64 + 1 > 4 x 16
        assert (tokens, reason) == ([], "error")
        stream = engine.submit(EngineRequest("huge2", prompts_of([100])[0], SamplingParams(), 5))
        final = list(stream)[-1]
        assert final.finish_reason == "error" and "KV" in final.error
        assert run(engine, [1, 733], 3, request_id="small", temperature=0.0)[1] == "length"
    finally:
        engine.shutdown()


def static_decode_tokens(model, prompts, max_tokens, **config) -> list[list[int]]:
    """Each prompt's greedy tokens through the CUDA-graph paths run eagerly on the CPU (decode-only steps: the
    padded batch, static buffers, null block; steps with a prefill: the piecewise layout padded to a token
    bucket), the prompts decoding together."""
    from workers.engine.cuda_graphs import DecodeGraphs, PiecewiseGraphs

    engine = Engine(model, torch.device("cpu"), eos_token_id=EOS,
                    config=EngineConfig(max_model_len=1024, max_num_seqs=8, **config))
    try:
        engine.runner.graphs = DecodeGraphs(engine.runner, capture=False)
        engine.runner.piecewise = PiecewiseGraphs(engine.runner, capture=False)
        runs = [start(engine, f"g{i}", p, max_tokens, temperature=0.0) for i, p in enumerate(prompts)]
        finish_all([thread for _, _, thread in runs])
    finally:
        engine.shutdown()
    return [result["tokens"] for result, _, _ in runs]


def test_static_decode_path_matches_generate(model):
    prompts = prompts_of([5, 40, 17, 90, 3], seed=4)
    assert static_decode_tokens(model, prompts, 30) == [expected_greedy(model, p, 30) for p in prompts]


def test_stats_and_config_from_settings():
    from config.settings import Settings

    config = EngineConfig.from_settings(Settings(max_num_seqs=8, kv_block_size=32, kv_cache_tokens=1000,
                                                 prefill_chunk_tokens=128, max_model_len=4096))
    assert (config.max_num_seqs, config.block_size, config.num_kv_blocks) == (8, 32, 32)
    assert (config.prefill_chunk_tokens, config.max_model_len, config.max_blocks_per_seq) == (128, 4096, 128)
    assert EngineConfig.from_settings(Settings(kv_cache_tokens=0)).num_kv_blocks is None
    engine = Engine(build_tiny_random(), torch.device("cpu"), eos_token_id=EOS, config=EngineConfig(kv_cpu_tokens=1000))
    try:
        engine.warmup()
        assert engine.stats() == dict(running=0, waiting=0, kv_blocks_used=0, kv_blocks_total=63, kv_blocks_cached=0,
                                      prefix_cache_queries=0, prefix_cache_hits=0, steps=0, graph_steps=0,
                                      eager_steps=0)
    finally:
        engine.shutdown()
    assert EngineConfig.from_settings(Settings(prefix_caching=False)).enable_prefix_caching is False
    assert EngineConfig().enable_prefix_caching is True


def test_penalties_and_sampling_batched_with_preemption_match_reference():
    """A 64-token vocabulary repeats tokens, so the penalties (per-slot output counts, rebuilt after preemption)
    change the output; batched in a small cache that preempts, every request equals its slow reference."""
    small = build_tiny_random(vocab_size=64)
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 64, (n,), generator=gen).tolist() for n in (9, 30, 17, 41, 5, 24)]
    params = [dict(temperature=0.0, frequency_penalty=1.5), dict(temperature=0.0, presence_penalty=2.0),
              dict(temperature=0.9, top_p=0.8, seed=3, frequency_penalty=0.7, presence_penalty=0.4),
              dict(temperature=1.2, seed=4), dict(temperature=0.0),
              dict(temperature=0.7, seed=5, frequency_penalty=-0.5)]
    engine = Engine(small, torch.device("cpu"), eos_token_id=EOS,
                    config=EngineConfig(num_kv_blocks=9, block_size=8, prefill_chunk_tokens=16))
    try:
        runs = [start(engine, f"p{i}", p, 40, **kw) for i, (p, kw) in enumerate(zip(prompts, params))]
        finish_all([thread for _, _, thread in runs])
    finally:
        engine.shutdown()
    assert engine.scheduler.num_preempted > 0
    for (result, _, _), prompt, kw in zip(runs, prompts, params):
        assert result["tokens"] == reference_sample(small, prompt, 40, SamplingParams(**kw)), kw
    unpenalized = reference_sample(small, prompts[0], 40, SamplingParams(temperature=0.0))
    assert runs[0][0]["tokens"] != unpenalized  # the penalty mattered


def test_argmax_rows_is_argmax():
    from workers.engine.sampling import argmax_rows

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 32000, generator=gen)
    logits[1, 5000] = logits[1, 100] = 50.0          # ties: the first index wins, as with argmax
    logits[2, 31999] = 60.0
    logits[3, 127] = logits[3, 128] = 40.0           # a tie across the block boundary
    logits[4, :] = -1.0                              # all equal
    logits[5, 9] = float("inf")
    assert argmax_rows(logits).tolist() == logits.argmax(dim=-1).tolist()
    assert argmax_rows(logits).tolist()[1:5] == [100, 31999, 127, 0]
    odd = torch.randn(3, 1000, generator=gen)        # not a multiple of the block: plain argmax
    assert argmax_rows(odd).tolist() == odd.argmax(dim=-1).tolist()


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(model):
    engine = Engine(model, torch.device("cpu"), eos_token_id=EOS, config=EngineConfig(num_kv_blocks=64))
    try:
        real_run, calls = engine.runner.run, []

        def flaky_run(batch):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("boom")
            return real_run(batch)

        engine.runner.run = flaky_run
        stream = engine.submit(EngineRequest("a", [1, 733], SamplingParams(temperature=0.0), 10))
        outputs = list(stream)
        assert [len(o.token_ids) for o in outputs] == [1, 1, 0] and outputs[-1].finish_reason == "error"
        assert "boom" in outputs[-1].error and engine.stats()["kv_blocks_used"] == 0
        assert run(engine, [1, 733], 4, request_id="b", temperature=0.0) == (expected_greedy(model, [1, 733], 4),
                                                                             "length")

        def broken_schedule():  # a bug in the bookkeeping: everyone fails, the engine starts afresh
            raise RuntimeError("bookkeeping")

        engine.scheduler.schedule = broken_schedule
        tokens, reason = run(engine, [1, 733], 4, request_id="c", temperature=0.0)
        assert (tokens, reason) == ([], "error")
        assert run(engine, [1, 733], 4, request_id="d", temperature=0.0)[1] == "length"
    finally:
        engine.shutdown()


def test_shutdown_ends_every_request(model):
    engine = Engine(model, torch.device("cpu"), eos_token_id=EOS, config=EngineConfig(num_kv_blocks=64))
    stream = engine.submit(EngineRequest("forever", [1, 733], SamplingParams(temperature=0.0), 10**9))
    next(iter(stream))
    engine.shutdown()
    assert [o.finish_reason for o in stream][-1] == "error"
    late = engine.submit(EngineRequest("late", [1, 733], SamplingParams(), 3))
    assert list(late)[-1].finish_reason == "error"
    with pytest.raises(RuntimeError):
        engine.warmup()


def test_a_broken_device_ends_the_engine_instead_of_failing_every_request(model):
    """Issue 13, case 5: a sticky CUDA error makes every later step fail. The engine reports it once through
    on_fatal (the engine process exits there, and its jobs resume elsewhere) instead of failing request after
    request; so does any error that fails `max_failed_steps` steps in a row. A single failed step does not."""
    for error, failing_calls in ((RuntimeError("CUDA error: an illegal memory access was encountered"), 1),
                                 (ValueError("something else, every step"), 3)):
        engine = Engine(model, torch.device("cpu"), eos_token_id=EOS,
                        config=EngineConfig(num_kv_blocks=64, max_failed_steps=3))
        fatal, calls = [], []

        def broken_run(batch, error=error):
            calls.append(1)
            raise error

        engine.on_fatal = fatal.append
        engine.runner.run = broken_run
        try:
            for i in range(failing_calls):
                assert run(engine, [1, 733], 4, request_id=f"r{i}", temperature=0.0)[1] == "error"
            assert fatal == [error] and len(calls) == failing_calls
        finally:
            engine.shutdown()


def test_one_failed_step_is_not_fatal(model):
    engine = Engine(model, torch.device("cpu"), eos_token_id=EOS, config=EngineConfig(num_kv_blocks=64))
    fatal, real_run, calls = [], engine.runner.run, []

    def fails_now_and_then(batch):
        calls.append(1)
        if len(calls) % 2:
            raise ValueError("flaky")
        return real_run(batch)

    engine.on_fatal = fatal.append
    engine.runner.run = fails_now_and_then
    try:
        for i in range(4):
            run(engine, [1, 733], 1, request_id=f"r{i}", temperature=0.0)
        assert fatal == []
    finally:
        engine.shutdown()


def test_out_of_memory_preempts_half_the_batch_and_retries(model):
    """Issue 14: a step that runs out of device memory is retried smaller (the newest half of the batch
    preempted and recomputed later, the batch capped), and every request still gets exactly its tokens."""
    engine = Engine(model, torch.device("cpu"), eos_token_id=EOS,
                    config=EngineConfig(num_kv_blocks=256, max_num_seqs=8, max_model_len=1024))
    real_run, ooms = engine.runner.run, []

    def runs_out_on_a_big_batch(batch):
        if len(batch.decode) + len(batch.prefill) >= 6 and not ooms:
            ooms.append(len(batch.decode) + len(batch.prefill))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_run(batch)

    fatal = []
    engine.on_fatal = fatal.append
    engine.runner.run = runs_out_on_a_big_batch
    prompts = prompts_of([5, 9, 3, 12, 7, 4, 8, 6], seed=9)
    try:
        runs = [start(engine, f"o{i}", p, 12, temperature=0.0) for i, p in enumerate(prompts)]
        finish_all([thread for _, _, thread in runs])
        assert ooms and fatal == []
        assert engine.scheduler.num_preempted >= ooms[0] // 2
        assert engine.scheduler.shrunk  # capped until OOM_RECOVERY_STEPS good steps
        assert [r["tokens"] for r, _, _ in runs] == [expected_greedy(model, p, 12) for p in prompts]
        assert {r["reason"] for r, _, _ in runs} <= {"length", "stop"}
    finally:
        engine.shutdown()


def test_out_of_memory_with_one_sequence_ends_the_engine_or_fails_loudly(model):
    """Nothing left to preempt: the engine ends through on_fatal (its jobs resume elsewhere); an engine
    without on_fatal (a test, the benchmark) fails the request with the error, never silently."""
    for with_fatal in (True, False):
        engine = Engine(model, torch.device("cpu"), eos_token_id=EOS, config=EngineConfig(num_kv_blocks=64,
                                                                                          max_failed_steps=3))
        error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        fatal = []

        def out_of_memory(batch):
            raise error

        if with_fatal:
            engine.on_fatal = fatal.append
        engine.runner.run = out_of_memory
        try:
            stream = engine.submit(EngineRequest("alone", [1, 733], SamplingParams(temperature=0.0), 4))
            outputs = list(stream)
            assert outputs[-1].finish_reason == "error" and "out of memory" in outputs[-1].error
            assert fatal == ([error] if with_fatal else [])
        finally:
            engine.shutdown()


def test_sampling_inside_the_decode_graph_draws_what_the_eager_engine_draws(model):
    """Issue 14: decode-only steps draw their tokens inside the graph (sampling.sample_static; capture off here,
    the same padded path); rows with penalties in the batch send the step back to the eager sampler. Every
    request, seeded, sampled or greedy, penalised or not, gets the tokens of the plain eager engine."""
    from workers.engine.cuda_graphs import DecodeGraphs, PiecewiseGraphs

    prompts = prompts_of([6, 30, 11, 52, 3, 17, 25, 9], seed=12)
    params = [dict(temperature=0.3, seed=i) if i % 4 else dict(temperature=0.0) for i in range(6)]
    params += [dict(temperature=0.9, top_p=0.02, seed=3), dict(temperature=0.5, seed=4, frequency_penalty=0.7)]

    def tokens(graph_layout: bool) -> list[list[int]]:
        engine = Engine(model, torch.device("cpu"), eos_token_id=EOS,
                        config=EngineConfig(max_model_len=1024, max_num_seqs=8))
        try:
            if graph_layout:
                engine.runner.graphs = DecodeGraphs(engine.runner, capture=False)
                engine.runner.piecewise = PiecewiseGraphs(engine.runner, capture=False)
            runs = [start(engine, f"s{i}", p, 24, **params[i]) for i, p in enumerate(prompts)]
            finish_all([thread for _, _, thread in runs])
            if graph_layout:
                assert engine.runner.eager_steps > 0  # (capture off: every step counts as eager)
        finally:
            engine.shutdown()
        return [result["tokens"] for result, _, _ in runs]

    assert tokens(True) == tokens(False)
