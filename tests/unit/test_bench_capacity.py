"""The capacity model's arithmetic (scripts/bench/capacity.py): the fit of two rows' Redis CPU to per job and per
token, and what it says of shards. The README's capacity numbers come from these functions."""
from __future__ import annotations

import pytest

from scripts.bench.capacity import fit, plan, shard_capacity


def row(jobs: int, tokens_per_job: int, per_job_us: float, per_token_us: float) -> dict:
    tokens = jobs * tokens_per_job
    return dict(jobs=jobs, tokens=tokens, cpu_s=(jobs * per_job_us + tokens * per_token_us) / 1e6)


def test_fit_recovers_both_parts():
    model = fit(row(128, 128, 600.0, 3.3), row(128, 8, 600.0, 3.3))
    assert model["per_job_us"] == pytest.approx(600.0)
    assert model["per_token_us"] == pytest.approx(3.3)


def test_round_trips_are_split_the_same_way():
    long, short = row(64, 128, 600.0, 3.3), row(64, 8, 600.0, 3.3)
    long["requests"], short["requests"] = 64 * 15 + 64 * 128 // 20, 64 * 15 + 64 * 8 // 20
    model = fit(long, short)
    assert model["requests_per_job"] == pytest.approx(15.0, abs=0.1)
    assert model["requests_per_token"] == pytest.approx(0.05, abs=0.002)


def test_no_fit_without_two_lengths_or_from_noise():
    assert fit(row(64, 128, 600, 3), row(128, 128, 600, 3)) is None           # same tokens per job
    long, short = row(128, 128, 600, 3), row(128, 8, 600, 3)
    short["cpu_s"] = long["cpu_s"] * 1.5                                        # short costs more: not physical
    assert fit(long, short) is None


def test_plan_turns_costs_into_shards():
    # 600 us per job of 200 tokens = 3 us/token, plus 2 us/token: 5 us per token, 200,000 tok/s per core.
    assert shard_capacity(600, 2, 200) == pytest.approx(200_000)
    p = plan(600, 2, 200, worker_tok_s=8000, gpus=40, headroom=0.5)
    assert p["workers_per_shard"] == pytest.approx(12.5)                        # 100,000 usable / 8,000
    assert p["shards"] == 4                                                     # 320,000 / 100,000, rounded up
    assert plan(600, 2, 200, worker_tok_s=8000, gpus=1)["shards"] == 1
