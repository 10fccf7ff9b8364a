"""OpenAI's frequency and presence penalties, applied to only the tokens a sequence has generated.

A token's logit loses ``count * frequency_penalty + presence_penalty`` once the sequence has generated it
`count` >= 1 times, counting also the tokens of earlier attempts of its job (a resumed job feeds those back as
prompt; they still count). A sequence generates far fewer distinct tokens than the vocabulary holds, so each
batch slot keeps the list of its distinct tokens, and a step touches P x D entries (P penalised rows, D the
longest list) instead of P x V: with 32 rows of a 32000-token vocabulary, a dense subtraction would cost more
than the whole draw.

Per slot (row `slot` of each tensor): counts [V] of each generated token, distinct [D] the distinct tokens in
order of first appearance (the first num_distinct[slot] entries are valid), the two penalties.

Every method runs in inference mode: the engine calls some of them inside its step, where the logits are
inference tensors and where a growing list becomes one, and others outside it; an inference tensor can be
changed in place only in inference mode.
"""
from __future__ import annotations

from typing import Sequence as Seq

import torch


class PenaltyTable:
    def __init__(self, num_slots: int, vocab_size: int, device: torch.device, capacity: int = 64):
        self.vocab_size = vocab_size
        self.device = device
        self.counts = torch.zeros(num_slots, vocab_size, device=device)                   # [slots, V]
        self.distinct = torch.zeros(num_slots, capacity, dtype=torch.long, device=device)  # [slots, D]
        self.frequency = torch.zeros(num_slots, device=device)                            # [slots]
        self.presence = torch.zeros(num_slots, device=device)                             # [slots]
        self.num_distinct = [0] * num_slots  # on the host: sizes the per-step work without a device read

    @torch.inference_mode()
    def reset(self, slot: int, generated: Seq[int], frequency: float, presence: float) -> None:
        """A sequence takes `slot`, having generated `generated` so far (nothing, or the tokens before a resume or
        a preemption)."""
        self.counts[slot].zero_()
        self.frequency[slot], self.presence[slot] = frequency, presence
        distinct = list(dict.fromkeys(generated))
        self._ensure_capacity(len(distinct))
        if generated:
            ids = torch.tensor(list(generated), device=self.device)
            self.counts[slot].index_add_(0, ids, torch.ones(len(ids), device=self.device))
            self.distinct[slot, :len(distinct)] = torch.tensor(distinct, device=self.device)
        self.num_distinct[slot] = len(distinct)

    @torch.inference_mode()
    def apply_(self, logits: torch.Tensor, rows: Seq[int], slots: Seq[int]) -> None:
        """Subtract the penalties of slots[i] from logits[rows[i]], in place (logits [S, V] float32)."""
        width = max(self.num_distinct[s] for s in slots)
        if width == 0:
            return
        slot_index = torch.tensor(slots, device=self.device)                              # [P]
        ids = self.distinct[slot_index, :width]                                           # [P, D]
        counts = self.counts[slot_index.unsqueeze(1), ids]                                # [P, D]
        penalty = counts * self.frequency[slot_index].unsqueeze(1) + self.presence[slot_index].unsqueeze(1)
        lengths = torch.tensor([self.num_distinct[s] for s in slots], device=self.device).unsqueeze(1)  # [P, 1]
        padding = torch.arange(width, device=self.device).unsqueeze(0) >= lengths                    # [P, D]
        penalty.masked_fill_(padding, 0.0)  # entries past a slot's list point at token 0: they add nothing
        flat = torch.tensor(rows, device=self.device).unsqueeze(1) * self.vocab_size + ids  # [P, D]
        logits.view(-1).index_add_(0, flat.view(-1), penalty.view(-1), alpha=-1)

    @torch.inference_mode()
    def record(self, slots: Seq[int], tokens: torch.Tensor) -> None:
        """slots[i] generated tokens[i] (int64 [P])."""
        slot_index = torch.tensor(slots, device=self.device)
        first_time = self.counts[slot_index, tokens] == 0                                  # [P]
        self.counts.index_put_((slot_index, tokens), torch.ones(len(slots), device=self.device), accumulate=True)
        new = first_time.nonzero().squeeze(1).tolist()
        if not new:
            return
        new_slots = [slots[i] for i in new]
        positions = [self.num_distinct[s] for s in new_slots]
        self._ensure_capacity(max(positions) + 1)
        self.distinct[torch.tensor(new_slots, device=self.device), torch.tensor(positions, device=self.device)] = \
            tokens[torch.tensor(new, device=self.device)]
        for s in new_slots:
            self.num_distinct[s] += 1

    def _ensure_capacity(self, needed: int) -> None:
        capacity = self.distinct.shape[1]
        if needed > capacity:
            grown = max(needed, 2 * capacity)
            self.distinct = torch.cat([self.distinct, self.distinct.new_zeros(len(self.distinct), grown - capacity)],
                                      dim=1)
