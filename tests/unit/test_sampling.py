"""The batched sampler (workers/engine/sampling.py): its draws follow the softmax (with temperature and top_p)
by a chi-square test, top_p keeps exactly the nucleus' mass, its randomness is a pure function of (seed, output
position), so seeds reproduce, a row does not depend on its batch, and a resumed request draws what the
uninterrupted one drew. Every path of the nucleus (rejection, top-k pre-filter, sort) is checked alike."""
from __future__ import annotations

import math

import pytest
import torch

from workers.engine import cpu_kernels, sampling
from workers.engine.sampling import (
    SamplingParams,
    sample,
    sampling_tensors,
    seed_key,
    uniforms,
)

CPU = torch.device("cpu")


def draw(logits: torch.Tensor, params: list[SamplingParams], position: int | list[int]) -> torch.Tensor:
    """One token per row of logits for `params` at output `position` (the same for every row, or one each)."""
    temperature, top_p, _, _ = sampling_tensors(params, CPU)
    keys = torch.tensor([seed_key(p.seed) for p in params])
    positions = torch.tensor(position if isinstance(position, list) else [position] * len(params))
    return sample(logits.clone(), temperature, top_p, keys, positions)  # sample() consumes its logits


def draws_over_positions(logits_row: torch.Tensor, params: SamplingParams, rows: int, steps: int) -> torch.Tensor:
    """rows x steps draws of one distribution: `rows` seeds, each at positions 0..steps-1."""
    batch = logits_row.expand(rows, -1).contiguous()
    seeds = [SamplingParams(params.temperature, params.top_p, seed=params.seed + r) for r in range(rows)]
    return torch.cat([draw(batch, seeds, step) for step in range(steps)])


def chi_square(observed: torch.Tensor, expected_probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over the cells with an expected count >= 5 (the rest pooled), and its degrees of
    freedom."""
    n = observed.sum().item()
    expected = expected_probs.double() * n
    big = expected >= 5
    obs = torch.cat([observed[big].double(), observed[~big].double().sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    stat = (((obs - exp) ** 2)[keep] / exp[keep]).sum().item()
    return stat, int(keep.sum().item()) - 1


def chi_square_limit(dof: int) -> float:
    """About the 99.99% quantile of chi-square(dof) (Wilson-Hilferty), so a correct sampler fails ~1 in 10^4."""
    z = 3.72
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def nucleus_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The reference: softmax(logits / T) restricted to the nucleus by a full sort, renormalised."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p >= 1:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(0) - sorted_probs
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep[order[mass_before < top_p]] = True
    kept = probs * keep
    return kept / kept.sum()


@pytest.fixture(params=["compiled", "tensor ops"])
def kernels(request, monkeypatch):
    """The sampler on CPU: with its compiled kernels (cpu_kernels.py, numba), or in the tensor ops a GPU runs."""
    if request.param == "tensor ops":
        monkeypatch.setattr(cpu_kernels, "enabled", False)
    else:
        assert cpu_kernels.enabled, "numba is a dependency: the compiled kernels must be there"
    return request.param


@pytest.fixture(params=["rejection", "top-k", "sort"])
def nucleus_path(request, monkeypatch, kernels):
    """Run a test through each way the nucleus is sampled: rejection rounds (the common path), and, with one
    round only (so many rows fall through), the exact nucleus from the top-k pre-filter or from a sort."""
    if request.param != "rejection":
        monkeypatch.setattr(sampling, "NUCLEUS_ROUNDS", 1)
    if request.param == "sort":
        monkeypatch.setattr(sampling, "NUCLEUS_TOP_K", 4)
    return request.param


# --- the randomness

def test_uniforms_are_a_pure_function_of_seed_and_position() -> None:
    keys = torch.tensor([seed_key(s) for s in (0, 1, 2**63 - 1, -5)])
    positions = torch.tensor([0, 7, 7, 123])
    first = uniforms(keys, positions, 0)
    assert first.dtype == torch.float64 and ((first >= 0) & (first < 1)).all()
    assert torch.equal(first, uniforms(keys.clone(), positions.clone(), 0))
    assert not torch.equal(first, uniforms(keys, positions + 1, 0))
    assert not torch.equal(first, uniforms(keys, positions, 1))
    assert len(set(first.tolist())) == 4


def test_compiled_uniforms_have_the_same_bits(monkeypatch) -> None:
    keys = torch.tensor([seed_key(s) for s in range(-3, 300)])
    positions = torch.arange(len(keys)) * 97
    compiled = uniforms(keys, positions, 3)
    monkeypatch.setattr(cpu_kernels, "enabled", False)
    assert torch.equal(compiled, uniforms(keys, positions, 3))


def test_uniforms_are_uniform_across_positions_and_seeds() -> None:
    keys = torch.tensor([seed_key(s) for s in range(50)]).repeat_interleave(2000)
    positions = torch.arange(2000).repeat(50)
    u = uniforms(keys, positions, 0)
    counts = torch.histc(u.float(), bins=100, min=0.0, max=1.0)
    stat, dof = chi_square(counts, torch.full((100,), 0.01))
    assert stat < chi_square_limit(dof), stat
    # Neighbouring positions of one seed are not correlated.
    pairs = u.view(50, 2000)
    correlation = torch.corrcoef(torch.stack([pairs[:, :-1].flatten(), pairs[:, 1:].flatten()]))[0, 1]
    assert abs(correlation.item()) < 0.02


def test_seed_key_folds_all_64_bits() -> None:
    assert len({seed_key(s) for s in (0, 1, 2**32, 2**32 + 1, 2**63, -1)}) == 6
    assert seed_key(-1) == seed_key(2**64 - 1)  # a seed is a 64-bit pattern


# --- the distribution

def test_the_compiled_kernels_equal_the_tensor_ops(monkeypatch) -> None:
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(8)) * 3
    logits[1, ::3] = float("-inf")  # a grammar's mask
    temperature = torch.tensor([0.3, 0.7, 1.0, 0.05])
    compiled = sampling._probabilities_(logits.clone(), temperature)
    with monkeypatch.context() as patch:
        patch.setattr(cpu_kernels, "enabled", False)
        assert torch.equal(compiled, sampling._probabilities_(logits.clone(), temperature))  # the same bits


@pytest.mark.parametrize("kernels", ["compiled", "tensor ops"], indirect=True)
def test_probabilities_under_the_floor_are_zero(kernels: str) -> None:
    """Scaled logits under LOGIT_FLOOR (whose exp is not a normal float32, and slow on CPU) and -inf (masked)
    give probability 0 exactly; the others are exp((z - max) / T) with their bits."""
    logits = torch.tensor([[0.0, -10.0, -26.0, -30.0, float("-inf"), -1e30]])
    probs = sampling._probabilities_(logits.clone(), torch.tensor([0.3]))
    scaled = logits / 0.3
    assert torch.equal(probs[0, :3], scaled[0, :3].exp())  # -26 / 0.3 = -86.7: above the floor
    assert probs[0, 3:].eq(0).all()  # -30 / 0.3 = -100: under it


def test_the_compiled_first_draw_equals_the_tensor_ops() -> None:
    gen = torch.Generator().manual_seed(11)
    probs = torch.rand(64, 640, generator=gen) ** 4
    probs[::3, 100:300] = 0.0  # zero-probability tokens are never drawn
    u = torch.rand(64, generator=gen, dtype=torch.float64)
    u[:4] = torch.tensor([0.0, 1 - 2**-32, 0.5, 1e-12], dtype=torch.float64)  # the ends of [0, 1)
    tokens, block_cdf = cpu_kernels.first_draw(probs, u, 128)
    reference_cdf = sampling._block_cdf(probs)
    assert torch.allclose(block_cdf, reference_cdf, rtol=1e-6)
    assert torch.equal(tokens, sampling._inverse_cdf(probs, reference_cdf, u.unsqueeze(1)).squeeze(1))
    assert (probs.gather(1, tokens.unsqueeze(1)) > 0).all()


def test_the_compiled_nucleus_test_equals_the_tensor_ops(monkeypatch) -> None:
    probs = torch.rand(5, 3000, generator=torch.Generator().manual_seed(9))
    probs[2, :1000] = probs[2, 1000:2000]  # ties
    tokens = torch.randint(0, 3000, (5, 3), generator=torch.Generator().manual_seed(10))
    compiled = sampling._mass_above(probs, tokens)
    monkeypatch.setattr(cpu_kernels, "enabled", False)
    tensor_ops = sampling._mass_above(probs, tokens)
    reference = torch.stack([(probs[r] * (probs[r] > probs[r, tokens[r]].unsqueeze(1))).double().sum(1)
                             for r in range(5)])
    assert torch.allclose(compiled, reference, rtol=1e-5) and torch.allclose(tensor_ops, reference, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.3])
def test_draws_follow_the_softmax(kernels: str, temperature: float) -> None:
    # 384 tokens: three blocks of the two-level CDF, and a spread of probabilities from large to tiny.
    logits = torch.linspace(3.0, -3.0, 384)[torch.randperm(384, generator=torch.Generator().manual_seed(0))]
    tokens = draws_over_positions(logits, SamplingParams(temperature=temperature, seed=100), rows=200, steps=100)
    stat, dof = chi_square(torch.bincount(tokens, minlength=384), nucleus_probs(logits, temperature, 1.0))
    assert stat < chi_square_limit(dof), (temperature, stat, dof)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 0.9), (0.7, 0.5), (1.0, 0.2)])
def test_draws_follow_the_nucleus(nucleus_path: str, temperature: float, top_p: float) -> None:
    logits = torch.randn(256, generator=torch.Generator().manual_seed(1)) * 1.5
    tokens = draws_over_positions(logits, SamplingParams(temperature=temperature, top_p=top_p, seed=7),
                                  rows=200, steps=60)
    expected = nucleus_probs(logits, temperature, top_p)
    observed = torch.bincount(tokens, minlength=256)
    assert observed[expected == 0].sum() == 0, "a token outside the nucleus was drawn"
    stat, dof = chi_square(observed, expected)
    assert stat < chi_square_limit(dof), (nucleus_path, stat, dof)


def test_top_p_keeps_the_smallest_set_reaching_its_mass(nucleus_path: str) -> None:
    # Sorted: 0.30 (id 1), 0.25 (id 3) -> 0.55 >= 0.5, so the nucleus is {1, 3}, renormalised.
    probs = torch.tensor([0.15, 0.30, 0.10, 0.25, 0.20])
    tokens = draws_over_positions(probs.log(), SamplingParams(temperature=1.0, top_p=0.5, seed=3), 100, 40)
    counts = torch.bincount(tokens, minlength=5)
    assert counts[[0, 2, 4]].sum() == 0
    assert abs(counts[1].item() / tokens.numel() - 0.30 / 0.55) < 0.04
    # Token 0 alone has mass 0.5 == top_p: the nucleus is just {0}.
    exact = torch.tensor([0.5, 0.25, 0.25]).log()
    assert set(draws_over_positions(exact, SamplingParams(1.0, top_p=0.5, seed=1), 20, 20).tolist()) == {0}


def test_top_p_one_keeps_the_whole_vocabulary() -> None:
    # A dominant token: a float32 cumulative sum reaches 1.0 long before the tail; the tail is still drawn.
    logits = torch.full((4000,), -9.0)
    logits[0] = 0.0  # each tail token ~1.2e-4 of the top one; the tail holds ~1/3 of the mass
    tokens = draws_over_positions(logits, SamplingParams(temperature=1.0, top_p=1.0), 50, 40)
    tail_share = (tokens != 0).float().mean().item()
    expected = 1 - torch.softmax(logits.double(), 0)[0].item()
    assert abs(tail_share - expected) < 0.05


def test_ties_share_one_fate(nucleus_path: str) -> None:
    # Four equal tokens: none is strictly more likely than another, so top_p 0.3 keeps all four.
    logits = torch.tensor([1.0, 1.0, 1.0, 1.0, -5.0])
    tokens = draws_over_positions(logits, SamplingParams(temperature=1.0, top_p=0.3), 50, 20)
    assert set(tokens.tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0, seed=3), SamplingParams(temperature=0.8,
                                                                                            top_p=0.0)])
def test_greedy_and_top_p_zero_take_the_most_likely_token(params: SamplingParams) -> None:
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(2))
    assert draw(logits, [params] * 6, 5).tolist() == logits.argmax(dim=-1).tolist()


# --- independence from everything but (seed, position, logits)

def test_same_seed_same_tokens_different_seed_differs() -> None:
    logits = torch.zeros(1, 500)  # uniform: every token is the draw's alone
    def run(seed: int) -> list[int]:
        return [int(draw(logits, [SamplingParams(temperature=1.0, seed=seed)], step)) for step in range(40)]
    assert run(123) == run(123)
    assert run(123) != run(124)
    assert len(set(run(7))) > 30


def test_a_row_alone_equals_the_row_among_31_others() -> None:
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(32, 32000, generator=gen)
    params = [SamplingParams(temperature=[0.0, 0.3, 0.7, 1.0][i % 4], top_p=[1.0, 0.9, 0.5, 0.95][i % 3], seed=i)
              for i in range(32)]
    positions = torch.randint(0, 1000, (32,), generator=gen).tolist()
    together = draw(logits, params, positions)
    alone = [int(draw(logits[i:i + 1], [params[i]], [positions[i]])) for i in range(32)]
    assert together.tolist() == alone


def test_a_resumed_request_draws_what_the_uncut_one_drew() -> None:
    """Drawing position n needs only (seed, n) and the logits: an attempt that starts at position 20 (a resume)
    draws from there exactly what the first attempt drew, whatever came before it."""
    logits = torch.randn(40, 2000, generator=torch.Generator().manual_seed(5))  # position n's logits: row n
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=42)
    uncut = [int(draw(logits[n:n + 1], [params], n)) for n in range(40)]
    resumed = [int(draw(logits[n:n + 1], [params], n)) for n in range(20, 40)]
    assert resumed == uncut[20:]


# --- the parameters

def test_sampling_tensors_and_param_validation() -> None:
    params = [SamplingParams(), SamplingParams(temperature=0.0, top_p=0.5, frequency_penalty=1.0)]
    temperature, top_p, freq, pres = sampling_tensors(params, CPU)
    assert temperature.tolist() == pytest.approx([0.3, 0.0]) and top_p.tolist() == [1.0, 0.5]
    assert freq.tolist() == [0.0, 1.0] and pres.tolist() == [0.0, 0.0]
    for bad in ({"temperature": -0.1}, {"top_p": 1.5}, {"temperature": math.nan}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def static_draw(logits: torch.Tensor, temperature, top_p, keys, positions) -> torch.Tensor:
    """sample_static, then finish_exact for the rows it left EXACT: what a CUDA-graph step does."""
    tokens = sampling.sample_static(logits, temperature, top_p, keys, positions)
    exact = (tokens == sampling.EXACT).nonzero().squeeze(1)
    if exact.numel():
        tokens[exact] = sampling.finish_exact(logits[exact], temperature[exact], top_p[exact], keys[exact],
                                              positions[exact])
    return tokens


@pytest.mark.parametrize("vocab", [32000, 1000])
def test_the_graph_safe_draw_equals_sample(vocab, kernels):
    """Issue 14: the sampler inside the decode graph draws exactly sample()'s tokens, for greedy rows, rows
    without a nucleus, nuclei found by rejection and the exact-nucleus rows (tiny top_p on flat rows), mixed
    in one batch, and leaves the logits as they were."""
    gen = torch.Generator().manual_seed(5)
    rows = 96
    logits = torch.randn(rows, vocab, generator=gen) * torch.rand(rows, 1, generator=gen) * 4
    temperature = torch.tensor([0.0, 0.3, 1.0, 0.7] * (rows // 4))
    top_p = torch.tensor([1.0, 1.0, 0.9, 0.5, 0.02, 0.0] * (rows // 6))
    keys = torch.tensor([seed_key(s) for s in range(rows)])
    positions = torch.arange(rows) * 7
    before = logits.clone()
    static = sampling.sample_static(logits, temperature, top_p, keys, positions)
    assert torch.equal(logits, before)
    assert (static == sampling.EXACT).sum() > 3  # the exact-nucleus path is exercised
    assert torch.equal(static_draw(logits, temperature, top_p, keys, positions),
                       sample(logits.clone(), temperature, top_p, keys, positions))


def test_no_draw_is_pinned_at_zero(kernels):
    """The docs' default seed is 0, and the hash had a fixed point at 0: seed 0's first draw was u = 0 exactly,
    so every default request's first token was the lowest token id with any probability (<unk>). No draw of
    the first positions of small seeds may be 0 (a legit u = 0 has probability 2**-32)."""
    keys = torch.tensor([seed_key(s) for s in range(8)]).repeat_interleave(64)
    positions = torch.arange(64).repeat(8)
    for draw in range(sampling.NUCLEUS_ROUNDS + 1):
        assert (uniforms(keys, positions, draw) > 0).all()
