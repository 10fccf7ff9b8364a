"""The Triton paged decode-attention kernel (workers/engine/paged_attention.py), run on CPU tensors under
Triton's interpreter, against the SDPA path it replaces on CUDA (model_runner.decode_attention): ragged
contexts, GQA, the null block, block tables padded past a row's last block, contexts of one token and of
exact block multiples, scattered (non-contiguous) blocks."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
from workers.engine.model_runner import decode_attention  # noqa: E402
from workers.engine.paged_attention import paged_decode_attention  # noqa: E402

# Under Triton's interpreter (tests/conftest.py sets it on machines without a GPU), on CPU tensors.
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


def sdpa_reference(q, k_cache, v_cache, tables, positions, scale):
    length = tables.shape[1] * k_cache.shape[1]
    visible = torch.arange(length)[None, :] < (positions + 1)[:, None]
    mask = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf")).view(len(positions), 1, 1, length)
    return decode_attention(q, k_cache, v_cache, tables, mask, scale)


def case(contexts, heads=8, kv_heads=2, head_dim=16, block_size=16, width=None, seed=0):
    """Random q and caches; each row's blocks scattered over the cache, its table padded with the null block."""
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-c // block_size) for c in contexts]
    width = width or max(needed)
    num_blocks = sum(needed) + 3
    null = num_blocks                                                  # the last block: never handed out
    k_cache = torch.randn(num_blocks + 1, block_size, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks + 1, block_size, kv_heads, head_dim, generator=gen)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [[free.pop() for _ in range(n)] + [null] * (width - n) for n in needed]
    q = torch.randn(len(contexts), heads, head_dim, generator=gen)
    return q, k_cache, v_cache, torch.tensor(tables), torch.tensor(contexts) - 1


@pytest.mark.parametrize("contexts,kw", [
    ([1], {}),                                           # a one-token context
    ([16, 32], {}),                                      # exact block multiples
    ([5, 40, 17, 90, 3], {}),                            # ragged
    ([7, 70], dict(width=8)),                            # tables padded far past the last block
    ([33, 9], dict(heads=4, kv_heads=4)),                # no GQA
    ([50, 21, 2], dict(heads=12, kv_heads=4)),           # a group of 3 (padded to 4 in the kernel)
    ([130], dict(head_dim=128, heads=32, kv_heads=8)),   # Mistral-7B's head layout
])
def test_the_kernel_equals_sdpa(contexts, kw):
    q, k_cache, v_cache, tables, positions = case(contexts, **kw)
    scale = q.shape[-1] ** -0.5
    expected = sdpa_reference(q, k_cache, v_cache, tables, positions, scale)
    got = paged_decode_attention(q, k_cache, v_cache, tables, positions, scale)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


def test_the_null_block_and_padding_are_never_read():
    q, k_cache, v_cache, tables, positions = case([20, 3], width=4)
    scale = q.shape[-1] ** -0.5
    clean = paged_decode_attention(q, k_cache, v_cache, tables, positions, scale)
    k_cache[-1], v_cache[-1] = float("nan"), float("nan")              # the null block: garbage
    for row, context in enumerate((20, 3)):                            # each row's block past its context
        last = tables[row, (context - 1) // 16]
        k_cache[last, context % 16 or 16:], v_cache[last, context % 16 or 16:] = float("nan"), float("nan")
    torch.testing.assert_close(paged_decode_attention(q, k_cache, v_cache, tables, positions, scale), clean)


def test_the_engine_with_the_kernel_equals_generate():
    """The whole engine on the kernel (its start-up check, mixed steps, the static decode path): greedy tokens
    equal Hugging Face generate() on the tiny model (float32)."""
    from tests.unit.test_engine import EOS, expected_greedy, finish_all, prompts_of, start
    from workers.engine.config import EngineConfig
    from workers.engine.engine import Engine
    from workers.engine.cuda_graphs import DecodeGraphs
    from workers.model_loader import build_tiny_random

    model = build_tiny_random()
    engine = Engine(model, torch.device("cpu"), eos_token_id=EOS,
                    config=EngineConfig(num_kv_blocks=64, max_model_len=512, max_num_seqs=4, attention="triton"))
    try:
        engine.warmup()
        assert engine.runner.paged_kernel is paged_decode_attention  # passed its check
        prompts = prompts_of([5, 40, 17], seed=7)
        runs = [start(engine, f"r{i}", p, 12, temperature=0.0) for i, p in enumerate(prompts)]
        finish_all([thread for _, _, thread in runs])
        engine.runner.graphs = DecodeGraphs(engine.runner, capture=False)
        static = [start(engine, f"s{i}", p, 12, temperature=0.0) for i, p in enumerate(prompts)]
        finish_all([thread for _, _, thread in static])
    finally:
        engine.shutdown()
    for (result, _, _), (again, _, _), prompt in zip(runs, static, prompts):
        assert result["tokens"] == again["tokens"] == expected_greedy(model, prompt, 12)
