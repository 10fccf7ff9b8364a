"""What a step does to its logits besides penalties (penalties.py) and grammars (grammar.py), batched over the
rows that need it: OpenAI's logit_bias, and the logprobs of the model's own distribution.

Shapes: S rows of logits [S, V] (float32, the step's own tensor), R rows that need the processing, K top tokens.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

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
    top-K. Made by `of`, filled by `compute` (at once, or on LogprobsPass's thread)."""
    rows: list[int]                 # [R] rows of the step
    raw: torch.Tensor               # [R, V] float32: their raw logits (the step's, or a copy)
    logprobs: torch.Tensor          # [R, V] float32: log_softmax of `raw`, once computed
    top_counts: list[int]           # each row's own k (<= K)
    top_values: Optional[torch.Tensor] = None   # [R, K] logprobs, once computed
    top_ids: Optional[torch.Tensor] = None      # [R, K]

    @classmethod
    def of(cls, logits: torch.Tensor, sampled: list[Sequence], scratch: Optional[LogprobsScratch] = None,
           copy: bool = False, compute: bool = True) -> Optional["RawLogprobs"]:
        """The rows of logits [S, V] that asked; `copy`: their logits copied now, so that the caller may change
        the step's in place before `compute` runs (LogprobsPass). None if no row asked."""
        rows = [i for i, s in enumerate(sampled) if s.logprobs is not None]
        if not rows:
            return None
        logprobs, selected = (scratch or LogprobsScratch()).take(len(rows), logits)  # [R, V] each
        if len(rows) < len(sampled):
            logits = torch.index_select(logits, 0, torch.tensor(rows, device=logits.device), out=selected)
        elif copy:
            logits = selected.copy_(logits)
        made = cls(rows, logits, logprobs, [sampled[i].logprobs for i in rows])
        return made.compute() if compute else made

    def compute(self) -> "RawLogprobs":
        # One fused pass per row (max, sum of exp, subtract), each row in cache: 0.7 ms at [32, 32000] on one CPU
        # thread, against 1.8 ms for the same in separate tensor ops. Its exp is only fast in a thread whose
        # results too small for a normal float32 are flushed to 0 (Engine._loop, LogprobsPass); without, a real
        # model's rows (spanning more than 87 nats) cost 4.2 ms.
        torch.ops.aten._log_softmax.out(self.raw, 1, False, out=self.logprobs)
        k, rows = max(self.top_counts), len(self.rows)
        if k:
            self.top_values, self.top_ids = top_k_rows(self.logprobs, k)
        else:
            self.top_values, self.top_ids = self.logprobs.new_zeros(rows, 0), self.logprobs.new_zeros(
                rows, 0, dtype=torch.long)
        return self

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


def _logprobs_thread_setup() -> None:
    torch.set_flush_denormal(True)  # this thread's own setting, as the engine thread's (Engine._loop)


class LogprobsPass:
    """Each step's logprobs (RawLogprobs). On the CPU, where torch leaves a core free (it runs on fewer threads
    than the machine has: the worker's engine process runs on one), on a thread of their own, from a copy of
    the raw logits, while the engine thread samples from the step's own (changing them in place): at 32 rows of
    32,000 the log_softmax and top-K take about 2 ms on one thread, the copy 0.3. Elsewhere (a GPU, whose
    kernels queue up anyway; a CPU that torch keeps busy) in line."""

    def __init__(self, device: torch.device, threaded: Optional[bool] = None):
        self.scratch = LogprobsScratch()  # the [R, V] tensors each step's logprobs reuse
        if threaded is None:  # (tests choose)
            threaded = device.type == "cpu" and (os.cpu_count() or 1) > torch.get_num_threads()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="logprobs",
                                          initializer=_logprobs_thread_setup) if threaded else None

    def start(self, logits: torch.Tensor, sampled: list[Sequence]) -> Callable[[], Optional[RawLogprobs]]:
        """Begin the step's logprobs from its raw logits [S, V]; the returned call waits for them (None where no
        row asked). The caller may change logits in place as soon as this returns."""
        if self._thread is None:
            done = RawLogprobs.of(logits, sampled, self.scratch)
            return lambda: done
        pending = RawLogprobs.of(logits, sampled, self.scratch, copy=True, compute=False)
        if pending is None:
            return lambda: None
        return self._thread.submit(_compute_in_inference_mode, pending).result


def _compute_in_inference_mode(pending: RawLogprobs) -> RawLogprobs:
    with torch.inference_mode():  # thread-local: the scratch tensors are inference tensors, written in place
        return pending.compute()
