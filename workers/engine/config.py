"""Engine settings: batch size, KV-cache layout and size, prefill chunking, CUDA graphs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64               # most sequences in one step (the batch)
    block_size: int = 16                 # tokens per KV-cache block
    num_kv_blocks: Optional[int] = None  # None: derive (CUDA: kv_memory_fraction of free memory; CPU: kv_cpu_tokens)
    # Share of the free GPU memory the KV cache takes: what is free after the weights, the largest step's
    # activations and the CUDA graphs' pool (model_runner.kv_blocks_for).
    kv_memory_fraction: float = 0.85
    kv_cpu_tokens: int = 65536           # KV-cache size in tokens on CPU
    prefill_chunk_tokens: int = 512      # most prompt tokens computed in one step
    max_model_len: int = 32768           # longest sequence (prompt + output) the engine runs
    use_cuda_graphs: bool = True         # capture decode steps whole and prefill steps piecewise (CUDA only)
    # Decode attention: "triton" reads the KV blocks in place (workers/engine/paged_attention.py), "sdpa"
    # gathers each row's context first; "auto" is triton on CUDA (if it passes its start-up check), sdpa on CPU.
    attention: str = "auto"
    # Reuse the KV blocks of prompt prefixes computed before (block_manager.py).
    enable_prefix_caching: bool = True
    max_failed_steps: int = 3            # this many failed steps in a row: the device is broken (see Engine.on_fatal)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "block_size", "kv_cpu_tokens", "prefill_chunk_tokens", "max_model_len",
                     "max_failed_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValueError(f"num_kv_blocks must be > 0 or None, got {self.num_kv_blocks}")
        if self.attention not in ("auto", "triton", "sdpa"):
            raise ValueError(f"attention must be auto, triton or sdpa, got {self.attention!r}")
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.block_size)

    @classmethod
    def from_settings(cls, settings) -> "EngineConfig":
        """From config.settings.Settings: kv_cache_tokens > 0 fixes the cache size, 0 derives it."""
        block_size = settings.kv_block_size
        tokens = settings.kv_cache_tokens
        return cls(max_num_seqs=settings.max_num_seqs, block_size=block_size,
                   num_kv_blocks=-(-tokens // block_size) if tokens > 0 else None,
                   kv_memory_fraction=settings.kv_memory_fraction, kv_cpu_tokens=settings.kv_cpu_tokens,
                   prefill_chunk_tokens=settings.prefill_chunk_tokens, max_model_len=settings.max_model_len,
                   attention=settings.decode_attention, enable_prefix_caching=settings.prefix_caching)
