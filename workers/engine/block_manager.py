"""The KV cache's bookkeeping: fixed-size blocks handed to sequences as they grow, and the prefix cache.

A sequence's block table lists its blocks in order; token t lives in block table[t // block_size] at offset
t % block_size.

Prefix caching (as vLLM's v1/core): a *full* block whose K/V are computed is known by a hash of (its parent
block's hash, its tokens), so the hash names the whole prefix up to the block's end, and K/V at a position
depend only on that prefix. A new sequence looks its prompt's block hashes up and takes the longest run of
cached blocks instead of computing them; only full blocks are shared, and a sequence writes only past its
cached prefix, so a shared block is never written again. Blocks are reference-counted: a block no sequence
holds keeps its contents and stays cached until the allocator needs it, least recently freed first (and the
last blocks of a sequence, the least shareable, before its first ones). Blocks that hold nothing worth
keeping are handed out before any cached one.

The hash is SHA-256, not Python's hash(): block contents come from users, and a collision would hand one
user's prompt the K/V of another's.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Optional

import numpy as np

# The parent hash of a sequence's first block.
ROOT_HASH = b""


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """The hash that names a full block: its parent's hash and its tokens."""
    return hashlib.sha256(parent + np.asarray(tokens, dtype=np.int64).tobytes()).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"need num_blocks > 0 and block_size > 0, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # Prompt tokens looked up in the prefix cache, and those found there (since start: Prometheus counters).
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.num_evicted = 0  # cached blocks handed out for new contents
        self.reset()

    def reset(self) -> None:
        """Every block free and the prefix cache empty (the engine's reset after an error); counters stay."""
        self._refs = [0] * self.num_blocks
        self._hash_of: list[Optional[bytes]] = [None] * self.num_blocks  # set while the block is in the cache
        self._cached: dict[bytes, int] = {}                               # hash -> the block holding it
        self._free: list[int] = list(range(self.num_blocks - 1, -1, -1))  # a stack: low ids are handed out first
        self._evictable: OrderedDict[int, None] = OrderedDict()           # cached, held by none: LRU first

    # --- sizes
    @property
    def num_free(self) -> int:
        """Blocks that can be handed out: the empty ones and the cached ones no sequence holds."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks some sequence holds."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    # --- growing and freeing tables
    def can_allocate(self, block_table: list[int], num_tokens: int, reserve: int = 0) -> bool:
        """Whether `block_table` can grow to hold `num_tokens` tokens and leave `reserve` blocks free."""
        return self.blocks_for(num_tokens) - len(block_table) <= self.num_free - reserve

    def allocate(self, block_table: list[int], num_tokens: int, reserve: int = 0,
                 cached: tuple[int, ...] | list[int] = ()) -> bool:
        """Grow `block_table` in place to hold `num_tokens` tokens, all or nothing; False: not enough free. An
        empty table may first take `cached` (from `cached_prefix`): those blocks are shared, not new."""
        if cached and block_table:
            raise ValueError("cached blocks start a table: the table must be empty")
        need = self.blocks_for(num_tokens) - len(block_table) - len(cached)
        # A cached block no one holds counts as free until it is taken here.
        claimed = sum(1 for block in cached if self._refs[block] == 0)
        if need > self.num_free - claimed - reserve:
            return False
        for block in cached:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
            block_table.append(block)
        for _ in range(max(need, 0)):
            block = self._take_free()
            self._refs[block] = 1
            block_table.append(block)
        return True

    def free(self, block_table: list[int]) -> None:
        """Drop the table's hold on each of its blocks and empty it. A block no one holds any more stays cached
        if it is; the table's last blocks are freed first, so they are evicted first."""
        for block in reversed(block_table):
            if self._refs[block] <= 0:
                raise RuntimeError(f"KV block {block} freed twice")
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if self._hash_of[block] is not None:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        block_table.clear()

    def _take_free(self) -> int:
        if self._free:
            return self._free.pop()
        block, _ = self._evictable.popitem(last=False)  # the least recently freed cached block
        self.num_evicted += 1
        del self._cached[self._hash_of[block]]
        self._hash_of[block] = None
        return block

    # --- the prefix cache
    def hashes(self, token_ids: list[int], known: list[bytes], num_blocks: int) -> list[bytes]:
        """The hashes of the first `num_blocks` full blocks of token_ids; `known` holds those already computed
        (the sequence's memo) and is extended in place."""
        bs = self.block_size
        for i in range(len(known), num_blocks):
            known.append(block_hash(known[i - 1] if i else ROOT_HASH, token_ids[i * bs:(i + 1) * bs]))
        return known[:num_blocks]

    def cached_prefix(self, token_ids: list[int], known: list[bytes]) -> list[int]:
        """The cached blocks of the longest cached run of token_ids' full blocks, leaving at least the last token
        to compute (its logits give the next token)."""
        if not self.enable_prefix_caching:
            return []
        blocks = []
        for digest in self.hashes(token_ids, known, (len(token_ids) - 1) // self.block_size):
            block = self._cached.get(digest)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def count_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """An admitted sequence's lookup, for the hit rate."""
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit_tokens

    def cache_computed(self, block_table: list[int], token_ids: list[int], known: list[bytes],
                       num_computed_tokens: int, num_cached_blocks: int) -> int:
        """Put the table's full, computed blocks from index num_cached_blocks on in the cache; returns how many of
        its blocks are now cached or known to be. A block whose hash another block already holds (two sequences
        computed the same prefix at once) stays the table's own, and is freed as an empty block."""
        full = num_computed_tokens // self.block_size
        if not self.enable_prefix_caching or full <= num_cached_blocks:
            return num_cached_blocks
        for i, digest in enumerate(self.hashes(token_ids, known, full)[num_cached_blocks:], num_cached_blocks):
            block = block_table[i]
            if digest not in self._cached and self._hash_of[block] is None:
                self._cached[digest] = block
                self._hash_of[block] = digest
        return full
