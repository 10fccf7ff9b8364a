"""What a step does to its logits besides penalties (penalties.py) and grammars (grammar.py), batched over the
rows that need it: OpenAI's logit_bias, and the logprobs of the model's own distribution.

Shapes: S rows of logits [S, V] (float32, the step's own tensor), R rows that need the processing, K top tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from workers.engine.interface import TokenLogprob
from workers.engine.sequence import Sequence


def bias_tensors(seq: Sequence, device: torch.device) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """A request's logit_bias as (token ids [k], biases [k]) on the device, made once per request."""
    if not seq.sampling.logit_bias:
        return None
    ids, biases = zip(*seq.sampling.logit_bias)
    return (torch.tensor(ids, dtype=torch.long, device=device),
            torch.tensor(biases, dtype=torch.float32, device=device))


def apply_logit_bias_(logits: torch.Tensor, sampled: list[Sequence]) -> None:
    """Add each biased row's biases to its logits, all rows in one index_add."""
    rows = [(i, s.bias) for i, s in enumerate(sampled) if s.bias is not None]
    if not rows:
        return
    vocab = logits.shape[1]
    flat = torch.cat([ids + row * vocab for row, (ids, _) in rows])       # [sum k]
    values = torch.cat([biases for _, (_, biases) in rows])
    logits.view(-1).index_add_(0, flat, values)


def top_k_rows(values: torch.Tensor, k: int, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """values.topk(k) of [R, V], as (values, indices) [R, k]. On the CPU torch's topk over V is slow: the top k
    lie in the k blocks with the largest maxima, so take those blocks and the top k inside them."""
    rows, vocab = values.shape
    if values.device.type != "cpu" or vocab % block or k * block * 4 > vocab:
        return values.topk(k, dim=-1)
    blocks = values.view(rows, vocab // block, block)                     # [R, V/b, b]
    best = blocks.amax(dim=-1).topk(k, dim=-1).indices                   # [R, k] blocks holding the top k
    candidates = blocks.gather(1, best.unsqueeze(2).expand(-1, -1, block)).view(rows, k * block)
    top = candidates.topk(k, dim=-1)                                      # [R, k] inside them
    ids = best.gather(1, top.indices // block) * block + top.indices % block
    return top.values, ids


class LogprobsScratch:
    """The [R, V] float32 tensors a step's logprobs work in, kept from step to step: on the CPU a fresh 4 MB tensor
    costs its page faults every step (a sub into a fresh [32, 32000] tensor 1.8 ms, into a kept one 0.4 ms). A
    step's RawLogprobs holds them until its entries are read, before the next step takes them."""

    def __init__(self) -> None:
        self._tensors: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def take(self, rows: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kept = self._tensors
        if kept is None or kept[0].shape[0] < rows or kept[0].shape[1] != like.shape[1] \
                or kept[0].device != like.device:
            kept = self._tensors = (like.new_empty(rows, like.shape[1]), like.new_empty(rows, like.shape[1]))
        return kept[0][:rows], kept[1][:rows]


@dataclass
class RawLogprobs:
    """The logprobs of the rows that asked, taken from the raw logits before anything changed them (as vLLM's
    default), for all those rows at once: each row's log_softmax (a copy that sampling won't touch) and its
    top-K."""
    rows: list[int]                 # [R] rows of the step
    logprobs: torch.Tensor          # [R, V] float32: log_softmax of the raw logits
    top_values: torch.Tensor        # [R, K] logprobs
    top_ids: torch.Tensor           # [R, K]
    top_counts: list[int]           # each row's own k (<= K)

    @classmethod
    def of(cls, logits: torch.Tensor, sampled: list[Sequence],
           scratch: Optional[LogprobsScratch] = None) -> Optional["RawLogprobs"]:
        rows = [i for i, s in enumerate(sampled) if s.logprobs is not None]
        if not rows:
            return None
        counts = [sampled[i].logprobs for i in rows]
        logprobs, selected = (scratch or LogprobsScratch()).take(len(rows), logits)  # [R, V] each
        if len(rows) < len(sampled):
            logits = torch.index_select(logits, 0, torch.tensor(rows, device=logits.device), out=selected)
        # One fused pass per row (max, sum of exp, subtract), each row in cache: 0.7 ms at [32, 32000] on one CPU
        # thread, against 1.8 ms for the same in separate tensor ops. Its exp is only fast where results too small
        # for a normal float32 are flushed to 0 (the engine thread sets that: Engine._loop); without, a real
        # model's rows (spanning more than 87 nats) cost 4.2 ms.
        torch.ops.aten._log_softmax.out(logits, 1, False, out=logprobs)
        if max(counts):
            top_values, top_ids = top_k_rows(logprobs, max(counts))
        else:
            top_values, top_ids = logprobs.new_zeros(len(rows), 0), logprobs.new_zeros(len(rows), 0, dtype=torch.long)
        return cls(rows, logprobs, top_values, top_ids, counts)

    def entries(self, tokens: list[int]) -> list[Optional[TokenLogprob]]:
        """Per row of the step (None where not asked): the sampled token's logprob and the top-k."""
        device = self.logprobs.device
        chosen = self.logprobs.gather(1, torch.tensor([tokens[i] for i in self.rows], device=device)[:, None])
        values = torch.cat([chosen, self.top_values], dim=1).tolist()  # [R, 1 + K]
        ids = self.top_ids.tolist()
        out: list[Optional[TokenLogprob]] = [None] * len(tokens)
        for r, row in enumerate(self.rows):
            k = self.top_counts[r]
            out[row] = (values[r][0], tuple(zip(ids[r][:k], values[r][1:1 + k])))
        return out
