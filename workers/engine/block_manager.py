"""The KV cache's bookkeeping: a free list of fixed-size blocks, handed to sequences as they grow.

A sequence's block table lists its blocks in order; token t lives in block table[t // block_size] at offset
t % block_size. Blocks are all alike, so a free list is all it takes (no prefix sharing here).
"""
from __future__ import annotations


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"need num_blocks > 0 and block_size > 0, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: low ids are handed out first
        self._in_use = bytearray(num_blocks)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, block_table: list[int], num_tokens: int, reserve: int = 0) -> bool:
        """Whether `block_table` can grow to hold `num_tokens` tokens and leave `reserve` blocks free."""
        return self.blocks_for(num_tokens) - len(block_table) <= len(self._free) - reserve

    def allocate(self, block_table: list[int], num_tokens: int, reserve: int = 0) -> bool:
        """Grow `block_table` in place to hold `num_tokens` tokens; all or nothing. False: not enough free."""
        need = self.blocks_for(num_tokens) - len(block_table)
        if need <= 0:
            return True
        if need > len(self._free) - reserve:
            return False
        for _ in range(need):
            block = self._free.pop()
            self._in_use[block] = 1
            block_table.append(block)
        return True

    def free(self, block_table: list[int]) -> None:
        """Return every block of `block_table` and empty it."""
        for block in reversed(block_table):
            if not self._in_use[block]:
                raise RuntimeError(f"KV block {block} freed twice")
            self._in_use[block] = 0
            self._free.append(block)
        block_table.clear()
