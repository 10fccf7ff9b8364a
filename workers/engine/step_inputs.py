"""A step's inputs: written on the host into persistent buffers, moved to the device in one copy.

Every index a step needs (token ids, positions, KV slots, the rows that need logits, block tables) is written
into one int64 host buffer (pinned on CUDA, so the copy is asynchronous), and one non-blocking copy moves the
used prefix into a device buffer of the same layout; StepInputs holds views of that device buffer. The buffers
persist because a CUDA graph reads its inputs at fixed addresses.

Block tables are not rebuilt from Python lists each step: the host keeps one row per batch slot (`tables`),
updated only when its sequence gains blocks, and a step's tables are one `np.take` of those rows.

Reusing the buffers every step is safe because the engine reads each step's sampled tokens back before it
prepares the next step, and that read waits for this copy.

Layout (fixed offsets, so that a captured graph finds its inputs where the next step writes them):
  ids [N] | positions [N] | slots [N] | logits_rows [S] | a decode graph's sampling inputs: temperature [S],
  top_p [S] (float64 bits), seed keys [S], output positions [S] | tables area: the decode rows' tables [B, W]
  (W the step's width, or its graph bucket's), then each later prefill chunk's table.
N = most tokens in a step (decode rows + the prefill budget), S = most sampled rows, B = most decode rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from workers.engine.config import EngineConfig
from workers.engine.scheduler import ScheduledBatch
from workers.engine.sequence import Sequence


@dataclass
class Chunk:
    """A prefill chunk: rows [row, row + length) of the step are positions [start, start + length)."""
    row: int
    length: int
    start: int
    block_table: Optional[torch.Tensor] = None  # [nb] blocks holding positions [0, start + length); None if start == 0


@dataclass
class StepInputs:
    input_ids: torch.Tensor      # [T] (T >= num_tokens: rows past num_tokens are padding)
    positions: torch.Tensor      # [T]
    slot_mapping: torch.Tensor   # [T] cache row (block * bs + offset) each token's K/V is written to
    num_decode: int = 0          # Bd: rows 0..Bd-1 are decode tokens
    decode_block_tables: Optional[torch.Tensor] = None  # [Bd, MB], past each row's length: any valid block
    chunks: list[Chunk] = field(default_factory=list)
    logits_rows: Optional[torch.Tensor] = None          # [S]; None = every real row
    num_tokens: Optional[int] = None                    # real rows (None: all T)

    def __post_init__(self) -> None:
        if self.num_tokens is None:
            self.num_tokens = self.input_ids.shape[0]


def max_step_tokens(config: EngineConfig) -> int:
    """Most tokens one step can hold: a decode token per batch slot and the whole prefill budget."""
    return config.max_num_seqs + config.prefill_chunk_tokens


class InputStager:
    def __init__(self, config: EngineConfig, block_size: int, null_block: int, device: torch.device):
        self.block_size = block_size
        self.null_block = null_block
        self.device = device
        self.max_tokens = n = max_step_tokens(config)
        self.max_seqs = s = config.max_num_seqs
        mb = config.max_blocks_per_seq
        self.ids_at, self.positions_at, self.slots_at, self.rows_at = 0, n, 2 * n, 3 * n
        self.sampling_at = 3 * n + s
        self.tables_at = self.sampling_at + 4 * s
        size = self.tables_at + 2 * s * mb  # decode tables, then at most one table per prefill chunk
        pin = device.type == "cuda"
        self.host = torch.zeros(size, dtype=torch.long, pin_memory=pin)
        self.buffer = self.host.numpy()  # the same memory, written with numpy (much cheaper than tensor indexing)
        # On the CPU the host buffer is the device buffer: no copy.
        self.device_buffer = torch.zeros(size, dtype=torch.long, device=device) if pin else self.host
        # Block tables by batch slot; row max_seqs is all null blocks (padding rows of a graph bucket).
        self.tables = np.full((s + 1, mb), null_block, dtype=np.int64)
        self._table_owner: list[Optional[Sequence]] = [None] * s
        self._table_len = [0] * s

    # --- block tables
    def _sync_table(self, seq: Sequence) -> int:
        """The slot's host row holds seq's block table (only its new blocks are written); returns the slot."""
        slot = seq.slot
        table = seq.block_table
        have = self._table_len[slot] if self._table_owner[slot] is seq else 0
        if len(table) > have:
            self.tables[slot, have:len(table)] = table[have:]
        self._table_owner[slot] = seq
        self._table_len[slot] = len(table)
        return slot

    def _write_tables(self, seqs: list[Sequence], rows: int, width: int) -> int:
        """Tables of `seqs` (then null rows up to `rows`) as [rows, width] at the start of the tables area."""
        slots = [self._sync_table(s) for s in seqs] + [self.max_seqs] * (rows - len(seqs))
        out = self.buffer[self.tables_at:self.tables_at + rows * width].reshape(rows, width)
        np.take(self.tables[:, :width], slots, axis=0, out=out)
        return self.tables_at + rows * width

    def _view(self, start: int, length: int) -> torch.Tensor:
        return self.device_buffer[start:start + length]

    def _copy(self, used: int) -> None:
        if self.device_buffer is not self.host:
            self.device_buffer[:used].copy_(self.host[:used], non_blocking=True)

    def _write_decode_rows(self, decode: list[Sequence], rows: int) -> list[int]:
        """Rows 0..len(decode)-1: each decoding sequence's newest token and its position; then padding rows up
        to `rows` (token 0 at position 0). Returns the positions."""
        buf, count = self.buffer, len(decode)
        positions = [s.num_computed_tokens for s in decode]
        buf[self.ids_at:self.ids_at + count] = [s.token_ids[-1] for s in decode]
        buf[self.positions_at:self.positions_at + count] = positions
        buf[self.ids_at + count:self.ids_at + rows] = 0
        buf[self.positions_at + count:self.positions_at + rows] = 0
        return positions

    # --- a step
    def prepare(self, batch: ScheduledBatch, padded_tokens: Optional[int] = None) -> StepInputs:
        """Inputs for `batch`; with padded_tokens, rows up to it are padding that write only the null block."""
        bs, buf = self.block_size, self.buffer
        for seq in batch.admitted:  # a fresh slot (or a preempted sequence back with new blocks): rewrite its row
            self._table_owner[seq.slot] = None
        decode = batch.decode
        bd = len(decode)
        n = batch.num_tokens
        t = padded_tokens or n
        ids, pos, slots = self.ids_at, self.positions_at, self.slots_at
        positions = self._write_decode_rows(decode, bd)
        buf[slots:slots + bd] = [s.block_table[p // bs] * bs + p % bs for s, p in zip(decode, positions)]
        rows = list(range(bd))
        used = self.tables_at
        width = 0
        if decode:
            width = max(len(s.block_table) for s in decode)
            used = self._write_tables(decode, bd, width)
        chunks, chunk_tables = [], []  # (chunk, offset, blocks) for chunks that read a cached prefix
        row = bd
        for seq, length in zip(batch.prefill, batch.prefill_lens):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + length
            slot = self._sync_table(seq)
            span = np.arange(start, end)
            buf[ids + row:ids + row + length] = seq.token_ids[start:end]
            buf[pos + row:pos + row + length] = span
            buf[slots + row:slots + row + length] = self.tables[slot, span // bs] * bs + span % bs
            chunks.append(Chunk(row, length, start))
            if start > 0:
                blocks = -(-end // bs)
                buf[used:used + blocks] = self.tables[slot, :blocks]
                chunk_tables.append((chunks[-1], used, blocks))
                used += blocks
            if end == seq.num_tokens:
                rows.append(row + length - 1)
            row += length
        buf[ids + n:ids + t] = 0  # padding: token 0 at position 0 in the null block
        buf[pos + n:pos + t] = 0
        buf[slots + n:slots + t] = self.null_block * bs
        buf[self.rows_at:self.rows_at + len(rows)] = rows
        self._copy(used)
        for chunk, at, blocks in chunk_tables:
            chunk.block_table = self._view(at, blocks)
        return StepInputs(self._view(ids, t), self._view(pos, t), self._view(slots, t), bd,
                          self._view(self.tables_at, bd * width).view(bd, width) if decode else None, chunks,
                          None if len(rows) == n and t == n else self._view(self.rows_at, len(rows)), n)

    def prepare_decode(self, decode: list[Sequence], rows: int, width: int) -> None:
        """A decode-only step padded to a graph bucket: ids and positions [rows], tables [rows, width], the
        sampling inputs [rows] (padding rows decode token 0 at position 0 in the null block, greedily)."""
        count = len(decode)
        self._write_decode_rows(decode, rows)
        temperature, top_p, keys, positions = self._sampling_arrays(rows)
        temperature[:count] = [s.sampling.temperature for s in decode]
        top_p[:count] = [s.sampling.top_p for s in decode]
        keys[:count] = [s.seed_key for s in decode]
        positions[:count] = [s.sample_position for s in decode]
        temperature[count:], top_p[count:], keys[count:], positions[count:] = 0.0, 1.0, 0, 0  # padding: greedy
        self._copy(self._write_tables(decode, rows, width))

    def _sampling_arrays(self, rows: int) -> tuple:
        at, s, buf = self.sampling_at, self.max_seqs, self.buffer
        return (buf[at:at + rows].view(np.float64), buf[at + s:at + s + rows].view(np.float64),
                buf[at + 2 * s:at + 2 * s + rows], buf[at + 3 * s:at + 3 * s + rows])

    def sampling_views(self, rows: int) -> tuple[torch.Tensor, ...]:
        """The device views of prepare_decode's sampling inputs [rows]: temperature, top_p (float32: made in the
        graph from the float64 staged), seed keys, output positions."""
        at, s = self.sampling_at, self.max_seqs
        return (self._view(at, rows).view(torch.float64).float(), self._view(at + s, rows).view(torch.float64).float(),
                self._view(at + 2 * s, rows), self._view(at + 3 * s, rows))

    def token_views(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The device views prepare fills: ids, positions, slots [rows]."""
        return self._view(self.ids_at, rows), self._view(self.positions_at, rows), self._view(self.slots_at, rows)

    def clear_tokens(self) -> None:
        """Every row a padding row (token 0 at position 0, the null block), every table null: what graph capture
        runs on, so that it writes only the null block."""
        n, buf = self.max_tokens, self.buffer
        buf[:self.slots_at] = 0
        buf[self.slots_at:self.slots_at + n] = self.null_block * self.block_size
        buf[self.tables_at:] = self.null_block
        self._copy(len(buf))

    def decode_views(self, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The device views prepare_decode fills: ids [rows], positions [rows], tables [rows, width]."""
        return (self._view(self.ids_at, rows), self._view(self.positions_at, rows),
                self._view(self.tables_at, rows * width).view(rows, width))
