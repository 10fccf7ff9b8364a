"""The model runner: the two forward passes generation needs, as small pure functions (gpt-fast style).

Shapes: B = batch, T = prompt length, V = vocabulary.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache


def new_cache() -> DynamicCache:
    return DynamicCache()


@torch.inference_mode()
def prefill(model, prompt_ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """Run the whole prompt [B, T] through the model, filling `cache`; returns the last logits [B, V]."""
    out = model(input_ids=prompt_ids, cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :].float()


@torch.inference_mode()
def decode_one_token(model, token_ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """One decode step: the newest token [B, 1] in, the next token's logits [B, V] out."""
    out = model(input_ids=token_ids, cache=cache, use_cache=True)
    return out.logits[:, -1, :].float()
