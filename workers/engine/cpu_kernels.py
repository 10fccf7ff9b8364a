"""The sampler's CPU loops that tensor ops cannot do in one pass over [R, V], compiled with numba.

On CPU a pass over a step's logits (32 rows of 32000 here) costs 0.15-0.3 ms, and a decode step of the tiny
model about 4 ms, so the passes decide what sampling costs:
- The nucleus test needs, for a chosen probability c in a row, the mass of the tokens strictly more likely:
  sum(p for p in row if p > c). PyTorch has no per-row masked sum: in tensor ops it takes five passes (a
  subtraction, a clamp, a sum, a sign, a sum), 1.1 ms; one compiled pass takes 0.18 ms.
- Shifting, scaling and flooring the logits, max((z - max) / T, floor), is three in-place passes in tensor ops
  and one here; zeroing the probabilities under the floor's is two and one.
- A row's first draw (block sums, then the two-level inverse CDF) is one pass and a short walk here; in tensor
  ops it is a pass and some 25 small ops, whose dispatch costs about as much as the pass. The counter hash
  behind the draws (sampling.uniforms) is another 25 small ops, and one call here.
sampling.py holds the same math in tensor ops, which run on a GPU (microseconds there) and wherever numba is
missing; each function here answers False or None when it cannot take its tensors.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

try:
    import numba
except ImportError:  # an optional speed-up
    numba = None

enabled = numba is not None  # tests turn it off to run the tensor ops on CPU


def _compile(fn, **fastmath):
    """numba's machine code for fn, cached on disk; nogil lets the worker's other threads run meanwhile."""
    return numba.njit(cache=True, nogil=True, fastmath=fastmath or False)(fn) if numba is not None else None


def _takes(t: torch.Tensor) -> bool:
    return enabled and t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


def _shift_scale_rows(logits: np.ndarray, shift: np.ndarray, scale: np.ndarray, floor: np.float32) -> None:
    rows, vocab = logits.shape
    for r in range(rows):
        s, c = shift[r], scale[r]
        for j in range(vocab):
            logits[r, j] = max((logits[r, j] - s) * c, floor)  # the float ops of sub_, mul_, clamp_: the same bits


def _zero_at_most_rows(values: np.ndarray, limit: np.float32) -> None:
    rows, vocab = values.shape
    for r in range(rows):
        for j in range(vocab):
            if values[r, j] <= limit:
                values[r, j] = np.float32(0.0)


def _mass_above_rows(probs: np.ndarray, chosen: np.ndarray, out: np.ndarray) -> None:
    rows, vocab = probs.shape
    for r in range(rows):
        for k in range(chosen.shape[1]):
            c = chosen[r, k]
            total = np.float32(0.0)
            for j in range(vocab):
                p = probs[r, j]
                total += p if p > c else np.float32(0.0)
            out[r, k] = total


def _first_draw_rows(probs: np.ndarray, u: np.ndarray, block_size: int, block_cdf: np.ndarray,
                     tokens: np.ndarray) -> None:
    rows, vocab = probs.shape
    num_blocks = vocab // block_size
    blocks = probs.reshape(rows, num_blocks, block_size)
    for r in range(rows):
        running = 0.0  # float64, as sampling._block_cdf: float32 block sums, accumulated in float64
        for b in range(num_blocks):
            running += blocks[r, b].sum()
            block_cdf[r, b] = running
        target = u[r] * running
        block = 0  # the first block whose cumulative mass exceeds the target (the last one at most) ...
        while block < num_blocks - 1 and block_cdf[r, block] <= target:
            block += 1
        mass = block_cdf[r, block - 1] if block > 0 else 0.0
        offset = 0  # ... then the first token in it whose cumulative mass does
        while offset < block_size - 1:
            mass += blocks[r, block, offset]
            if mass > target:
                break
            offset += 1
        tokens[r] = block * block_size + offset


_M32 = 0xFFFFFFFF
_COUNTER_BASE = 0x9E3779B9  # sampling.COUNTER_BASE (the same bits are the point)


def _mix32_scalar(x):
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32  # sampling._mix32 on int64 scalars: the same bits
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


_mix32 = _compile(_mix32_scalar)


def _uniforms_rows(keys: np.ndarray, positions: np.ndarray, draw: int, out: np.ndarray) -> None:
    for r in range(keys.shape[0]):
        counter = (positions[r] * 256 + draw + _COUNTER_BASE) & _M32
        out[r] = _mix32(keys[r] ^ _mix32(counter)) * (1.0 / 2**32)


def _mask_rows(logits: np.ndarray, rows: np.ndarray, words: np.ndarray) -> None:
    vocab = logits.shape[1]
    for r in range(rows.shape[0]):
        row = rows[r]
        for w in range(words.shape[1]):
            word = words[r, w]
            if word == -1:  # all 32 allowed (the common case inside a string)
                continue
            start = w * 32
            if word == 0:  # none allowed (most words where the grammar wants structure): a fill, vectorised;
                logits[row, start:min(start + 32, vocab)] = -np.inf  # 8x the bit loop's speed on such masks
                continue
            for b in range(32):
                token = start + b
                if token < vocab and not (word >> b) & 1:
                    logits[row, token] = -np.inf


_shift_scale_compiled = _compile(_shift_scale_rows)
_zero_at_most_compiled = _compile(_zero_at_most_rows)
_mask_compiled = _compile(_mask_rows)
_uniforms_compiled = _compile(_uniforms_rows)
_first_draw_compiled = _compile(_first_draw_rows, reassoc=True, nsz=True)
# Reassociation lets the sum be vectorised. Each row is still summed on its own, in an order fixed by the
# compiled code: a row's result never depends on the other rows of its batch.
_mass_above_compiled = _compile(_mass_above_rows, reassoc=True, nsz=True)


def shift_scale_(logits: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, floor: float) -> bool:
    """logits = max((logits - shift[:, None]) * scale[:, None], floor) in place (float32 [R, V]; [R] each)."""
    if not _takes(logits):
        return False
    _shift_scale_compiled(logits.numpy(), shift.numpy(), scale.numpy(), np.float32(floor))  # [R] float32 each
    return True


def zero_at_most_(values: torch.Tensor, limit: float) -> bool:
    """values[values <= limit] = 0 in place (float32 [R, V]): one pass, where masked_fill_ takes a comparison too."""
    if not _takes(values):
        return False
    _zero_at_most_compiled(values.numpy(), np.float32(limit))
    return True


def apply_token_mask_(logits: torch.Tensor, rows: torch.Tensor, words: torch.Tensor) -> bool:
    """Every token whose bit is 0 in words[r] (int32 [R, ceil(V / 32)], bit b of word w: token 32 w + b) becomes
    -inf in logits[rows[r]] (float32 [S, V]), in place, in one pass over the packed words."""
    if not _takes(logits):
        return False
    _mask_compiled(logits.numpy(), rows.contiguous().numpy(), words.contiguous().numpy())
    return True


def uniforms(keys: torch.Tensor, positions: torch.Tensor, draw: int) -> Optional[torch.Tensor]:
    """sampling.uniforms for int64 [R] keys and positions and one draw number: float64 [R]."""
    if not (enabled and keys.device.type == "cpu" and keys.dim() == 1 and isinstance(draw, int)):
        return None
    out = torch.empty(keys.shape, dtype=torch.float64)
    _uniforms_compiled(keys.contiguous().numpy(), positions.contiguous().numpy(), draw, out.numpy())
    return out


def first_draw(probs: torch.Tensor, u: torch.Tensor, block_size: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """sampling._block_cdf and sampling._inverse_cdf for one uniform per row: (tokens int64 [R], block_cdf
    float64 [R, V // block_size]) for probs (float32 [R, V]) and u (float64 [R])."""
    if not _takes(probs):
        return None
    rows, vocab = probs.shape
    block_cdf = torch.empty(rows, vocab // block_size, dtype=torch.float64)
    tokens = torch.empty(rows, dtype=torch.long)
    _first_draw_compiled(probs.numpy(), u.contiguous().numpy(), block_size, block_cdf.numpy(), tokens.numpy())
    return tokens, block_cdf


def mass_above(probs: torch.Tensor, chosen: torch.Tensor) -> Optional[torch.Tensor]:
    """float32 [R, K]: per row of probs (float32 [R, V]), the mass of the tokens strictly more likely than each
    of chosen [R, K]."""
    if not _takes(probs):
        return None
    out = torch.empty(chosen.shape, dtype=torch.float32)
    _mass_above_compiled(probs.numpy(), chosen.to(torch.float32).contiguous().numpy(), out.numpy())
    return out
