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


@dataclass
class RawLogprobs:
    """The logprobs of the rows that asked, taken from the raw logits before anything changed them (as vLLM's
    default): log_softmax over V and the top-K, for all those rows at once."""
    rows: list[int]                 # [R] rows of the step
    logprobs: torch.Tensor          # [R, V] float32
    top_values: torch.Tensor        # [R, K]
    top_ids: torch.Tensor           # [R, K]
    top_counts: list[int]           # each row's own k (<= K)

    @classmethod
    def of(cls, logits: torch.Tensor, sampled: list[Sequence]) -> Optional["RawLogprobs"]:
        rows = [i for i, s in enumerate(sampled) if s.logprobs is not None]
        if not rows:
            return None
        counts = [sampled[i].logprobs for i in rows]
        index = torch.tensor(rows, device=logits.device)
        logprobs = torch.log_softmax(logits[index], dim=-1)              # [R, V]
        top = logprobs.topk(max(counts), dim=-1) if max(counts) else None
        empty = logprobs.new_zeros(len(rows), 0)
        return cls(rows, logprobs, top.values if top else empty, top.indices if top else empty.long(), counts)

    def entries(self, tokens: list[int]) -> list[Optional[TokenLogprob]]:
        """Per row of the step (None where not asked): the sampled token's logprob and the top-k."""
        device = self.logprobs.device
        chosen = self.logprobs.gather(1, torch.tensor([tokens[i] for i in self.rows], device=device)[:, None])
        values = torch.cat([chosen, self.top_values], dim=1).tolist()     # [R, 1 + K]
        ids = self.top_ids.tolist()
        out: list[Optional[TokenLogprob]] = [None] * len(tokens)
        for r, row in enumerate(self.rows):
            k = self.top_counts[r]
            out[row] = (values[r][0], tuple(zip(ids[r][:k], values[r][1:1 + k])))
        return out
