"""Paged decode attention in Triton: one new token per row attends to its context, read from the KV-cache
blocks in place (through the row's block table), with an online softmax over the blocks.

Why: the SDPA path (model_runner.decode_attention) first gathers every row's whole padded context into a
dense copy, each step and each layer; its traffic grows with the longest context in the batch. This kernel
reads each row's own blocks once, and only up to its own length.

One program per (row, KV head) handles the G query heads that share that KV head (GQA). Shapes as in
model_runner: q [B, H, D], caches [NB+1, bs, KVH, D], block_tables [B, MB] (padded with the null block),
positions [B] (the new token's position: its context is positions + 1 tokens), out [B, H, D].

Used on CUDA; the CPU keeps SDPA. `make test` runs it on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1) against the SDPA path: tests/unit/test_paged_attention.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode(q_ptr, k_ptr, v_ptr, tables_ptr, positions_ptr, out_ptr, scale,
                  stride_qb, stride_qh, stride_cb, stride_ct, stride_ch, stride_tb, stride_ob, stride_oh,
                  GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    g = tl.arange(0, GROUP_PAD)                                       # [G] query heads of this KV head
    d = tl.arange(0, HEAD_DIM)                                        # [D]
    t = tl.arange(0, BLOCK)                                           # [bs] token offsets in a block
    heads = kv_head * GROUP + g
    head_ok = g < GROUP
    q = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=head_ok[:, None],
                other=0.0).to(tl.float32)                             # [G, D]
    context = tl.load(positions_ptr + row) + 1
    best = tl.full([GROUP_PAD], float("-inf"), tl.float32)            # running max of the scores
    total = tl.zeros([GROUP_PAD], tl.float32)                         # running sum of exp(score - best)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)                 # running sum of exp(...) * v
    for b in range(0, tl.cdiv(context, BLOCK)):
        block = tl.load(tables_ptr + row * stride_tb + b)
        visible = b * BLOCK + t < context                             # [bs]
        offsets = block * stride_cb + t[:, None] * stride_ct + kv_head * stride_ch + d[None, :]
        k = tl.load(k_ptr + offsets, mask=visible[:, None], other=0.0).to(tl.float32)   # [bs, D]
        v = tl.load(v_ptr + offsets, mask=visible[:, None], other=0.0).to(tl.float32)   # [bs, D]
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale                 # [G, bs]
        scores = tl.where(visible[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        weights = tl.exp(scores - new_best[:, None])                                    # [G, bs]
        rescale = tl.exp(best - new_best)
        total = total * rescale + tl.sum(weights, axis=1)
        acc = acc * rescale[:, None] + tl.sum(weights[:, :, None] * v[None, :, :], axis=1)
        best = new_best
    out = acc / total[:, None]
    tl.store(out_ptr + row * stride_ob + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, D], caches [NB+1, bs, KVH, D], block_tables [B, MB], positions [B] -> [B, H, D]."""
    batch, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    assert k_cache.stride(3) == 1 and v_cache.stride() == k_cache.stride() and block_tables.stride(1) == 1
    q = q if q.stride(2) == 1 else q.contiguous()
    out = torch.empty_like(q)
    group = heads // kv_heads
    _paged_decode[(batch, kv_heads)](
        q, k_cache, v_cache, block_tables, positions, out, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=triton.next_power_of_2(group), BLOCK=block_size, HEAD_DIM=head_dim)
    return out
