"""The model runner's forward pass on its own, logits against Hugging Face's full forward pass: chunked
prefill (chunks not aligned to blocks), batched decode mixed with prefill chunks, sequences arriving late, and
the static (CUDA-graph layout) decode path. Token-level checks with a random model are weak (its argmax barely
depends on the context), so these compare logits with a tolerance far below what an attention bug moves."""
from __future__ import annotations

import pytest
import torch

from workers.engine.block_manager import BlockManager
from workers.engine.config import EngineConfig
from workers.engine.cuda_graphs import DecodeGraphs, PiecewiseGraphs
from workers.engine.model_runner import ModelRunner
from workers.engine.sampling import SamplingParams
from workers.engine.scheduler import Scheduler
from workers.engine.sequence import Sequence
from workers.model_loader import build_tiny_random


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    # Larger initial weights than the default: the logits depend strongly on the context.
    return build_tiny_random(initializer_range=0.2)


def reference_logits(model, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([token_ids]), logits_to_keep=1).logits[0, -1].float()  # [V]


def drive(model, prompts, arrivals, decode_steps, static=False, piecewise=False, **config):
    """Runs prompts through scheduler + runner (prompt i joins at step arrivals[i]); each sampled row's logits
    are checked against the reference, and the next token is the reference argmax. Returns the worst error
    relative to the logits' spread, the number of mixed steps (decode rows and prefill chunks together) and of
    preemptions."""
    config = EngineConfig(**{"block_size": 4, "num_kv_blocks": 200, "max_model_len": 512, "max_num_seqs": 8,
                             **config})
    runner = ModelRunner(model, torch.device("cpu"), config)
    if static:
        runner.graphs = DecodeGraphs(runner, capture=False)
    if piecewise:
        runner.piecewise = PiecewiseGraphs(runner, capture=False)
    scheduler = Scheduler(config, BlockManager(runner.num_blocks, config.block_size))
    seqs = [Sequence(f"r{i}", p, SamplingParams(temperature=0.0), decode_steps) for i, p in enumerate(prompts)]
    worst, mixed, step = 0.0, 0, 0
    while step < 1000:
        for seq, arrival in zip(seqs, arrivals):
            if arrival == step:
                scheduler.add(seq)
        if not scheduler.has_unfinished() and step > max(arrivals):
            break
        batch = scheduler.schedule()
        step += 1
        if batch.is_empty:
            continue
        mixed += bool(batch.decode and batch.prefill)
        sampled = batch.sampled()
        logits = runner.run(batch).logits                                 # [S, V]
        assert logits.shape == (len(sampled), model.config.vocab_size)
        for seq in batch.decode:
            seq.num_computed_tokens += 1
        for seq, n in zip(batch.prefill, batch.prefill_lens):
            seq.num_computed_tokens += n
        for row, seq in zip(logits, sampled):
            expected = reference_logits(model, seq.token_ids)
            worst = max(worst, float((row - expected).abs().max() / expected.std()))
            seq.token_ids.append(int(expected.argmax()))
            if seq.num_output_tokens >= seq.max_tokens:
                scheduler.finish(seq)
    assert all(s.num_output_tokens == decode_steps for s in seqs)
    return worst, mixed, scheduler.num_preempted


PROMPTS = [[1, 5], [1] + list(range(200, 222)), [7], [1] + list(range(900, 940)), [1] + list(range(3, 64)),
           [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]


def test_chunked_prefill_and_batched_decode_match_hf_logits(model):
    worst, mixed, _ = drive(model, PROMPTS, arrivals=[0, 0, 2, 3, 5, 9], decode_steps=8, prefill_chunk_tokens=7)
    assert mixed > 3  # decode rows and prefill chunks did share steps
    assert worst < 1e-4


def test_whole_prompts_in_one_chunk_match_hf_logits(model):
    worst, _, _ = drive(model, PROMPTS, arrivals=[0] * len(PROMPTS), decode_steps=5, prefill_chunk_tokens=512)
    assert worst < 1e-4


def test_static_decode_path_matches_hf_logits(model):
    worst, _, _ = drive(model, PROMPTS[:5], arrivals=[0, 1, 1, 2, 2], decode_steps=10, static=True,
                     prefill_chunk_tokens=16)
    assert worst < 1e-4


def test_piecewise_path_matches_hf_logits(model):
    """Steps with a prefill through the piecewise-graph layout (padded to a token bucket, static buffers between
    the pieces, attention between them), run eagerly; decode-only steps through the decode-graph layout."""
    worst, mixed, _ = drive(model, PROMPTS, arrivals=[0, 0, 2, 3, 5, 9], decode_steps=8, static=True,
                            piecewise=True, prefill_chunk_tokens=7)
    assert mixed > 3
    assert worst < 1e-4


def test_piecewise_path_alone_runs_decode_steps_too(model):
    worst, _, preempted = drive(model, [[1] + list(range(10, 30)), [1] + list(range(40, 60)),
                                        [1] + list(range(70, 84))],
                                arrivals=[0, 0, 1], decode_steps=16, piecewise=True, num_kv_blocks=16,
                                prefill_chunk_tokens=16)
    assert preempted > 0  # readmitted sequences get fresh block-table rows
    assert worst < 1e-4


def test_preempted_and_recomputed_sequences_match_hf_logits(model):
    # 16 blocks of 4 tokens cannot hold these sequences at once: decoding preempts and they are recomputed.
    worst, _, preempted = drive(model, [[1] + list(range(10, 30)), [1] + list(range(40, 60)),
                                        [1] + list(range(70, 84))],
                                arrivals=[0, 0, 0], decode_steps=16, num_kv_blocks=16, prefill_chunk_tokens=16)
    assert preempted > 0
    assert worst < 1e-4


def test_kv_cache_sizing_leaves_room_for_activations_and_graphs():
    from workers.engine.model_runner import kv_blocks_for

    gib = 2**30
    # 10 GiB free, 1 GiB for the largest step and the graph pool: 90% of the other 9 GiB, in 2 MiB blocks.
    assert kv_blocks_for(10 * gib, gib, 0.9, 2 * 2**20) == int(9 * gib * 0.9) // (2 * 2**20)
    with pytest.raises(RuntimeError, match="no GPU memory left"):
        kv_blocks_for(gib, 2 * gib, 0.9, 2 * 2**20)


def test_profile_step_runs_the_largest_step_on_a_probe_cache(model):
    """What the GPU sizing runs before the KV cache exists (here on the CPU): the largest step there can be,
    split into prompts that max_model_len allows, on a cache of just the blocks it needs."""
    config = EngineConfig(block_size=4, num_kv_blocks=8, max_model_len=40, max_num_seqs=4, prefill_chunk_tokens=60)
    runner = ModelRunner(model, torch.device("cpu"), config)
    assert runner._profile_lengths() == [39, 25] and runner._profile_batch_blocks() == 10 + 7
    runner._allocate_cache(runner._profile_batch_blocks())
    runner._profile_step()
    report = runner.graph_report()  # nothing captured on the CPU
    assert report["decode"]["captured"] == report["piecewise"]["captured"] == 0
    assert report["piecewise"]["expected"] == 4 * (len(runner.layers) + 1)  # buckets of 8, 16, 32, 64 tokens
