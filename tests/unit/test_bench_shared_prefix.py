"""The --shared-prefix scenario's arithmetic (scripts/bench/shared_prefix.py): its prompts share exactly the prefix,
each cached row is compared with the uncached row of its own workload and round, and the median round is shown;
and a small run of the real scenario on the tiny model, which must find the prefix in the cache."""
from __future__ import annotations

import json

import pytest

from scripts.bench.__main__ import main
from scripts.bench.shared_prefix import add_ratios, median_rows, shared_prefix_prompts, table


def test_prompts_share_the_prefix_and_nothing_else():
    prompts = shared_prefix_prompts(4, 20, 5)
    assert all(len(p) == 25 and p[:20] == prompts[0][:20] for p in prompts)
    assert len({tuple(p[20:]) for p in prompts}) == 4


def row(round_, sampling, cache, request_s, ttft_p50):
    return dict(mode="engine", round=round_, sampling=sampling, prefix_cache=cache, status="ok", request_s=request_s,
                output_tok_s=request_s * 32, ttft_ms=dict(p50=ttft_p50, p99=ttft_p50), tpot_ms=dict(p50=1, p99=1),
                itl_ms=dict(p50=1, p99=1), prefix_cache_hit_rate=0.9 if cache == "on" else 0.0)


def test_ratios_are_taken_within_a_round_and_the_median_round_is_shown():
    rows = [row(1, "greedy", "off", 10.0, 900), row(1, "greedy", "on", 40.0, 90),
            row(2, "greedy", "off", 20.0, 600), row(2, "greedy", "on", 40.0, 300),
            row(3, "greedy", "off", 10.0, 1000), row(3, "greedy", "on", 35.0, 100)]
    add_ratios(rows)
    assert [r.get("vs_no_cache_request_s") for r in rows if r["prefix_cache"] == "on"] == [4.0, 2.0, 3.5]
    summary = median_rows(rows)
    on = next(r for r in summary if r["prefix_cache"] == "on")
    assert on["vs_no_cache_request_s"] == 3.5 and on["ttft_p50_vs_no_cache"] == pytest.approx(0.1)
    assert "| engine | greedy | on | 40.00 |" in table(summary)


def test_a_small_run_finds_the_prefix_in_the_cache(tmp_path, one_torch_thread):
    out = tmp_path / "shared.json"
    assert main(["--shared-prefix", "--modes", "engine", "--device", "cpu", "--num-prompts", "6", "--prefix-len", "64",
                 "--suffix-len", "8", "--output-len", "4", "--rounds", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {(r["sampling"], r["prefix_cache"]): r for r in report["summary"]}
    assert set(rows) == {(s, c) for s in ("greedy", "defaults") for c in ("off", "on")}
    assert all(r["completed"] == 6 for r in rows.values())
    assert rows["greedy", "off"]["prefix_cache_hit_rate"] == 0
    # The first request computes the 64-token prefix (4 blocks); the 5 others find it.
    assert rows["greedy", "on"]["engine_stats"]["prefix_cache_hits"] == 5 * 64
    assert len(report["targets"]) == 4
