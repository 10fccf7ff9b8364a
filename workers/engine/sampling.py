"""Batched token sampling: OpenAI-style penalties, temperature, nucleus (top-p).

Shapes used throughout: B = rows (requests) in the batch, V = vocabulary size.

Design rule: each row draws its randomness only from its own ``torch.Generator``
and always draws the same amount (V exponentials per step), so a request's
output depends only on its own seed and logits, never on what else is batched.
"""
from __future__ import annotations

from typing import Sequence

import torch

from workers.engine.interface import SamplingParams  # defined torch-free: the worker process imports it

# Smallest positive float32; used to keep exponential noise strictly positive.
_TINY = torch.finfo(torch.float32).tiny


def sampling_tensors(
    params: Sequence[SamplingParams], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack per-request params into float32 [B] tensors on ``device``.

    Returns (temperature, top_p, frequency_penalty, presence_penalty).
    """
    def col(name: str) -> torch.Tensor:
        return torch.tensor([getattr(p, name) for p in params], dtype=torch.float32, device=device)

    return col("temperature"), col("top_p"), col("frequency_penalty"), col("presence_penalty")


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` seeded with the request's seed."""
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(int(seed))
    return gen


def apply_penalties(
    logits: torch.Tensor,  # [B, V] float
    output_counts: torch.Tensor,  # [B, V] counts of each id among *generated* tokens
    frequency_penalty: torch.Tensor,  # [B]
    presence_penalty: torch.Tensor,  # [B]
) -> torch.Tensor:  # [B, V] float32, a new tensor (inputs untouched)
    """OpenAI additive penalties: ``logits - c*freq - (c > 0)*pres`` per token."""
    counts = output_counts.to(torch.float32)  # [B, V]
    freq = frequency_penalty.to(torch.float32).unsqueeze(1)  # [B, 1]
    pres = presence_penalty.to(torch.float32).unsqueeze(1)  # [B, 1]
    return logits.to(torch.float32) - counts * freq - (counts > 0).to(torch.float32) * pres


def _top_p_mask(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Bool [B, V]: True for tokens inside each row's nucleus.

    The nucleus is the smallest set of most-likely tokens whose mass >= top_p:
    a token is kept iff the mass of strictly more likely tokens is < top_p, so
    the top token (mass before it = 0) is always kept.
    """
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # [B, V] each
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [B, V]
    keep_sorted = mass_before < top_p.unsqueeze(1)  # [B, V]
    keep_sorted[:, 0] = True  # the top token always (top_p == 0 keeps only it)
    # top_p == 1 keeps everything exactly (cumsum rounding could otherwise drop a tail).
    keep_sorted |= (top_p >= 1.0).unsqueeze(1)
    return torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)  # back to vocab order


def sample(
    logits: torch.Tensor,  # [B, V]
    temperature: torch.Tensor,  # [B], 0 => greedy
    top_p: torch.Tensor,  # [B], in [0, 1]
    generators: Sequence[torch.Generator],  # B generators on logits.device
) -> torch.Tensor:  # [B] int64 token ids
    """Sample one token per row (greedy where temperature == 0)."""
    logits = logits.to(torch.float32)
    batch, vocab = logits.shape
    if len(generators) != batch:
        raise ValueError(f"need one generator per row: {len(generators)} != {batch}")
    temperature = temperature.to(device=logits.device, dtype=torch.float32)
    top_p = top_p.to(device=logits.device, dtype=torch.float32)

    greedy = temperature <= 0  # [B]
    greedy_ids = logits.argmax(dim=-1)  # [B]

    # Temperature-scaled softmax; greedy rows use 1.0 just to stay finite (result unused).
    temp = torch.where(greedy, torch.ones_like(temperature), temperature)  # [B]
    probs = torch.softmax(logits / temp.unsqueeze(1), dim=-1)  # [B, V]
    if bool((top_p < 1.0).any()):
        probs = probs.masked_fill(~_top_p_mask(probs, top_p), 0.0)  # unnormalised is fine

    # Exponential race: argmax_i p_i / q_i with q_i ~ Exp(1) picks i with probability
    # p_i / sum(p). Every row draws V values from its own generator, every step.
    noise = torch.empty((batch, vocab), dtype=torch.float32, device=logits.device)  # [B, V]
    for row, gen in enumerate(generators):
        noise[row].exponential_(generator=gen)
    noise.clamp_(min=_TINY)  # q == 0 would give 0/0 = NaN for masked tokens
    sampled_ids = (probs / noise).argmax(dim=-1)  # [B]

    return torch.where(greedy, greedy_ids, sampled_ids)
