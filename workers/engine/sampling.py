"""Batched token sampling: temperature and nucleus (top-p) for every row of a step at once (penalties are applied
to the logits before, by penalties.py).

Shapes used throughout: R = rows (requests) being sampled, V = vocabulary size, K = draws per row.

Design rules:
- Randomness is a pure function of (the request's seed, the output position, the draw's number): a counter-based
  hash, not a generator with state. So a request's tokens depend only on its own seed and logits, never on
  what else is batched, and an attempt that resumes a job at position n draws exactly what the first attempt
  would have drawn there. Every row costs the same few tensor ops, whatever its seed: no per-row Python loop.
- One uniform per row and draw, turned into a token by inverse-CDF over the row's probabilities. The CDF is
  taken in two levels (block sums of BLOCK tokens, then the one block the draw lands in), so the work over the
  whole vocabulary is an exp and a sum: no cumulative sum and no sort over V.
- top_p < 1 without a sort: draw from the whole distribution and accept the token if it lies in the nucleus
  (the mass of strictly more likely tokens is < top_p); otherwise draw again. Accepted tokens follow the
  nucleus' renormalised distribution exactly, and each draw is accepted with probability >= top_p, so rows
  whose NUCLEUS_ROUNDS draws all fail are rare. They get the nucleus itself: from a top-k pre-filter when it fits
  there, else from a sort of their rows.
- On CPU a pass over [R, V] costs as much as the rest of a draw, so passes are counted: probabilities are made in
  place in the logits, the block sums are float32, and the nucleus test is one compiled pass (cpu_kernels.py).
"""
from __future__ import annotations

from typing import Sequence

import torch

from workers.engine import cpu_kernels
from workers.engine.interface import SamplingParams  # defined torch-free: the worker process imports it

# Tokens per block of the two-level CDF (a divisor of V is taken when V is not a multiple).
BLOCK = 128
# Draws tested against the nucleus (>= 1) before the exact nucleus is computed with the next draw. Each one is
# accepted with probability >= top_p.
NUCLEUS_ROUNDS = 4
# The pre-filter's width: a nucleus of at most this many tokens is found without sorting V.
NUCLEUS_TOP_K = 256

_M32 = 0xFFFFFFFF
# Added to every draw's counter before hashing: _mix32(0) == 0, so without it seed 0 (the docs' default) drew
# u = 0 exactly at output position 0, and every default request began with the lowest token id.
COUNTER_BASE = 0x9E3779B9
# The lowest scaled logit, (z - max) / T, a probability is made from: exp() of anything lower is under float32's
# smallest normal number (1.2e-38), and on CPU torch's exp of such values, and of -inf (every token a grammar
# masks), takes 20-100x as long as of the others (3.2 ms against 0.1 ms over [32, 32000]). Those tokens get
# probability 0, as exactly as -inf's did; the others keep their bits.
LOGIT_FLOOR = -87.0
_EXP_FLOOR = torch.tensor(LOGIT_FLOOR).exp().item()  # exp(LOGIT_FLOOR) in float32: at most this is 0


def sampling_tensors(
    params: Sequence[SamplingParams], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack per-request params into float32 [R] tensors on ``device``.

    Returns (temperature, top_p, frequency_penalty, presence_penalty).
    """
    def col(name: str) -> torch.Tensor:
        return torch.tensor([getattr(p, name) for p in params], dtype=torch.float32, device=device)

    return col("temperature"), col("top_p"), col("frequency_penalty"), col("presence_penalty")


# --- counter-based randomness

def _mix32(x):
    """A 32-bit integer hash (bijective, good avalanche) of x in [0, 2**32): a Python int or an int64 tensor.
    The constant is below 2**27, so no product overflows int64: the same bits on every device."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def seed_key(seed: int) -> int:
    """A request's 64-bit seed folded into the 32-bit key its draws are hashed from (once per request)."""
    seed &= (1 << 64) - 1
    return _mix32(_mix32(seed & _M32) ^ (seed >> 32))


def uniforms(keys: torch.Tensor, positions: torch.Tensor, draws: int | torch.Tensor) -> torch.Tensor:
    """float64 in [0, 1), shaped as the inputs broadcast: draw number `draws` for output position `positions` of
    the request whose seed key is `keys` (int64 [R] each, or [R, 1] with draws [1, K]). A pure function of them."""
    compiled = cpu_kernels.uniforms(keys, positions, draws)
    if compiled is not None:
        return compiled
    counter = (positions * 256 + draws + COUNTER_BASE) & _M32  # positions < 2**24 (the context), draws < 256
    bits = _mix32(keys ^ _mix32(counter))
    return bits.to(torch.float64) * (1.0 / 2**32)


# --- the pieces of a draw

def argmax_rows(logits: torch.Tensor, block: int = 128) -> torch.Tensor:
    """logits.argmax(-1) for [R, V], the same index (the first maximum). On CPU torch's argmax is several times
    slower than a max-reduction, so take the first block holding the maximum, then the maximum inside it."""
    rows, vocab = logits.shape
    if logits.device.type != "cpu" or vocab % block or vocab < 4 * block:
        return logits.argmax(dim=-1)
    blocks = logits.view(rows, vocab // block, block)                    # [R, V/b, b]
    first = blocks.amax(dim=-1).argmax(dim=-1)                           # [R] first block with the maximum
    inside = blocks[torch.arange(rows), first].argmax(dim=-1)            # [R]
    return first * block + inside


def _probabilities_(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """softmax(logits / T) unnormalised, the most likely token at 1, 0 below LOGIT_FLOOR: float32 [R, V], made in
    place in `logits`."""
    top = logits.amax(dim=-1)  # [R]
    scale = 1.0 / temperature  # [R]
    if not cpu_kernels.shift_scale_(logits, top, scale, LOGIT_FLOOR):
        logits.sub_(top.unsqueeze(1)).mul_(scale.unsqueeze(1)).clamp_(min=LOGIT_FLOOR)
    probs = logits.exp_()
    if not cpu_kernels.zero_at_most_(probs, _EXP_FLOOR):
        probs.masked_fill_(probs <= _EXP_FLOOR, 0.0)
    return probs


def _block_size(vocab: int) -> int:
    return next(b for b in (BLOCK, 64, 32, 16, 8, 4, 2, 1) if vocab % b == 0)


def _blocks(probs: torch.Tensor) -> torch.Tensor:
    """probs [R, V] viewed as [R, NB, bs]: the first level of the two-level CDF."""
    rows, vocab = probs.shape
    bs = _block_size(vocab)
    return probs.view(rows, vocab // bs, bs)


def _block_cdf(probs: torch.Tensor) -> torch.Tensor:
    """float64 [R, NB]: the cumulative mass of each row's blocks (its last column: the row's total)."""
    return _blocks(probs).sum(dim=-1).to(torch.float64).cumsum(dim=-1)  # a float64 sum over V would cost 5x


def _inverse_cdf(probs: torch.Tensor, block_cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The tokens where the uniforms u (float64 [R, K], in [0, 1)) fall in each row's CDF of probs (float32 [R, V],
    unnormalised, >= 0; block_cdf its _block_cdf): token i with probability probs[i] / sum(probs). int64 [R, K]."""
    blocks = _blocks(probs)  # [R, NB, bs]
    num_blocks, bs = blocks.shape[1:]
    target = u * block_cdf[:, -1:]  # [R, K]
    block = torch.searchsorted(block_cdf, target, right=True).clamp_(max=num_blocks - 1)  # [R, K]
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), 0.0)  # [R, K] mass before it
    inside = blocks.gather(1, block.unsqueeze(2).expand(-1, -1, bs))  # [R, K, bs]
    inside_cdf = inside.to(torch.float64).cumsum(dim=-1) + before.unsqueeze(2)  # [R, K, bs]
    offset = torch.searchsorted(inside_cdf, target.unsqueeze(2), right=True).clamp_(max=bs - 1)  # [R, K, 1]
    return block * bs + offset.squeeze(2)


def _mass_above(probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """float64 [R, K]: the mass of the tokens strictly more likely than tokens[r, k] in row r (probs [R, V]).

    On CPU one compiled pass (cpu_kernels.py). In tensor ops, float ops only (on CPU a comparison, a where or a
    masked_fill costs 4-10x a float op): with excess = relu(p - p_chosen), the mass above is
    sum(excess) + p_chosen * count(excess > 0)."""
    chosen = probs.gather(1, tokens)  # [R, K]
    compiled = cpu_kernels.mass_above(probs, chosen)
    if compiled is not None:
        return compiled.to(torch.float64)
    excess = (probs.unsqueeze(1) - chosen.unsqueeze(2)).clamp_(min=0)  # [R, K, V]
    above = excess.sum(dim=-1).to(torch.float64)  # [R, K]
    count = excess.sign_().sum(dim=-1).to(torch.float64)  # [R, K]: tokens strictly more likely
    return above + chosen.to(torch.float64) * count


def _nucleus_floor(sorted_probs: torch.Tensor, cut: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From each row's probabilities sorted descending ([R, J], J <= V) and its cut (float64 [R]): the smallest
    probability inside the nucleus (float32 [R]), and whether the nucleus ends inside these J (bool [R]).
    A token is in the nucleus iff the mass of strictly more likely tokens is < cut; ties share one fate."""
    mass_before = sorted_probs.to(torch.float64).cumsum(dim=-1) - sorted_probs  # [R, J]
    kept = (mass_before < cut.unsqueeze(1)).sum(dim=-1).clamp_(min=1)  # [R] >= 1: the top token (0 before it)
    floor = sorted_probs.gather(1, (kept - 1).unsqueeze(1)).squeeze(1)  # [R]
    return floor, kept < sorted_probs.shape[1]


def _nucleus_draw(probs: torch.Tensor, cut: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Exact nucleus sampling for the few rows rejection did not finish: find each row's nucleus (top-k pre-filter,
    a sort of the row where the nucleus is wider), then inverse-CDF inside it. u float64 [R, 1]; int64 [R]."""
    k = min(NUCLEUS_TOP_K, probs.shape[1])
    floor, found = _nucleus_floor(probs.topk(k, dim=-1).values, cut)
    wide = (~found).nonzero().squeeze(1)
    if k < probs.shape[1] and wide.numel():
        floor[wide], _ = _nucleus_floor(probs[wide].sort(dim=-1, descending=True).values, cut[wide])
    inside = probs.masked_fill(probs < floor.unsqueeze(1), 0.0)
    return _inverse_cdf(inside, _block_cdf(inside), u).squeeze(1)


def _in_nucleus(probs: torch.Tensor, block_cdf: torch.Tensor, top_p: torch.Tensor, first: torch.Tensor,
                keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """For rows with top_p < 1: the first of their draws that lies in the nucleus. Draw 0 (`first`, int64 [R]) is
    tested for every row; the few rows it fails draw NUCLEUS_ROUNDS - 1 more candidates, all tested at once; rows
    whose every candidate fails get the exact nucleus. int64 [R]."""
    cut = top_p.to(torch.float64) * block_cdf[:, -1]  # [R] the nucleus' mass (unnormalised)
    tokens = first.clone()
    rejected = (_mass_above(probs, first.unsqueeze(1)).squeeze(1) >= cut).nonzero().squeeze(1)
    if rejected.numel() and NUCLEUS_ROUNDS > 1:
        draws = torch.arange(1, NUCLEUS_ROUNDS, device=probs.device).unsqueeze(0)  # [1, K]
        u = uniforms(keys[rejected].unsqueeze(1), positions[rejected].unsqueeze(1), draws)  # [P, K]
        rejected_probs = probs[rejected]
        candidates = _inverse_cdf(rejected_probs, block_cdf[rejected], u)  # [P, K]
        accepted = _mass_above(rejected_probs, candidates) < cut[rejected].unsqueeze(1)  # [P, K]
        found = accepted.any(dim=1)
        first_accepted = accepted.to(torch.int8).argmax(dim=1, keepdim=True)  # [P, 1]
        tokens[rejected[found]] = candidates.gather(1, first_accepted).squeeze(1)[found]
        rejected = rejected[~found]
    if rejected.numel():
        u = uniforms(keys[rejected], positions[rejected], NUCLEUS_ROUNDS).unsqueeze(1)
        tokens[rejected] = _nucleus_draw(probs[rejected], cut[rejected], u)
    return tokens


def _first_draw(probs: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Draw 0 of every row: tokens int64 [R] and the rows' block CDF float64 [R, NB]."""
    u = uniforms(keys, positions, 0)  # [R]
    compiled = cpu_kernels.first_draw(probs, u, _block_size(probs.shape[1]))
    if compiled is not None:
        return compiled
    block_cdf = _block_cdf(probs)  # [R, NB]
    return _inverse_cdf(probs, block_cdf, u.unsqueeze(1)).squeeze(1), block_cdf


# --- a step's draw

def sample(
    logits: torch.Tensor,  # [R, V] float32, overwritten (used as scratch space)
    temperature: torch.Tensor,  # [R], 0 => greedy
    top_p: torch.Tensor,  # [R], in [0, 1]
    keys: torch.Tensor,  # int64 [R]: seed_key(seed) of each row's request
    positions: torch.Tensor,  # int64 [R]: the output position being sampled (0 for a request's first token)
) -> torch.Tensor:  # [R] int64 token ids
    """Sample one token per row (greedy where temperature == 0, the most likely token where top_p == 0).
    `logits` is consumed: pass a copy to keep it."""
    device = logits.device
    temperature = temperature.to(device=device, dtype=torch.float32)
    top_p = top_p.to(device=device, dtype=torch.float32)
    keys, positions = keys.to(device), positions.to(device)

    greedy = (temperature <= 0) | (top_p <= 0)  # [R]
    argmax = None
    if bool(greedy.any()):  # (a few rows at most: the engine draws only for its non-greedy rows)
        argmax = argmax_rows(logits)  # before logits become probabilities
        temperature = torch.where(greedy, torch.ones_like(temperature), temperature)  # finite for every row
    probs = _probabilities_(logits, temperature)  # [R, V]
    tokens, block_cdf = _first_draw(probs, keys, positions)

    nucleus = ((top_p < 1) if argmax is None else (top_p < 1) & ~greedy).nonzero().squeeze(1)  # [N]
    if nucleus.numel() == len(tokens):  # every row (one top_p for all, the usual case): no copies
        tokens = _in_nucleus(probs, block_cdf, top_p, tokens, keys, positions)
    elif nucleus.numel():
        tokens[nucleus] = _in_nucleus(probs[nucleus], block_cdf[nucleus], top_p[nucleus], tokens[nucleus],
                                      keys[nucleus], positions[nucleus])
    return tokens if argmax is None else torch.where(greedy, argmax, tokens)


# --- the same draw inside a CUDA graph

EXACT = -1  # sample_static's token for a row that needs the exact nucleus (finish_exact)


def sample_static(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, keys: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
    """sample()'s draw without a host synchronisation or a data-dependent shape, so that a CUDA graph can
    capture it: every row takes all NUCLEUS_ROUNDS draws and the nucleus test, and the choice is a `where`.
    Rows whose draws all miss their nucleus come back as EXACT, for finish_exact (rare: each draw is accepted
    with probability >= top_p). `logits` [R, V] float32 are left as they are; the inputs are as sample()'s
    (on logits' device). int64 [R]."""
    greedy = (temperature <= 0) | (top_p <= 0)                                    # [R]
    argmax = argmax_rows(logits)
    probs = _probabilities_(logits.clone(), torch.where(greedy, torch.ones_like(temperature), temperature))
    first, block_cdf = _first_draw(probs, keys, positions)                        # [R], [R, NB]
    cut = top_p.to(torch.float64) * block_cdf[:, -1]                              # [R]
    draws = torch.arange(1, NUCLEUS_ROUNDS, device=probs.device).unsqueeze(0)     # [1, K-1]
    later = _inverse_cdf(probs, block_cdf, uniforms(keys.unsqueeze(1), positions.unsqueeze(1), draws))
    candidates = torch.cat([first.unsqueeze(1), later], dim=1)                    # [R, K]
    accepted = _mass_above(probs, candidates) < cut.unsqueeze(1)                  # [R, K]
    chosen = candidates.gather(1, accepted.to(torch.int8).argmax(dim=1, keepdim=True)).squeeze(1)
    nucleus = torch.where(accepted.any(dim=1), chosen, torch.full_like(chosen, EXACT))
    tokens = torch.where((top_p < 1) & ~greedy, nucleus, first)
    return torch.where(greedy, argmax, tokens)


def finish_exact(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, keys: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
    """The tokens sample() draws for rows that sample_static left EXACT (inputs: those rows only). int64 [R]."""
    probs = _probabilities_(logits.clone(), temperature)
    _, block_cdf = _first_draw(probs, keys, positions)
    cut = top_p.to(torch.float64) * block_cdf[:, -1]
    u = uniforms(keys, positions, NUCLEUS_ROUNDS).unsqueeze(1)
    return _nucleus_draw(probs, cut, u)
