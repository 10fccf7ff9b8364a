"""The GPU check's rules (scripts/gpu_check.py), which judge what a GPU run shows: where our engine's greedy tokens part
from generate()'s, the parting passes only as a tie within one bf16 step on both sides; every graph bucket must be
captured on CUDA (not applicable on a CPU); a sweep stopped by the budget is incomplete, a failed row fails it."""
from __future__ import annotations

import math
import subprocess
import time

import pytest
import torch

from scripts.gpu_check import (BF16_EPS, FAIL, INCOMPLETE, NA, PASS, compare_greedy, first_difference,
                               judge_graphs, judge_sweep, markdown, parting_is_a_tie, within_bf16_step)
from scripts.stack import descendants


def test_bf16_eps_is_torchs():
    assert BF16_EPS == torch.finfo(torch.bfloat16).eps


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([4], [5]) == 0
    assert first_difference([1, 2], [1, 2, 3]) == 2  # a length difference counts


@pytest.mark.parametrize("x", [0.578125, 1.0, 1.5, 3.25, 8.0, 100.0, -2.0, -17.5])
def test_adjacent_bf16_logits_are_within_one_step(x):
    y = float(torch.nextafter(torch.tensor(x, dtype=torch.bfloat16), torch.tensor(math.inf, dtype=torch.bfloat16)))
    assert y != x
    assert within_bf16_step(x, y) and within_bf16_step(y, x)
    assert within_bf16_step(x, x)


@pytest.mark.parametrize("x", [1.0, 8.0, 0.5])
def test_two_steps_at_the_bottom_of_a_binade_are_not(x):
    two_up = x + 2 * x * BF16_EPS  # the bf16 spacing in [x, 2x) is x * eps
    assert float(torch.tensor(two_up, dtype=torch.bfloat16)) == two_up
    assert not within_bf16_step(x, two_up)


def test_non_finite_logits_are_never_a_tie():
    assert not within_bf16_step(math.nan, 1.0)
    assert not within_bf16_step(math.inf, math.inf)
    assert not within_bf16_step(-math.inf, 1.0)
    assert within_bf16_step(0.0, 0.0)


def test_a_tie_needs_both_sides():
    tie, gap = (0.640625, 0.640625), (1.0, 1.25)
    assert parting_is_a_tie(tie, tie)
    assert not parting_is_a_tie(tie, gap)
    assert not parting_is_a_tie(gap, tie)


def test_equal_tokens_pass_without_looking_at_logits():
    def never(k):
        raise AssertionError("no logits needed")
    assert compare_greedy([5, 6, 7], [5, 6, 7], never) == dict(status=PASS, equal=3)


def test_parting_at_a_tie_passes_and_says_where():
    asked = []

    def logits_at(k):
        asked.append(k)
        return (0.58203125, 0.578125), (0.578125, 0.58203125)  # one bf16 step apart, each side its own way
    verdict = compare_greedy([5, 6, 7, 8], [5, 6, 9, 1], logits_at)
    assert asked == [2]
    assert verdict["status"] == PASS and verdict["equal"] == 2 and verdict["tokens"] == [7, 9]
    assert verdict["generate_logits"] == [0.58203125, 0.578125]


def test_parting_beyond_a_bf16_step_fails():
    verdict = compare_greedy([5, 6], [5, 9], lambda k: ((2.0, 1.5), (1.5, 2.0)))
    assert verdict["status"] == FAIL and verdict["equal"] == 1 and "not within one bf16 step" in verdict["why"]


def test_a_parting_whose_logits_cannot_be_computed_fails():
    def broken(k):
        raise RuntimeError("runner API changed")
    verdict = compare_greedy([5, 6], [5, 9], broken)
    assert verdict["status"] == FAIL and "runner API changed" in verdict["why"]


def test_a_short_output_fails():
    assert compare_greedy([5, 6, 7], [5, 6], lambda k: ((1.0, 1.0), (1.0, 1.0)))["status"] == FAIL


def test_graphs_on_cuda_need_every_bucket():
    full = {"decode": {"expected": 45, "captured": 45}, "piecewise": {"expected": 264, "captured": 264}}
    assert judge_graphs(full, cuda=True)[0] == PASS
    short = {"decode": {"expected": 45, "captured": 44}, "piecewise": {"expected": 264, "captured": 264}}
    status, detail = judge_graphs(short, cuda=True)
    assert status == FAIL and "decode 44/45" in detail
    assert judge_graphs({"decode": {"expected": 0, "captured": 0}}, cuda=True)[0] == FAIL  # nothing to capture?
    assert judge_graphs({}, cuda=True)[0] == FAIL
    status, detail = judge_graphs(None, cuda=True)
    assert status == FAIL and "unavailable" in detail


def test_graphs_on_a_cpu_are_not_applicable():
    assert judge_graphs(None, cuda=False) == (NA, "not applicable (no CUDA)")
    status, detail = judge_graphs({"decode": {"expected": 20, "captured": 0}}, cuda=False)
    assert status == NA and "decode 0/20" in detail


def row(mode="engine", c=1, status="ok", **extra):
    base = dict(mode=mode, concurrency=c, sampling="greedy", status=status)
    if status == "ok":
        stats = dict(mean=1.0, p50=1.0, p99=2.0, n=1)
        base.update(completed=8, failed=0, num_requests=8, output_tok_s=100.0, request_s=1.0, ttft_ms=stats,
                    tpot_ms=stats, itl_ms=stats, short_requests=0)
    return dict(base, **extra)


def test_sweep_verdicts():
    done = dict(returncode=0, stopped_by_budget=False, seconds=10.0)
    assert judge_sweep(done, [row(), row(c=8)])[0] == PASS
    status, detail = judge_sweep(done, [row(), row(mode="service", status="error", error="no Redis")])
    assert status == FAIL and "service greedy c=1: error: no Redis" in detail
    stopped = dict(done, stopped_by_budget=True, returncode=-2)
    assert judge_sweep(stopped, [row()])[0] == INCOMPLETE
    assert judge_sweep(dict(done, returncode=1), [])[0] == FAIL


def test_markdown_has_the_checks_and_the_sweep():
    report = dict(started="now", seconds=12.0, budget_s=480.0, verdict=PASS,
                  environment=dict(device="cpu", device_name="a CPU", versions=dict(
                      torch="2", cuda=None, transformers="5", bitsandbytes="0.50", triton="3", python="3.11")),
                  model=dict(model="tiny7b", weights="bf16"),
                  checks=[dict(name="greedy", status=PASS, detail="8/8")],
                  sweep=dict(config=dict(model="tiny7b", input_len=64, output_len=32, waves=1, num_prompts=8)))
    text = markdown(report, [row(), row(mode="service", client="aiohttp", c=8, status="error", error="boom")])
    assert "| greedy | pass | 8/8 |" in text
    assert "| engine | greedy | 1 | 8 | 100.0 | 1.00 | 1.0 / 2.0 | 1.0 / 2.0 | 1.0 / 2.0 |" in text
    assert "| service (aiohttp) | greedy | 8 | error: boom |" in text


def test_descendants_finds_grandchildren():
    parent = subprocess.Popen(["bash", "-c", "sleep 30 & sleep 30 & wait"])
    try:
        deadline = time.monotonic() + 5
        while len(descendants(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        below = descendants(parent.pid)
        assert len(below) == 2
    finally:
        for pid in descendants(parent.pid):
            subprocess.run(["kill", str(pid)])
        parent.wait(timeout=10)
