"""CUDA graphs for the model runner's steps: the step's kernels launched as one replay instead of thousands.

- DecodeGraphs: a decode-only step, attention and the batched sampler included (sampling.sample_static), one
  graph per (batch size, blocks per row) bucket.
- PiecewiseGraphs: a step with a prefill (most steps once prompts keep arriving). Attention there depends on the
  chunks' shapes, so it runs eagerly; everything between two attentions (a layer's o_proj, MLP, the next layer's
  norm, q/k/v projections, rotary embedding and KV-cache write) is one graph per token-count bucket, as vLLM's
  piecewise graphs do. A step of T tokens is padded up to its bucket with rows that write only the null block.

Both take their inputs from the runner's InputStager (fixed addresses), and both have `capture=False`: the same
padded, static-buffer path run eagerly, so that the CPU tests prove it without a GPU.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from workers.engine.sampling import sample_static
from workers.engine.sequence import Sequence
from workers.engine.step_inputs import StepInputs, max_step_tokens

log = logging.getLogger(__name__)


def doubling_buckets(largest: int, first: int) -> list[int]:
    """first, 2*first, 4*first, ... below largest, then largest."""
    sizes, size = [], first
    while size < largest:
        sizes.append(size)
        size *= 2
    return sizes + [largest]


def token_buckets(largest: int) -> list[int]:
    """Token counts a piecewise graph is captured for: 8, 16, 32, 64, then every 64 (padding wastes at most 64
    rows of a big step, at most half of a small one), and `largest`."""
    sizes = [s for s in (8, 16, 32) if s < largest]
    sizes += list(range(64, largest, 64))
    return sizes + [largest]


def capture_graph(run: Callable[[], object], pool, stream: torch.cuda.Stream) -> torch.cuda.CUDAGraph:
    """run() captured as a CUDA graph in `pool` on `stream`, after one run outside the graph: allocations,
    library handles and Triton compiles (each shape specialises anew) must not happen inside a capture."""
    with torch.cuda.stream(stream):
        run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
        run()
    return graph


def smallest_fit(sizes: list[int], n: int) -> Optional[int]:
    return next((s for s in sizes if s >= n), None)


class DecodeGraphs:
    """Decode-only steps replayed from CUDA graphs, one per (batch size, blocks per row) bucket.

    The batch is padded up to the bucket with rows that decode token 0 at position 0 in the null block, and
    every block table up to the bucket's width; rows past the real batch are dropped after.
    """

    # Largest gathered K+V (all rows, one layer) a graph may need when attention goes through SDPA (the paged
    # kernel reads blocks in place and has no such bound); wider steps go to the piecewise path.
    MAX_GATHER_BYTES = 2 * 2**30

    def __init__(self, runner, capture: bool = True):
        self.runner = runner
        self.use_graphs = capture
        cfg = runner.config
        self.batch_sizes, self.widths = self.sizes(cfg)
        # Every graph leaves its logits here (one [B, V] buffer, not one per bucket kept alive in the pool).
        self.logits = torch.zeros(cfg.max_num_seqs, runner.vocab_size, device=runner.device)
        self.tokens = torch.zeros(cfg.max_num_seqs, dtype=torch.long, device=runner.device)  # sampled in the graph
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}

    @staticmethod
    def sizes(config) -> tuple[list[int], list[int]]:
        """The buckets' batch sizes and block widths."""
        return (doubling_buckets(config.max_num_seqs, 1),
                doubling_buckets(config.max_blocks_per_seq, min(16, config.max_blocks_per_seq)))

    @classmethod
    def buckets_for(cls, runner) -> list[tuple[int, int]]:
        """The (batch size, width) buckets captured for `runner` (without building the graphs' buffers)."""
        batch_sizes, widths = cls.sizes(runner.config)
        return [(b, w) for b in batch_sizes for w in widths if cls._fits(runner, b, w)]

    def buckets(self) -> list[tuple[int, int]]:
        return self.buckets_for(self.runner)

    @classmethod
    def _fits(cls, runner, batch: int, width: int) -> bool:
        if runner.paged_kernel is not None:
            return True
        per_token = 2 * runner.num_kv_heads * runner.head_dim * runner.k_cache.element_size()
        return batch * width * runner.block_size * per_token <= cls.MAX_GATHER_BYTES

    @torch.inference_mode()
    def _forward(self, batch: int, width: int) -> torch.Tensor:
        stager = self.runner.stager
        ids, positions, tables = stager.decode_views(batch, width)
        logits = self.logits[:batch]                                      # [batch, V]
        logits.copy_(self.runner.forward(self.runner.decode_inputs(ids, positions, tables)))
        self.tokens[:batch].copy_(sample_static(logits, *stager.sampling_views(batch)))
        return logits

    def capture(self, pool, stream: torch.cuda.Stream, largest_only: bool = False) -> None:
        """Every bucket (or only the largest: what the pool must hold), largest first: later, smaller ones
        reuse the pool's memory."""
        buckets = list(reversed(self.buckets()))
        for batch, width in buckets[:1] if largest_only else buckets:
            self.graphs[(batch, width)] = capture_graph(lambda: self._forward(batch, width), pool, stream)

    def run(self, decode: list[Sequence]) -> Optional[torch.Tensor]:
        """Logits [B, V] for the decode rows (their tokens, sampled without penalties, in self.tokens[:B]), or
        None when no bucket fits (the caller runs another path)."""
        count = len(decode)
        batch = smallest_fit(self.batch_sizes, count)
        width = smallest_fit(self.widths, max(len(s.block_table) for s in decode))
        if batch is None or width is None or not self._fits(self.runner, batch, width):
            return None
        self.runner.stager.prepare_decode(decode, batch, width)
        if self.use_graphs:
            self.graphs[(batch, width)].replay()
            return self.logits[:count]
        return self._forward(batch, width)[:count]


class PiecewiseGraphs:
    """Steps with a prefill: the dense part of the layers replayed from graphs, attention run eagerly between.

    For a bucket of T tokens, piece 0 is the embedding, the rotary tables and layer 0's attention inputs; piece i
    (1..L-1) is layer i-1's attention output (o_proj, residual, MLP) and layer i's attention inputs; piece L is
    layer L-1's attention output and the final norm. Pieces pass their results through static buffers (hidden
    state, q, k, v, attention output, cos, sin), so every temporary inside a piece dies with it and all pieces
    of all buckets can share one memory pool.
    """

    def __init__(self, runner, capture: bool = True):
        self.runner = runner
        self.use_graphs = capture
        self.sizes = self.sizes_for(runner)
        t, device, dtype = self.sizes[-1], runner.device, runner.dtype
        h, kvh, d = runner.num_heads, runner.num_kv_heads, runner.head_dim
        self.hidden = torch.zeros(t, runner.hidden_size, dtype=dtype, device=device)  # [T, hidden]
        self.q = torch.zeros(t, h, d, dtype=dtype, device=device)                      # [T, H, D]
        self.k = torch.zeros(t, kvh, d, dtype=dtype, device=device)                    # [T, KVH, D]
        self.v = torch.zeros(t, kvh, d, dtype=dtype, device=device)
        self.attn = torch.zeros(t, h, d, dtype=dtype, device=device)                   # [T, H, D]
        self.cos = torch.zeros(t, 1, d, dtype=dtype, device=device)                    # [T, 1, D]
        self.sin = torch.zeros(t, 1, d, dtype=dtype, device=device)
        self.num_pieces = self.pieces_for(runner)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}

    @staticmethod
    def sizes_for(runner) -> list[int]:
        """The token-count buckets, up to the most tokens a step holds."""
        return token_buckets(max_step_tokens(runner.config))

    @staticmethod
    def pieces_for(runner) -> int:
        """Graphs per bucket: one between each two attentions, and one on each side."""
        return len(runner.layers) + 1

    def bucket(self, num_tokens: int) -> Optional[int]:
        return smallest_fit(self.sizes, num_tokens)

    @torch.inference_mode()
    def _piece(self, piece: int, t: int) -> None:
        runner = self.runner
        ids, positions, slots = runner.stager.token_views(t)
        if piece == 0:
            x, cos, sin = runner.embed(ids, positions)
            self.cos[:t].copy_(cos)
            self.sin[:t].copy_(sin)
        else:
            x = runner.attention_output(piece - 1, self.hidden[:t], self.attn[:t])
        if piece < len(runner.layers):
            q, k, v = runner.attention_inputs(piece, x, self.cos[:t], self.sin[:t], slots)
            self.q[:t].copy_(q)
            self.k[:t].copy_(k)
            self.v[:t].copy_(v)
        else:
            x = runner.norm(x)
        self.hidden[:t].copy_(x)

    def capture(self, pool, stream: torch.cuda.Stream, largest_only: bool = False) -> None:
        """Every piece of every bucket (or of the largest only), largest bucket first. The stager holds padding
        rows (clear_tokens): capture writes only the null block."""
        sizes = list(reversed(self.sizes))
        for t in sizes[:1] if largest_only else sizes:
            self.graphs[t] = [capture_graph(lambda: self._piece(piece, t), pool, stream)
                              for piece in range(self.num_pieces)]

    def _replay(self, piece: int, t: int) -> None:
        if self.use_graphs:
            self.graphs[t][piece].replay()
        else:
            self._piece(piece, t)

    @torch.inference_mode()
    def run(self, inp: StepInputs) -> torch.Tensor:
        """Logits [S, V] of a step whose inputs the stager padded to a bucket (inp.input_ids [T])."""
        runner, t, n = self.runner, inp.input_ids.shape[0], inp.num_tokens
        mask = runner.decode_mask(inp)
        self._replay(0, t)
        for index in range(len(runner.layers)):
            out = runner.attention(index, self.q[:n], self.k[:n], self.v[:n], inp, mask)  # [n, H, D]
            self.attn[:n].copy_(out)
            self._replay(index + 1, t)
        hidden = self.hidden[:n] if inp.logits_rows is None else self.hidden[inp.logits_rows]
        return runner.lm_head(hidden).float()
