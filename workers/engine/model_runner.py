"""The model runner: the two forward passes generation needs, as small pure functions (gpt-fast style).

Shapes: B = batch, T = prompt length, V = vocabulary.
"""
from __future__ import annotations

import inspect
from functools import lru_cache

import torch
from transformers import DynamicCache


def new_cache() -> DynamicCache:
    return DynamicCache()


@lru_cache
def _cache_kwarg(model_class) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); take whichever this version has."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


@torch.inference_mode()
def prefill(model, prompt_ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """Run the whole prompt [B, T] through the model, filling `cache`; returns the last logits [B, V]."""
    out = model(input_ids=prompt_ids, use_cache=True, logits_to_keep=1, **{_cache_kwarg(type(model)): cache})
    return out.logits[:, -1, :].float()


@torch.inference_mode()
def decode_one_token(model, token_ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """One decode step: the newest token [B, 1] in, the next token's logits [B, V] out."""
    out = model(input_ids=token_ids, use_cache=True, **{_cache_kwarg(type(model)): cache})
    return out.logits[:, -1, :].float()
