from __future__ import annotations

import math

import pytest
import torch

from workers.engine.sampling import (
    SamplingParams,
    _top_p_mask,
    apply_penalties,
    make_generator,
    sample,
    sampling_tensors,
)

CPU = torch.device("cpu")


def _draw(logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator]) -> torch.Tensor:
    temperature, top_p, _, _ = sampling_tensors(params, CPU)
    return sample(logits, temperature, top_p, gens)


def _gens(params: list[SamplingParams]) -> list[torch.Generator]:
    return [make_generator(p.seed, CPU) for p in params]


def test_sampling_tensors_shapes_and_values() -> None:
    params = [SamplingParams(), SamplingParams(temperature=0.0, top_p=0.5, frequency_penalty=1.0, presence_penalty=-0.5)]
    temperature, top_p, freq, pres = sampling_tensors(params, CPU)
    for t in (temperature, top_p, freq, pres):
        assert t.shape == (2,) and t.dtype == torch.float32
    assert temperature.tolist() == pytest.approx([0.3, 0.0])
    assert top_p.tolist() == [1.0, 0.5]
    assert freq.tolist() == [0.0, 1.0]
    assert pres.tolist() == [0.0, -0.5]


@pytest.mark.parametrize("kwargs", [{"temperature": -0.1}, {"top_p": -0.1}, {"top_p": 1.5}, {"temperature": math.nan}])
def test_params_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_greedy_is_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 100)
    params = [SamplingParams(temperature=0.0, top_p=p, seed=i) for i, p in enumerate([1.0, 0.5, 0.1, 0.9, 1.0])]
    out = _draw(logits, params, _gens(params))
    assert out.dtype == torch.int64 and out.shape == (5,)
    assert out.tolist() == logits.argmax(dim=-1).tolist()


def _sequence(seed: int, steps: int = 30) -> list[int]:
    logits = torch.zeros(1, 50)  # uniform: every draw is pure noise
    params = [SamplingParams(temperature=1.0, seed=seed)]
    gens = _gens(params)
    return [int(_draw(logits, params, gens)[0]) for _ in range(steps)]


def test_same_seed_same_sequence_different_seed_differs() -> None:
    assert _sequence(123) == _sequence(123)
    assert _sequence(123) != _sequence(124)
    assert len(set(_sequence(7))) > 5  # it actually varies from step to step


def test_row_independent_of_batch_composition() -> None:
    torch.manual_seed(1)
    vocab = 64
    row_logits = torch.randn(4, vocab) * 2
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, seed=11),
        SamplingParams(temperature=0.0, seed=12),  # greedy row in the middle
        SamplingParams(temperature=1.3, top_p=1.0, seed=13),
        SamplingParams(temperature=0.5, top_p=0.3, seed=14),
    ]
    steps = 25
    # Each row alone.
    alone = []
    for i, p in enumerate(params):
        gen = _gens([p])
        alone.append([int(_draw(row_logits[i : i + 1], [p], gen)[0]) for _ in range(steps)])
    # All rows together, and a reordered sub-batch.
    gens = _gens(params)
    together = [_draw(row_logits, params, gens).tolist() for _ in range(steps)]
    sub = [2, 0]
    sub_params = [params[i] for i in sub]
    sub_gens = _gens(sub_params)
    subset = [_draw(row_logits[sub], sub_params, sub_gens).tolist() for _ in range(steps)]
    for i in range(4):
        assert [step[i] for step in together] == alone[i]
    for j, i in enumerate(sub):
        assert [step[j] for step in subset] == alone[i]


@pytest.mark.parametrize("top_p", [0.0, 1e-6])
def test_tiny_top_p_only_top_token(top_p) -> None:
    logits = torch.tensor([[1.0, 1.5, 0.9, 1.4, -2.0]])  # top token is id 1
    params = [SamplingParams(temperature=2.0, top_p=top_p, seed=5)]
    gens = _gens(params)
    assert {int(_draw(logits, params, gens)[0]) for _ in range(300)} == {1}


def test_top_p_half_stays_in_nucleus() -> None:
    probs = torch.tensor([0.15, 0.30, 0.10, 0.25, 0.20])
    # Sorted: 0.30 (id 1), 0.25 (id 3) -> mass 0.55 >= 0.5, so nucleus = {1, 3}.
    n_rows = 500
    logits = probs.log().expand(n_rows, -1).contiguous()
    params = [SamplingParams(temperature=1.0, top_p=0.5, seed=s) for s in range(n_rows)]
    gens = _gens(params)
    draws = torch.cat([_draw(logits, params, gens) for _ in range(4)])
    counts = torch.bincount(draws, minlength=5)
    assert counts[[0, 2, 4]].sum() == 0
    # Renormalised inside the nucleus: P(1) = 0.30 / 0.55 ~ 0.545.
    assert abs(counts[1].item() / draws.numel() - 0.30 / 0.55) < 0.05


def test_top_p_boundary_is_smallest_set() -> None:
    # Token 0 alone already has mass 0.5 == top_p, so the nucleus is just {0}.
    logits = torch.tensor([[0.5, 0.25, 0.25]]).log()
    assert torch.softmax(logits, dim=-1).tolist() == [[0.5, 0.25, 0.25]]  # exact in float32
    params = [SamplingParams(temperature=1.0, top_p=0.5, seed=3)]
    gens = _gens(params)
    assert {int(_draw(logits, params, gens)[0]) for _ in range(200)} == {0}


def test_top_p_one_keeps_whole_vocab_despite_rounding() -> None:
    # A dominant token makes the float32 cumsum hit 1.0 before the tiny tail ends.
    logits = torch.full((2, 1000), -30.0)
    logits[:, 0] = 0.0
    probs = torch.softmax(logits, dim=-1)
    mask = _top_p_mask(probs, torch.tensor([1.0, 0.9]))
    assert mask[0].all()
    assert mask[1].tolist() == [True] + [False] * 999


def test_empirical_distribution_matches_softmax() -> None:
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n_rows, steps = 1000, 20
    for temp in (1.0, 0.5):
        expected = torch.softmax(base / temp, dim=0) * n_rows * steps
        params = [SamplingParams(temperature=temp, seed=1000 + s) for s in range(n_rows)]
        gens = _gens(params)
        logits = base.expand(n_rows, -1).contiguous()
        draws = torch.cat([_draw(logits, params, gens) for _ in range(steps)])
        observed = torch.bincount(draws, minlength=6).float()
        chi2 = ((observed - expected) ** 2 / expected).sum().item()
        # 5 degrees of freedom: the 99.9% quantile is ~20.5; a wrong temperature gives thousands.
        assert chi2 < 30.0, (temp, observed.tolist(), expected.tolist())


def test_penalties_exact_additive_formula() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, -0.5, 0.0, 1.0]])
    counts = torch.tensor([[0, 1, 3, 0], [2, 0, 0, 5]])
    freq = torch.tensor([0.5, -1.0])
    pres = torch.tensor([0.25, 2.0])
    before = logits.clone()
    out = apply_penalties(logits, counts, freq, pres)
    expected = torch.tensor(
        [
            [1.0, 2.0 - 0.5 - 0.25, 3.0 - 1.5 - 0.25, 4.0],
            [0.5 + 2.0 - 2.0, -0.5, 0.0, 1.0 + 5.0 - 2.0],
        ]
    )
    assert out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.equal(logits, before)  # input not modified


def test_presence_is_flat_frequency_scales_with_count() -> None:
    logits = torch.zeros(1, 3)
    counts = torch.tensor([[0, 1, 5]])
    pres_only = apply_penalties(logits, counts, torch.tensor([0.0]), torch.tensor([1.0]))
    freq_only = apply_penalties(logits, counts, torch.tensor([1.0]), torch.tensor([0.0]))
    assert pres_only.tolist() == [[0.0, -1.0, -1.0]]
    assert freq_only.tolist() == [[0.0, -1.0, -5.0]]


def test_zero_penalties_are_identity() -> None:
    torch.manual_seed(2)
    logits = torch.randn(3, 10)
    counts = torch.randint(0, 4, (3, 10))
    out = apply_penalties(logits, counts, torch.zeros(3), torch.zeros(3))
    assert torch.equal(out, logits)
