"""The model runner: our own forward pass of the Mistral architecture over a paged KV cache.

It calls the Hugging Face model's modules (embed_tokens, the norms, q/k/v/o projections, mlp, lm_head), so
bitsandbytes 4-bit linears work unchanged; rotary embedding, the KV cache and attention are ours.

One step runs a flat batch of N tokens: first one token per decoding sequence (rows 0..Bd-1), then each
prefill chunk's tokens in order. Shapes: N tokens, Bd decode rows, S rows that need logits, H query heads,
KVH key/value heads, G = H // KVH, D head dim, V vocabulary, NB KV blocks, bs block size, MB blocks per row.

The KV cache is one tensor per layer for K and one for V: [NB + 1, bs, KVH, D] in the model dtype. Block NB
is a "null" block that is never handed out: padding rows of a batch read and write it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from workers.engine.config import EngineConfig
from workers.engine.scheduler import ScheduledBatch
from workers.engine.sequence import Sequence

log = logging.getLogger(__name__)


@dataclass
class Chunk:
    """A prefill chunk: rows [row, row + length) of the step are positions [start, start + length)."""
    row: int
    length: int
    start: int
    block_table: Optional[torch.Tensor] = None  # [nb] blocks holding positions [0, start + length); None if start == 0


@dataclass
class StepInputs:
    input_ids: torch.Tensor      # [N]
    positions: torch.Tensor      # [N]
    slot_mapping: torch.Tensor   # [N] cache row (block * bs + offset) each token's K/V is written to
    num_decode: int = 0          # Bd: rows 0..Bd-1 are decode tokens
    decode_block_tables: Optional[torch.Tensor] = None  # [Bd, MB], padded with the null block
    chunks: list[Chunk] = field(default_factory=list)
    logits_rows: Optional[torch.Tensor] = None          # [S]; None = every row


# --- the pieces of the forward pass, as small functions

def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, D], cos/sin [N, 1, D] -> [N, heads, D] (the same arithmetic as transformers)."""
    return (x * cos) + (rotate_half(x) * sin)


def rope_tables(inv_freq: torch.Tensor, max_len: int, scaling: float, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_len, D] for positions 0..max_len-1, computed as transformers does per step."""
    positions = torch.arange(max_len, device=device).float()              # [P]
    freqs = positions[:, None] * inv_freq.to(device=device, dtype=torch.float)[None, :]  # [P, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)                               # [P, D]
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def _sdpa_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
              is_causal: bool, scale: float) -> torch.Tensor:
    """q [1, H, T, D], k/v [1, KVH, L, D] -> [1, H, T, D]. On CUDA a masked GQA call would fall back to the math
    kernel, so the K/V heads are repeated there instead."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and q.device.type == "cuda" and mask is not None:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=groups > 1)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """A chunk that starts at position 0 attends only to itself: q [T, H, D], k/v [T, KVH, D] -> [T, H, D]."""
    out = _sdpa_gqa(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], None,
                    q.shape[0] > 1, scale)                                # [1, H, T, D]
    return out[0].transpose(0, 1)


def chunk_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    start: int, scale: float) -> torch.Tensor:
    """A later chunk attends to the cached prefix and causally to itself (its K/V are already in the cache).
    q [T, H, D], caches [NB+1, bs, KVH, D], block_table [nb] -> [T, H, D]."""
    length = q.shape[0]
    context = start + length
    _, block_size, kv_heads, head_dim = k_cache.shape
    k = gather_blocks(k_cache, block_table).view(-1, kv_heads, head_dim)[:context]  # [C, KVH, D]
    v = gather_blocks(v_cache, block_table).view(-1, kv_heads, head_dim)[:context]
    keys = torch.arange(context, device=q.device)                        # [C]
    queries = torch.arange(start, context, device=q.device)              # [T]
    mask = keys[None, :] <= queries[:, None]                             # [T, C]
    out = _sdpa_gqa(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask, False, scale)
    return out[0].transpose(0, 1)


def gather_blocks(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """cache [NB+1, bs, KVH, D], block_table [...] -> [..., bs, KVH, D] (index_select: much faster than cache[t])."""
    return cache.index_select(0, block_table.reshape(-1)).view(*block_table.shape, *cache.shape[1:])


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     mask: torch.Tensor, scale: float) -> torch.Tensor:
    """One new token per row over its paged context, the whole batch in one SDPA call.
    q [B, H, D], caches [NB+1, bs, KVH, D], block_tables [B, MB], mask [B, 1, 1, MB*bs] (additive) -> [B, H, D]."""
    batch, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    length = block_tables.shape[1] * block_size
    k = gather_blocks(k_cache, block_tables).view(batch, length, kv_heads, head_dim).transpose(1, 2)  # [B, KVH, L, D]
    v = gather_blocks(v_cache, block_tables).view(batch, length, kv_heads, head_dim).transpose(1, 2)
    q = q.view(batch, kv_heads, heads // kv_heads, head_dim)  # [B, KVH, G, D]: the G heads sharing a KV head
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)          # [B, KVH, G, D]
    return out.reshape(batch, heads, head_dim)


class ModelRunner:
    def __init__(self, model, device: torch.device, config: EngineConfig):
        self.model = model
        self.device = torch.device(device)
        self.config = config
        cfg = model.config
        inner = model.model
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.lm_head = model.lm_head
        self.vocab_size = cfg.vocab_size
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim ** -0.5
        self.dtype = self.embed.weight.dtype
        self.block_size = config.block_size
        window = getattr(cfg, "sliding_window", None)
        if window is not None and window < config.max_model_len:
            raise ValueError(f"sliding-window attention ({window}) is not implemented; set max_model_len <= {window}")

        self.cos, self.sin = self._rope(cfg, inner, config.max_model_len)  # [max_model_len, D] each
        self.num_blocks = config.num_kv_blocks or self._derive_num_blocks()
        self.null_block = self.num_blocks
        shape = (len(self.layers), self.num_blocks + 1, self.block_size, self.num_kv_heads, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)  # [layers, NB+1, bs, KVH, D]
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self._arange = torch.arange(config.max_blocks_per_seq * self.block_size, device=self.device)
        self.graphs: Optional["DecodeGraphs"] = None
        self.paged_kernel = self._paged_kernel(config.attention)  # None: decode attention through SDPA
        # Steps replayed from a CUDA graph, and steps run eagerly (every step with a prefill, every step on
        # the CPU, decode steps no graph bucket fits): the eager ones are what a GPU step's speed loses to.
        self.graph_steps = 0
        self.eager_steps = 0
        log.info("KV cache: %d blocks of %d tokens (%d tokens, %.1f MiB), %s", self.num_blocks, self.block_size,
                 self.num_blocks * self.block_size, 2 * self.k_cache.numel() * self.k_cache.element_size() / 2**20,
                 self.dtype)

    # --- set-up
    def _paged_kernel(self, choice: str):
        """The Triton paged decode kernel where asked for ("triton"; on CUDA for "auto"), else None."""
        if choice == "sdpa" or (choice == "auto" and self.device.type != "cuda"):
            return None
        try:
            from workers.engine.paged_attention import paged_decode_attention
        except ImportError:
            if choice == "triton":
                raise
            log.warning("triton is not installed: decode attention through SDPA")
            return None
        return paged_decode_attention

    def _check_paged_kernel(self) -> None:
        """At start-up, on this device: the kernel must agree with SDPA on a small ragged batch, or the engine
        keeps SDPA (auto) or refuses to start (triton)."""
        gen = torch.Generator(device=self.device).manual_seed(0)
        shape = (8, self.block_size, self.num_kv_heads, self.head_dim)
        k, v = (torch.randn(shape, generator=gen, device=self.device, dtype=self.dtype) for _ in range(2))
        q = torch.randn(3, self.num_heads, self.head_dim, generator=gen, device=self.device, dtype=self.dtype)
        tables = torch.tensor([[0, 1, 7], [2, 7, 7], [3, 4, 5]], device=self.device)
        positions = torch.tensor([self.block_size + 3, 0, 3 * self.block_size - 1], device=self.device)
        visible = self._arange[:3 * self.block_size][None, :] <= positions[:, None]
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device).masked_fill_(~visible, float("-inf"))
        expected = decode_attention(q, k, v, tables, mask.view(3, 1, 1, -1), self.scale).float()
        try:
            error = (self.paged_kernel(q, k, v, tables, positions, self.scale).float() - expected).abs().max().item()
            problem = None if error <= (1e-4 if self.dtype == torch.float32 else 2e-2) else f"max error {error:.3g}"
        except Exception as exc:  # a compile or launch failure
            problem = f"{type(exc).__name__}: {exc}"
        if problem is None:
            log.info("decode attention: the Triton paged kernel (checked against SDPA)")
            return
        if self.config.attention == "triton":
            raise RuntimeError(f"the Triton paged decode kernel failed its check: {problem}")
        log.error("the Triton paged decode kernel failed its check (%s): decode attention through SDPA", problem)
        self.paged_kernel = None

    def _rope(self, cfg, inner, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        params = getattr(cfg, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
            dim = self.head_dim
            inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))  # [D/2]
            scaling = 1.0
        else:  # scaled variants: take what the model's own rotary module computed
            inv_freq, scaling = inner.rotary_emb.inv_freq, float(inner.rotary_emb.attention_scaling)
        return rope_tables(inv_freq, max_len, scaling, self.dtype, self.device)

    def bytes_per_block(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * len(self.layers) * self.block_size * self.num_kv_heads * self.head_dim * element

    def _derive_num_blocks(self) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            blocks = int(free * self.config.kv_memory_fraction) // self.bytes_per_block()
            if blocks < 1:
                raise RuntimeError(f"no GPU memory left for the KV cache ({free / 2**30:.2f} GiB free)")
            return blocks
        return -(-self.config.kv_cpu_tokens // self.block_size)

    # --- inputs
    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        """Flat token inputs for the step, built in Python lists and moved in a few tensors."""
        bs = self.block_size
        decode = batch.decode
        ids = [s.token_ids[-1] for s in decode]
        positions = [s.num_computed_tokens for s in decode]
        slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(decode, positions)]
        logits_rows = list(range(len(decode)))
        chunks = []
        row = len(decode)
        for seq, n in zip(batch.prefill, batch.prefill_lens):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            table = seq.block_table
            ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            blocks = None
            if start > 0:
                blocks = torch.tensor(table[:-(-end // bs)], dtype=torch.long).to(self.device, non_blocking=True)
            chunks.append(Chunk(row, n, start, blocks))
            if end == seq.num_tokens:
                logits_rows.append(row + n - 1)
            row += n
        tensor = lambda xs: torch.tensor(xs, dtype=torch.long).to(self.device, non_blocking=True)  # noqa: E731
        inputs = StepInputs(tensor(ids), tensor(positions), tensor(slots), len(decode), None, chunks,
                            None if len(logits_rows) == row else tensor(logits_rows))
        if decode:
            width = max(len(s.block_table) for s in decode)
            null = [self.null_block] * width
            inputs.decode_block_tables = tensor([s.block_table + null[len(s.block_table):] for s in decode])
        return inputs

    def decode_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor,
                      block_tables: torch.Tensor) -> StepInputs:
        """Decode-only inputs from tensors alone (no host work, so a CUDA graph can capture it).
        input_ids/positions [B], block_tables [B, MB]."""
        bs = self.block_size
        blocks = block_tables.gather(1, (positions // bs)[:, None]).squeeze(1)    # [B]
        return StepInputs(input_ids, positions, blocks * bs + positions % bs, input_ids.shape[0], block_tables)

    # --- the forward pass
    @torch.inference_mode()
    def forward(self, inp: StepInputs) -> torch.Tensor:
        """Logits [S, V] (float32) of the rows in inp.logits_rows (every row if None)."""
        x = self.embed(inp.input_ids)                                     # [N, hidden]
        cos = self.cos[inp.positions].unsqueeze(1)                        # [N, 1, D]
        sin = self.sin[inp.positions].unsqueeze(1)
        mask = None
        if inp.num_decode and self.paged_kernel is None:  # the kernel reads each row's own length instead
            length = inp.decode_block_tables.shape[1] * self.block_size
            context = inp.positions[:inp.num_decode] + 1                  # [Bd]
            visible = self._arange[:length][None, :] < context[:, None]  # [Bd, L]
            mask = torch.zeros(visible.shape, dtype=x.dtype, device=x.device).masked_fill_(~visible, float("-inf"))
            mask = mask.view(inp.num_decode, 1, 1, length)
        for index, layer in enumerate(self.layers):
            x = self._layer(index, layer, x, cos, sin, inp, mask)
        if inp.logits_rows is not None:
            x = x[inp.logits_rows]                                        # [S, hidden]
        return self.lm_head(self.norm(x)).float()                         # [S, V]

    def _layer(self, index: int, layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inp: StepInputs,
               decode_mask: Optional[torch.Tensor]) -> torch.Tensor:
        n = x.shape[0]
        attn = layer.self_attn
        h = layer.input_layernorm(x)                                      # [N, hidden]
        q = apply_rope(attn.q_proj(h).view(n, self.num_heads, self.head_dim), cos, sin)     # [N, H, D]
        k = apply_rope(attn.k_proj(h).view(n, self.num_kv_heads, self.head_dim), cos, sin)  # [N, KVH, D]
        v = attn.v_proj(h).view(n, self.num_kv_heads, self.head_dim)                       # [N, KVH, D]
        k_cache, v_cache = self.k_cache[index], self.v_cache[index]      # [NB+1, bs, KVH, D]
        k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, inp.slot_mapping, k)
        v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, inp.slot_mapping, v)
        o = self._attention(q, k, v, k_cache, v_cache, inp, decode_mask)  # [N, H, D]
        x = x + attn.o_proj(o.reshape(n, self.num_heads * self.head_dim))
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def _attention(self, q, k, v, k_cache, v_cache, inp: StepInputs, decode_mask) -> torch.Tensor:
        bd = inp.num_decode
        if bd and not inp.chunks:
            return self._decode_attention(q, k_cache, v_cache, inp, decode_mask)
        parts = []
        if bd:
            parts.append(self._decode_attention(q[:bd], k_cache, v_cache, inp, decode_mask))
        for c in inp.chunks:
            rows = slice(c.row, c.row + c.length)
            if c.start == 0:
                parts.append(prefill_attention(q[rows], k[rows], v[rows], self.scale))
            else:
                parts.append(chunk_attention(q[rows], k_cache, v_cache, c.block_table, c.start, self.scale))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _decode_attention(self, q, k_cache, v_cache, inp: StepInputs, decode_mask) -> torch.Tensor:
        if self.paged_kernel is not None:
            return self.paged_kernel(q, k_cache, v_cache, inp.decode_block_tables, inp.positions[:inp.num_decode],
                                     self.scale)
        return decode_attention(q, k_cache, v_cache, inp.decode_block_tables, decode_mask, self.scale)

    # --- a step
    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [S, V] for batch.sampled(), in that order."""
        if self.graphs is not None and not batch.prefill:
            logits = self.graphs.run(batch.decode)
            if logits is not None:
                if self.graphs.use_graphs:
                    self.graph_steps += 1
                else:
                    self.eager_steps += 1
                return logits
        self.eager_steps += 1
        return self.forward(self.prepare(batch))

    def warmup(self) -> None:
        """Start-up work, never on a user's request: one dummy decode; on CUDA, capture the decode graphs."""
        if self.paged_kernel is not None:
            self._check_paged_kernel()
        null = torch.full((1, 1), self.null_block, dtype=torch.long, device=self.device)
        zero = torch.zeros(1, dtype=torch.long, device=self.device)
        self.forward(self.decode_inputs(zero, zero, null))
        if self.device.type == "cuda" and self.config.use_cuda_graphs:
            graphs = DecodeGraphs(self)
            try:
                graphs.capture()
                self.graphs = graphs
            except Exception:
                log.exception("CUDA graph capture failed; decoding eagerly")
                self.graphs = None
                torch.cuda.synchronize(self.device)


def _buckets(largest: int, first: int) -> list[int]:
    sizes, size = [], first
    while size < largest:
        sizes.append(size)
        size *= 2
    return sizes + [largest]


class DecodeGraphs:
    """Decode-only steps replayed from CUDA graphs, one per (batch size, blocks per row) bucket.

    The batch is padded up to the bucket with rows that decode token 0 at position 0 in the null block, and every
    block table up to the bucket's width with the null block; rows past the real batch are dropped after.
    `capture=False` runs the same padded, static-buffer path eagerly (to test it without a GPU).
    """

    # Largest gathered K+V (all rows, one layer) a graph may need; wider steps run eagerly.
    MAX_GATHER_BYTES = 2 * 2**30

    def __init__(self, runner: ModelRunner, capture: bool = True):
        self.runner = runner
        self.use_graphs = capture
        cfg = runner.config
        self.batch_sizes = _buckets(cfg.max_num_seqs, 1)
        self.widths = _buckets(cfg.max_blocks_per_seq, min(16, cfg.max_blocks_per_seq))
        device = runner.device
        self.input_ids = torch.zeros(cfg.max_num_seqs, dtype=torch.long, device=device)    # [Bmax]
        self.positions = torch.zeros(cfg.max_num_seqs, dtype=torch.long, device=device)    # [Bmax]
        self.block_tables = torch.full((cfg.max_num_seqs, cfg.max_blocks_per_seq), runner.null_block,
                                       dtype=torch.long, device=device)                    # [Bmax, MBmax]
        self.graphs: dict[tuple[int, int], tuple[Optional[torch.cuda.CUDAGraph], torch.Tensor]] = {}
        self.pool = None

    def _fits(self, batch: int, width: int) -> bool:
        if self.runner.paged_kernel is not None:
            return True  # it reads the blocks in place: no gathered copy to bound
        per_token = 2 * self.runner.num_kv_heads * self.runner.head_dim * self.runner.k_cache.element_size()
        return batch * width * self.runner.block_size * per_token <= self.MAX_GATHER_BYTES

    def _forward(self, batch: int, width: int) -> torch.Tensor:
        inp = self.runner.decode_inputs(self.input_ids[:batch], self.positions[:batch],
                                        self.block_tables[:batch, :width])
        return self.runner.forward(inp)                                   # [batch, V]

    def capture(self) -> None:
        """Capture every bucket, largest first (they share one memory pool)."""
        runner = self.runner
        self.pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(runner.device)
        stream.wait_stream(torch.cuda.current_stream(runner.device))
        for batch in reversed(self.batch_sizes):
            for width in reversed(self.widths):
                if not self._fits(batch, width):
                    continue
                with torch.cuda.stream(stream):
                    self._forward(batch, width)  # warm up (allocations, library handles) outside the graph
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=stream, capture_error_mode="thread_local"):
                    output = self._forward(batch, width)
                self.graphs[(batch, width)] = (graph, output)
        torch.cuda.current_stream(runner.device).wait_stream(stream)
        torch.cuda.synchronize(runner.device)
        log.info("captured %d decode CUDA graphs (batch sizes %s, block widths %s)", len(self.graphs),
                 self.batch_sizes, self.widths)

    def run(self, decode: list[Sequence]) -> Optional[torch.Tensor]:
        """Logits [B, V] for the decode rows, or None when no bucket fits (the caller runs eagerly)."""
        count = len(decode)
        width = max(len(s.block_table) for s in decode)
        batch = next((b for b in self.batch_sizes if b >= count), None)
        bucket = next((w for w in self.widths if w >= width), None)
        if batch is None or bucket is None or (self.use_graphs and (batch, bucket) not in self.graphs):
            return None
        null = self.runner.null_block
        pad = batch - count
        ids = [s.token_ids[-1] for s in decode] + [0] * pad
        positions = [s.num_computed_tokens for s in decode] + [0] * pad
        tables = [s.block_table + [null] * (bucket - len(s.block_table)) for s in decode] + [[null] * bucket] * pad
        self.input_ids[:batch].copy_(torch.tensor(ids, dtype=torch.long), non_blocking=True)
        self.positions[:batch].copy_(torch.tensor(positions, dtype=torch.long), non_blocking=True)
        self.block_tables[:batch, :bucket].copy_(torch.tensor(tables, dtype=torch.long), non_blocking=True)
        if self.use_graphs:
            graph, output = self.graphs[(batch, bucket)]
            graph.replay()
        else:
            output = self._forward(batch, bucket)
        return output[:count]
