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

import gc
import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from workers.engine.config import EngineConfig
from workers.engine.cuda_graphs import DecodeGraphs, PiecewiseGraphs
from workers.engine.interface import SamplingParams
from workers.engine.scheduler import ScheduledBatch
from workers.engine.sequence import Sequence
from workers.engine.step_inputs import InputStager, StepInputs, max_step_tokens

log = logging.getLogger(__name__)


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


@dataclass
class StepOutput:
    logits: torch.Tensor                   # [S, V] float32, this step's own: sampling may work in it
    tokens: Optional[torch.Tensor] = None  # [S] drawn inside a decode graph, without penalties (EXACT rows:
                                           # sampling.finish_exact); None where the step sampled nothing


def kv_blocks_for(free_bytes: int, reserved_bytes: int, fraction: float, bytes_per_block: int) -> int:
    """KV-cache blocks for a GPU with `free_bytes` free once the weights are loaded: `fraction` of what is left
    after `reserved_bytes` (the largest step's activations and the CUDA graphs' memory pool)."""
    blocks = int(max(free_bytes - reserved_bytes, 0) * fraction) // bytes_per_block
    if blocks < 1:
        raise RuntimeError(f"no GPU memory left for the KV cache: {free_bytes / 2**30:.2f} GiB free, "
                           f"{reserved_bytes / 2**30:.2f} GiB needed by activations and CUDA graphs")
    return blocks


class ModelRunner:
    def __init__(self, model, device: torch.device, config: EngineConfig):
        self.model = model
        self.device = torch.device(device)
        self.config = config
        cfg = model.config
        inner = model.model
        self.embed_tokens = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.lm_head = model.lm_head
        self.vocab_size = cfg.vocab_size
        self.hidden_size = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim ** -0.5
        self.dtype = self.embed_tokens.weight.dtype
        self.block_size = config.block_size
        window = getattr(cfg, "sliding_window", None)
        if window is not None and window < config.max_model_len:
            raise ValueError(f"sliding-window attention ({window}) is not implemented; set max_model_len <= {window}")

        self.cos, self.sin = self._rope(cfg, inner, config.max_model_len)  # [max_model_len, D] each
        self._arange = torch.arange(config.max_blocks_per_seq * self.block_size, device=self.device)
        self.paged_kernel = self._paged_kernel(config.attention)  # None: decode attention through SDPA
        if self.paged_kernel is not None:
            self._check_paged_kernel()
        # Decode-only steps replayed whole; steps with a prefill replayed piecewise (cuda_graphs.py). Set by
        # warmup() on CUDA; a test may set them with capture=False to run their padded paths eagerly.
        self.graphs: Optional[DecodeGraphs] = None
        self.piecewise: Optional[PiecewiseGraphs] = None
        # Steps replayed from CUDA graphs (whole or piecewise), and steps run eagerly (every step on the CPU, a
        # step no bucket fits): the eager ones are what a GPU step's speed loses to.
        self.graph_steps = 0
        self.eager_steps = 0
        self._allocate_cache(config.num_kv_blocks or self._derive_num_blocks())
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

    def _allocate_cache(self, num_blocks: int) -> None:
        """The KV cache of num_blocks blocks (+ the null block), and the input buffers that name its null block."""
        self.k_cache = self.v_cache = None  # (a probe cache's memory goes first)
        self.num_blocks = num_blocks
        self.null_block = num_blocks
        shape = (len(self.layers), num_blocks + 1, self.block_size, self.num_kv_heads, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)  # [layers, NB+1, bs, KVH, D]
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.stager = InputStager(self.config, self.block_size, self.null_block, self.device)

    def _derive_num_blocks(self) -> int:
        if self.device.type == "cuda":
            return self._blocks_after_profiling()
        return -(-self.config.kv_cpu_tokens // self.block_size)

    def _blocks_after_profiling(self) -> int:
        """Size the KV cache from what is free once the largest step has run and the CUDA graphs are captured:
        both measured here against a small probe cache, then released (warmup captures again against the real
        cache, whose addresses the graphs must hold)."""
        device = self.device
        self._allocate_cache(self._profile_batch_blocks())
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        self._profile_step()
        activations = torch.cuda.max_memory_allocated(device) - before
        graph_pool = 0
        if self.config.use_cuda_graphs:
            reserved = torch.cuda.memory_reserved(device)
            self.capture_graphs(largest_only=True)
            graph_pool = torch.cuda.memory_reserved(device) - reserved
            self.graphs = self.piecewise = None
        self.k_cache = self.v_cache = self.stager = None
        gc.collect()
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(device)
        blocks = kv_blocks_for(free, activations + graph_pool, self.config.kv_memory_fraction, self.bytes_per_block())
        log.info("KV cache sizing: %.2f GiB free after the weights, largest step's activations %.2f GiB, CUDA "
                 "graphs %.2f GiB: %d blocks", free / 2**30, activations / 2**30, graph_pool / 2**30, blocks)
        return blocks

    def _profile_lengths(self) -> list[int]:
        """The prompts of the largest step there can be: every token a step holds, in as few prompts as
        max_model_len allows (at most one per batch slot)."""
        total, longest = max_step_tokens(self.config), self.config.max_model_len - 1
        lengths = [longest] * (total // longest) + ([total % longest] if total % longest else [])
        return lengths[:self.config.max_num_seqs]

    def _profile_batch_blocks(self) -> int:
        return sum(-(-n // self.block_size) for n in self._profile_lengths())

    def _profile_step(self) -> None:
        """The largest step, run eagerly, with logits for every batch slot: its peak memory is what the KV cache
        must leave free."""
        seqs, first_block = [], 0
        for slot, n in enumerate(self._profile_lengths()):
            seq = Sequence(f"profile-{slot}", [0] * n, SamplingParams(), 1)
            blocks = -(-n // self.block_size)
            seq.block_table, seq.slot = list(range(first_block, first_block + blocks)), slot
            first_block += blocks
            seqs.append(seq)
        lengths = [s.num_tokens for s in seqs]
        inp = self.stager.prepare(ScheduledBatch(prefill=seqs, prefill_lens=lengths, admitted=seqs))
        total = sum(lengths)
        inp.logits_rows = torch.arange(max(total - self.config.max_num_seqs, 0), total, device=self.device)
        self.forward(inp)

    def copy_blocks(self, copies: list[tuple[list[int], list[int]]]) -> None:
        """KV blocks copied, every layer at once: each (sources, destinations) pair of block lists."""
        if not copies:
            return
        sources = torch.tensor([b for src, _ in copies for b in src], device=self.device)
        destinations = torch.tensor([b for _, dst in copies for b in dst], device=self.device)
        for cache in (self.k_cache, self.v_cache):  # [layers, NB+1, bs, KVH, D]
            cache.index_copy_(1, destinations, cache.index_select(1, sources))

    # --- inputs
    def prepare(self, batch: ScheduledBatch, padded_tokens: Optional[int] = None) -> StepInputs:
        return self.stager.prepare(batch, padded_tokens)

    def decode_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor,
                      block_tables: torch.Tensor) -> StepInputs:
        """Decode-only inputs from tensors alone (no host work, so a CUDA graph can capture it).
        input_ids/positions [B], block_tables [B, MB]."""
        bs = self.block_size
        blocks = block_tables.gather(1, (positions // bs)[:, None]).squeeze(1)    # [B]
        return StepInputs(input_ids, positions, blocks * bs + positions % bs, input_ids.shape[0], block_tables)

    # --- the pieces of a forward pass (the piecewise graphs replay all but attention)
    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Hidden states [N, hidden] and the rotary tables cos, sin [N, 1, D] of the rows' positions."""
        return self.embed_tokens(input_ids), self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def attention_inputs(self, index: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer `index`'s q [N, H, D], k, v [N, KVH, D] of hidden states x [N, hidden]; k and v also written to
        the KV cache at slot_mapping [N]."""
        n = x.shape[0]
        attn = self.layers[index].self_attn
        h = self.layers[index].input_layernorm(x)                                           # [N, hidden]
        q = apply_rope(attn.q_proj(h).view(n, self.num_heads, self.head_dim), cos, sin)     # [N, H, D]
        k = apply_rope(attn.k_proj(h).view(n, self.num_kv_heads, self.head_dim), cos, sin)  # [N, KVH, D]
        v = attn.v_proj(h).view(n, self.num_kv_heads, self.head_dim)                       # [N, KVH, D]
        self.k_cache[index].view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, slot_mapping, k)
        self.v_cache[index].view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, slot_mapping, v)
        return q, k, v

    def attention_output(self, index: int, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """x [N, hidden] after layer `index`, given its attention o [N, H, D]: o_proj, residual, MLP."""
        layer = self.layers[index]
        x = x + layer.self_attn.o_proj(o.reshape(x.shape[0], self.num_heads * self.head_dim))
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def decode_mask(self, inp: StepInputs) -> Optional[torch.Tensor]:
        """The additive mask [Bd, 1, 1, MB*bs] of the decode rows' contexts for SDPA; None with the paged kernel
        (it reads each row's own length) or without decode rows."""
        if not inp.num_decode or self.paged_kernel is not None:
            return None
        length = inp.decode_block_tables.shape[1] * self.block_size
        context = inp.positions[:inp.num_decode] + 1                      # [Bd]
        visible = self._arange[:length][None, :] < context[:, None]      # [Bd, L]
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device).masked_fill_(~visible, float("-inf"))
        return mask.view(inp.num_decode, 1, 1, length)

    def attention(self, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inp: StepInputs,
                  decode_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Layer `index`'s attention of the step's real rows: q [n, H, D], k/v [n, KVH, D] -> [n, H, D]."""
        k_cache, v_cache = self.k_cache[index], self.v_cache[index]      # [NB+1, bs, KVH, D]
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

    # --- the forward pass
    @torch.inference_mode()
    def forward(self, inp: StepInputs) -> torch.Tensor:
        """Logits [S, V] (float32) of the rows in inp.logits_rows (every row if None). No padding rows."""
        x, cos, sin = self.embed(inp.input_ids, inp.positions)           # [N, hidden], [N, 1, D]
        mask = self.decode_mask(inp)
        for index in range(len(self.layers)):
            q, k, v = self.attention_inputs(index, x, cos, sin, inp.slot_mapping)
            x = self.attention_output(index, x, self.attention(index, q, k, v, inp, mask))
        if inp.logits_rows is not None:
            x = x[inp.logits_rows]                                        # [S, hidden]
        return self.lm_head(self.norm(x)).float()                         # [S, V]

    # --- a step
    def run(self, batch: ScheduledBatch) -> StepOutput:
        """Logits [S, V] for batch.sampled(), in that order: a decode graph (with its sampled tokens), else the
        piecewise graphs, else eagerly."""
        if self.graphs is not None and not batch.prefill:
            logits = self.graphs.run(batch.decode)
            if logits is not None:
                self._count(self.graphs.use_graphs)
                return StepOutput(logits, self.graphs.tokens[:len(batch.decode)])
        if self.piecewise is not None:
            padded = self.piecewise.bucket(batch.num_tokens)
            if padded is not None:
                logits = self.piecewise.run(self.stager.prepare(batch, padded))
                self._count(self.piecewise.use_graphs)
                return StepOutput(logits)
        self._count(False)
        return StepOutput(self.forward(self.stager.prepare(batch)))

    def _count(self, replayed: bool) -> None:
        if replayed:
            self.graph_steps += 1
        else:
            self.eager_steps += 1

    def capture_graphs(self, largest_only: bool = False) -> None:
        """Capture the decode and the piecewise graphs in one memory pool (only their largest buckets: what KV
        sizing measures); on failure, run eagerly."""
        graphs, piecewise = DecodeGraphs(self), PiecewiseGraphs(self)
        try:
            pool = torch.cuda.graph_pool_handle()
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            self.stager.clear_tokens()
            graphs.capture(pool, stream, largest_only)
            piecewise.capture(pool, stream, largest_only)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            torch.cuda.synchronize(self.device)
        except Exception:
            log.exception("CUDA graph capture failed; running every step eagerly")
            torch.cuda.synchronize(self.device)
            return
        self.graphs, self.piecewise = graphs, piecewise
        log.info("captured %d decode CUDA graphs (batch sizes %s, block widths %s) and %d piecewise graphs "
                 "(token counts %s)", len(graphs.graphs), graphs.batch_sizes, graphs.widths,
                 sum(map(len, piecewise.graphs.values())), piecewise.sizes)

    def graph_report(self) -> dict:
        """Buckets captured and expected, per kind of graph (what a GPU check verifies)."""
        expected = {"decode": len(DecodeGraphs.buckets_for(self)),
                    "piecewise": len(PiecewiseGraphs.sizes_for(self)) * PiecewiseGraphs.pieces_for(self)}
        captured = {"decode": len(self.graphs.graphs) if self.graphs and self.graphs.use_graphs else 0,
                    "piecewise": sum(map(len, self.piecewise.graphs.values()))
                    if self.piecewise and self.piecewise.use_graphs else 0}
        return {kind: {"expected": expected[kind], "captured": captured[kind]} for kind in expected}

    def warmup(self) -> None:
        """Start-up work, never on a user's request: one dummy decode; on CUDA, capture the graphs."""
        null = torch.full((1, 1), self.null_block, dtype=torch.long, device=self.device)
        zero = torch.zeros(1, dtype=torch.long, device=self.device)
        self.forward(self.decode_inputs(zero, zero, null))
        if self.device.type == "cuda" and self.config.use_cuda_graphs:
            self.capture_graphs()
