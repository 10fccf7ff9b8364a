"""Which sequences run in the next step, and on how many of their tokens.

- `waiting` is FIFO within a priority (interactive 0 before batch 1; a preempted sequence goes back to the
  front of its own priority); `running` is in admission order.
- Each step every running sequence that is decoding computes its one newest token. Prompts are computed in
  chunks: at most `prefill_chunk_tokens` prompt tokens per step, shared oldest first, so a long prompt is
  split across steps and never stalls the running streams.
- A waiting sequence is admitted (FIFO, never skipping the head) while there is a batch slot, prefill budget
  and free KV blocks for its whole prompt. It takes the longest run of its prompt's full blocks that the prefix
  cache holds (block_manager.py) and computes only the rest; after each step the full blocks computed go into
  the cache (`cache_computed`). Decoding takes one more block every `block_size` tokens; when none
  is free a running sequence is preempted: the newest of the least urgent priority (batch work before any
  interactive stream). Its blocks are freed and it waits to be recomputed.
- Choices of one job share their prompt: a sequence with a `leader_id` waits (at the head) until that sibling
  has computed the prompt, then is admitted with the prompt's KV blocks copied from it (`kv_copies`, done by
  the runner before the step; with the prefix cache only the blocks past the cached ones, the partial last
  block) and computes only the prompt's last token itself, for its own first draw.
- After a device out-of-memory the engine shrinks the batch (`shrink`): the newest half of the running
  sequences is preempted, and the batch and the prefill budget stay at half until `restore`.
- A request that could never fit (prompt + one token larger than the whole cache, or than max_model_len) is
  refused by `check`; a sequence that alone fills the whole cache ends with "length".
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from workers.engine.block_manager import BlockManager
from workers.engine.config import EngineConfig
from workers.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    decode: list[Sequence] = field(default_factory=list)      # one token each: the newest
    prefill: list[Sequence] = field(default_factory=list)     # a chunk each, prefill_lens[i] tokens
    prefill_lens: list[int] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)    # (re)admitted this step: fresh batch slots
    ended: list[tuple[Sequence, str, Optional[str]]] = field(default_factory=list)  # (seq, reason, error)
    num_preempted: int = 0
    kv_copies: list[tuple[list[int], list[int]]] = field(default_factory=list)  # (source blocks, their copies)

    @property
    def is_empty(self) -> bool:
        return not self.decode and not self.prefill

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(self.prefill_lens)

    def sampled(self) -> list[Sequence]:
        """Sequences whose last token is computed this step, so they sample a next token: the logits rows."""
        done = [s for s, n in zip(self.prefill, self.prefill_lens) if s.num_computed_tokens + n == s.num_tokens]
        return self.decode + done


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.config = config
        self.max_num_seqs = config.max_num_seqs               # the batch's limit now (shrink lowers it)
        self.prefill_chunk_tokens = config.prefill_chunk_tokens
        self.max_model_len = config.max_model_len
        self.blocks = block_manager
        # Kept free when admitting beside running sequences, so their decoding does not at once preempt.
        self.watermark = max(1, block_manager.num_blocks // 100)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._free_slots = list(range(config.max_num_seqs - 1, -1, -1))
        self.num_preempted = 0  # since start, for logs and tests
        self.num_shared_tokens = 0  # prompt tokens whose KV was copied from a sibling instead of computed

    # --- intake and exits
    def check(self, seq: Sequence) -> Optional[str]:
        """Why `seq` can never run (an error message), or None."""
        n = seq.num_tokens
        if n == 0:
            return "the prompt is empty"
        if n >= self.max_model_len:
            return (f"the prompt has {n} tokens; the engine's max_model_len is {self.max_model_len} "
                    f"(prompt and at least one output token must fit)")
        need = self.blocks.blocks_for(n + 1)
        if need > self.blocks.num_blocks:
            return (f"the prompt has {n} tokens: with its first output token it needs {need} KV-cache blocks of "
                    f"{self.blocks.block_size} tokens, and the whole KV cache has {self.blocks.num_blocks}")
        return None

    def add(self, seq: Sequence) -> None:
        """Queue `seq` behind every waiting sequence of its priority or a more urgent one (so interactive
        requests wait only for each other, never behind batch work)."""
        seq.status = SequenceStatus.WAITING
        position = len(self.waiting)
        while position > 0 and self.waiting[position - 1].priority > seq.priority:
            position -= 1
        self.waiting.insert(position, seq)

    def finish(self, seq: Sequence) -> None:
        """Take `seq` out (finished, failed or cancelled) and free its blocks and slot."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED

    def abort(self, request_id: str) -> list[Sequence]:
        """Take out every sequence of `request_id` (waiting or running); returns them."""
        found = [s for s in self.running if s.request_id == request_id]
        found += [s for s in self.waiting if s.request_id == request_id]
        for seq in found:
            self.finish(seq)
        return found

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # --- out of device memory
    def shrink(self) -> int:
        """Halve the batch: preempt the newest half of the running sequences (the least urgent first), and cap
        the batch and the prefill budget at half, so that the step that ran out of memory is not rebuilt at
        once. Returns how many were preempted."""
        keep = len(self.running) // 2
        self.max_num_seqs = max(1, keep)
        self.prefill_chunk_tokens = max(1, self.prefill_chunk_tokens // 2)
        preempted = 0
        while len(self.running) > keep:
            self._preempt(self._victim(), ScheduledBatch())
            preempted += 1
        return preempted

    def restore(self) -> None:
        """Back to the configured batch and prefill budget."""
        self.max_num_seqs = self.config.max_num_seqs
        self.prefill_chunk_tokens = self.config.prefill_chunk_tokens

    @property
    def shrunk(self) -> bool:
        return (self.max_num_seqs, self.prefill_chunk_tokens) != (self.config.max_num_seqs,
                                                                  self.config.prefill_chunk_tokens)

    # --- the step
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.prefill_chunk_tokens
        for seq in list(self.running):  # oldest first
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted by an older sequence of this step
            n = seq.num_uncomputed_tokens
            if n == 1:
                if self._make_room(seq, batch):
                    batch.decode.append(seq)
            elif budget > 0:
                chunk = min(n, budget)
                budget -= chunk
                batch.prefill.append(seq)
                batch.prefill_lens.append(chunk)

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            leader, shared = self._shared_prompt(seq)
            if leader is not None and leader.num_computed_tokens < shared:
                break  # its sibling is still computing the prompt they share: wait for it
            reserve = self.watermark if self.running else 0
            cached = self.blocks.cached_prefix(seq.token_ids, seq.block_hashes)
            if not self.blocks.allocate(seq.block_table, seq.num_tokens, reserve, cached):
                break  # FIFO: the head waits for blocks, nobody overtakes it
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.slot = self._free_slots.pop()
            self.running.append(seq)
            seq.num_cached_blocks = len(cached)
            seq.num_computed_tokens = len(cached) * self.blocks.block_size
            self.blocks.count_lookup(seq.num_tokens, seq.num_computed_tokens)
            if leader is not None and shared > seq.num_computed_tokens:
                # The sibling's blocks past the cached ones (all of them without the prefix cache, else the
                # partial last block) are copied.
                first, blocks = len(cached), self.blocks.blocks_for(shared)
                batch.kv_copies.append((leader.block_table[first:blocks], seq.block_table[first:blocks]))
                self.num_shared_tokens += shared - seq.num_computed_tokens
                seq.num_computed_tokens = shared
            chunk = min(seq.num_uncomputed_tokens, budget)
            budget -= chunk
            batch.admitted.append(seq)
            batch.prefill.append(seq)
            batch.prefill_lens.append(chunk)
        return batch

    def _shared_prompt(self, seq: Sequence) -> tuple[Optional[Sequence], int]:
        """The running sibling seq may copy its prompt's KV from, and how many tokens (their common prefix, less
        the last token of seq's, which seq computes for its own logits); (None, 0) if none."""
        if seq.leader_id is None:
            return None, 0
        leader = next((s for s in self.running if s.request_id == seq.leader_id), None)
        if leader is None:
            return None, 0
        limit = min(seq.num_tokens - 1, leader.num_tokens)
        shared = next((i for i in range(limit) if seq.token_ids[i] != leader.token_ids[i]), limit)
        return leader, shared

    def _make_room(self, seq: Sequence, batch: ScheduledBatch) -> bool:
        """Blocks for seq's newest token, preempting running sequences as needed (_victim). False when seq
        itself had to go (preempted, or ended for filling the whole cache alone)."""
        while not self.blocks.allocate(seq.block_table, seq.num_tokens):
            victim = self._victim()
            if victim is seq and len(self.running) == 1:
                self.finish(seq)
                batch.ended.append((seq, "length", None))  # it alone fills the KV cache
                return False
            self._preempt(victim, batch)
            if victim is seq:
                return False
        return True

    def _victim(self) -> Sequence:
        """The running sequence to preempt: the newest of the least urgent priority (batch work goes before any
        interactive stream; among equals, the one that has had the least time in the batch)."""
        least_urgent = max(s.priority for s in self.running)
        return next(s for s in reversed(self.running) if s.priority == least_urgent)

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.num_preempted += 1
        batch.num_preempted += 1
        if seq in batch.decode:  # already scheduled in this step (it was older than the one needing room)
            batch.decode.remove(seq)
        elif seq in batch.prefill:
            index = batch.prefill.index(seq)
            del batch.prefill[index], batch.prefill_lens[index]
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed_tokens = 0  # recomputed (prompt + outputs so far) when it is admitted again
        seq.status = SequenceStatus.WAITING
        position = 0  # the front of its own priority: behind every more urgent waiting sequence
        while position < len(self.waiting) and self.waiting[position].priority < seq.priority:
            position += 1
        self.waiting.insert(position, seq)

    def cache_computed(self, seqs: list[Sequence]) -> None:
        """After a step: the full blocks these sequences computed go into the prefix cache."""
        for seq in seqs:
            seq.num_cached_blocks = self.blocks.cache_computed(seq.block_table, seq.token_ids, seq.block_hashes,
                                                               seq.num_computed_tokens, seq.num_cached_blocks)

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        seq.num_cached_blocks = 0
        self._free_slots.append(seq.slot)
        seq.slot = -1
