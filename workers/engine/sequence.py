"""One request's state inside the engine: its tokens, how many of them are in the KV cache, its blocks."""
from __future__ import annotations

import enum
import itertools
from typing import Any, Optional

from workers.engine.interface import SamplingParams
from workers.engine.sampling import seed_key

_arrival = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"    # queued (new, or preempted: its KV was dropped and is recomputed on return)
    RUNNING = "running"    # holds KV blocks and a batch slot
    FINISHED = "finished"


class Sequence:
    """Tokens are prompt + generated. The first `num_computed_tokens` have their K/V in the cache; a step
    computes the next ones (a prefill chunk, or the one newest token when decoding) and, once every token is
    computed, samples the next token.

    A resumed job's prompt ends with the `num_resumed_tokens` that its earlier attempts generated. They are
    prompt to the KV cache and to max_tokens, but output to sampling: penalties count them, and the next draw
    is the one for output position `num_resumed_tokens + num_output_tokens`, as if the job had never stopped."""

    __slots__ = ("request_id", "token_ids", "num_prompt_tokens", "num_resumed_tokens", "num_computed_tokens",
                 "block_table", "sampling", "seed_key", "max_tokens", "slot", "status", "stream", "arrival",
                 "priority", "logprobs", "matcher", "bias", "leader_id", "block_hashes", "num_cached_blocks")

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams, max_tokens: int,
                 stream: Any = None, priority: int = 0, num_resumed_tokens: int = 0,
                 logprobs: Optional[int] = None, leader_id: Optional[str] = None):
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_resumed_tokens = min(max(num_resumed_tokens, 0), self.num_prompt_tokens)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []          # KV blocks, in order; block i holds tokens [i*bs, (i+1)*bs)
        self.sampling = sampling
        self.seed_key = seed_key(sampling.seed)   # what its draws are hashed from (sampling.py)
        self.max_tokens = max_tokens
        self.slot = -1                            # row of the engine's per-sequence device tensors while running
        self.status = SequenceStatus.WAITING
        self.stream = stream                      # where outputs go (RequestStream)
        self.arrival = next(_arrival)
        self.priority = priority                  # lower is admitted first (interactive 0, batch 1)
        self.logprobs = logprobs                  # None, or how many top logprobs each token reports
        self.matcher = None                       # the grammar's llguidance matcher (engine/grammar.py), or None
        self.bias = None                          # (token ids, biases) as device tensors, or None
        self.leader_id = leader_id                # a sibling whose prompt KV it copies (scheduler.py), or None
        self.block_hashes: list[bytes] = []       # its full blocks' prefix-cache hashes, as far as computed (a memo)
        self.num_cached_blocks = 0                # leading blocks of block_table that are in the prefix cache

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def generated_token_ids(self) -> list[int]:
        """Every token this job generated, in this attempt and the ones before it (what penalties count)."""
        return self.token_ids[self.num_prompt_tokens - self.num_resumed_tokens:]

    @property
    def sample_position(self) -> int:
        """The output position of the next token (0 for a job's first token)."""
        return self.num_resumed_tokens + self.num_output_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def greedy(self) -> bool:
        return self.sampling.temperature <= 0

    @property
    def penalized(self) -> bool:
        return self.sampling.frequency_penalty != 0 or self.sampling.presence_penalty != 0

    @property
    def processed(self) -> bool:
        """Whether its logits change before sampling (penalties, a logit bias, a grammar): such a row is
        sampled by the engine's sampler, not inside the decode graph."""
        return self.penalized or self.bias is not None or self.matcher is not None

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
                f"blocks={len(self.block_table)}, {self.status.value})")
