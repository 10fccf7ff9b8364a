"""The penalty table (workers/engine/penalties.py) against OpenAI's dense formula: each logit loses
count * frequency_penalty + (count > 0) * presence_penalty, with count over every token the sequence generated,
those before a resume or a preemption included."""
from __future__ import annotations

import torch

from workers.engine.penalties import PenaltyTable

V = 50


def dense_reference(logits: torch.Tensor, generated: list[int], frequency: float, presence: float) -> torch.Tensor:
    counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=V).float() if generated \
        else torch.zeros(V)
    return logits - counts * frequency - (counts > 0).float() * presence


def test_table_matches_the_dense_formula_step_by_step() -> None:
    gen = torch.Generator().manual_seed(0)
    table = PenaltyTable(num_slots=4, vocab_size=V, device=torch.device("cpu"), capacity=2)  # forced to grow
    # slot 2 resumes after 3 tokens (token 0 among them: padding also points at token 0); slot 0 starts fresh.
    history = {2: [0, 7, 7], 0: []}
    penalties = {2: (0.5, 0.25), 0: (-1.0, 2.0)}
    for slot, generated in history.items():
        table.reset(slot, generated, *penalties[slot])
    for _ in range(12):
        logits = torch.randn(3, V, generator=gen)  # rows: slot 0, an unpenalised row, slot 2
        expected = torch.stack([dense_reference(logits[0], history[0], *penalties[0]), logits[1],
                                dense_reference(logits[2], history[2], *penalties[2])])
        work = logits.clone()
        table.apply_(work, rows=[0, 2], slots=[0, 2])
        assert torch.allclose(work, expected, atol=1e-5)
        tokens = torch.randint(0, 6, (2,), generator=gen)  # a small range: tokens repeat
        table.record([0, 2], tokens)
        history[0].append(int(tokens[0]))
        history[2].append(int(tokens[1]))
    assert table.distinct.shape[1] > 2


def test_a_reset_slot_forgets_its_previous_sequence() -> None:
    table = PenaltyTable(num_slots=1, vocab_size=V, device=torch.device("cpu"))
    table.reset(0, [3, 3, 4], 1.0, 1.0)
    table.reset(0, [], 1.0, 1.0)
    logits = torch.zeros(1, V)
    table.apply_(logits, rows=[0], slots=[0])
    assert torch.equal(logits, torch.zeros(1, V))


def test_a_slot_reset_after_its_list_grew_in_a_step() -> None:
    """The engine records tokens inside its step (inference mode), where the lists grow, and resets slots outside
    it (a preempted or resumed sequence comes back): the grown lists must still take the reset."""
    table = PenaltyTable(num_slots=2, vocab_size=V, device=torch.device("cpu"), capacity=2)
    table.reset(0, [], 1.0, 0.5)
    with torch.inference_mode():
        for token in range(5):  # more distinct tokens than the capacity: the list grows in inference mode
            table.record([0], torch.tensor([token]))
    table.reset(0, [1, 2, 3, 4, 9], 1.0, 0.5)
    logits = torch.zeros(1, V)
    table.apply_(logits, rows=[0], slots=[0])
    assert torch.equal(logits, dense_reference(torch.zeros(V), [1, 2, 3, 4, 9], 1.0, 0.5).unsqueeze(0))
