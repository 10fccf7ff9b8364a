"""The benchmark's arithmetic (scripts/bench.py): vLLM's metric definitions, ratios taken within a round, the
median round reported, and the targets judged on it. The numbers in the README come from these functions."""
from __future__ import annotations

import pytest

from scripts.bench import Req, add_ratios, summarize, summary, targets


def req(start: float, times: list[float], tokens: int, prompt: int = 4) -> Req:
    return Req(start=start, times=times, end=times[-1], output_tokens=tokens, prompt_tokens=prompt,
               finish_reason="length")


def test_summarize_follows_vllm_definitions():
    # Two requests: 0 -> first output at 0.1, 3 outputs of one token each; 0.5 -> 0.7, 0.9 (2 tokens each).
    reqs = [req(0.0, [0.1, 0.2, 0.4], 3), req(0.5, [0.7, 0.9], 4)]
    row = summarize("engine", 2, reqs, target_output=3)
    assert row["duration_s"] == pytest.approx(0.9)                      # first start to last end
    assert row["output_tok_s"] == pytest.approx(7 / 0.9)
    assert row["request_s"] == pytest.approx(2 / 0.9)
    assert row["ttft_ms"]["mean"] == pytest.approx((100 + 200) / 2)     # first output - start
    assert row["tpot_ms"]["p50"] == pytest.approx((150 + 200 / 3) / 2)  # (end - first) / (tokens - 1)
    assert (row["itl_ms"]["n"], row["itl_ms"]["mean"]) == (3, pytest.approx((100 + 200 + 200) / 3))  # per output
    assert row["short_requests"] == 0 and row["failed"] == 0


def test_a_failed_request_is_counted_not_timed():
    bad = Req(start=0.0, error="boom")
    row = summarize("service", 2, [req(0.0, [0.1, 0.2], 2), bad], target_output=2)
    assert (row["completed"], row["failed"], row["errors"]) == (1, 1, ["boom"])
    assert row["output_tok_s"] == pytest.approx(2 / 0.2)


def rows_of(round_: int, hf: float, engine: float, engine_process: float, service: float) -> list[dict]:
    def row(mode, tok_s, c=32):
        return dict(mode=mode, concurrency=c, status="ok", round=round_, output_tok_s=tok_s,
                    output_tokens=tok_s, duration_s=1.0)
    return [row("hf_generate", hf, 8), row("engine", engine), row("engine_process", engine_process),
            row("service", service)]


def test_ratios_are_taken_within_each_round_and_the_median_round_is_reported():
    results = (rows_of(1, 100, 1000, 2000, 900) + rows_of(2, 50, 500, 1000, 600)
               + rows_of(3, 100, 1000, 2000, 800))
    add_ratios(results)
    service = [r for r in results if r["mode"] == "service"]
    assert [r["vs_engine"] for r in service] == pytest.approx([0.9, 1.2, 0.8])
    assert [r["vs_engine_process"] for r in service] == pytest.approx([0.45, 0.6, 0.4])
    assert [r["vs_hf_generate"] for r in service] == pytest.approx([9, 12, 8])  # each round's own baseline
    by_mode = {r["mode"]: r for r in summary(results)}
    assert by_mode["service"]["output_tok_s"] == 800                    # the median round by tokens/s
    assert by_mode["service"]["output_tok_s_range"] == [600, 900]
    assert by_mode["service"]["vs_engine"] == pytest.approx(0.9)        # the median of the rounds' ratios
    assert by_mode["service"]["rounds"] == 3


def test_targets_are_judged_on_the_reported_rows():
    results = rows_of(1, 100, 1000, 2000, 840)
    add_ratios(results)
    judged = {t["what"].split(" at ")[0]: t for t in targets(summary(results), device=_cpu())}
    assert judged["engine tokens/s vs hf_generate"]["met"] is True       # 10x >= 5x
    assert judged["service tokens/s vs engine"]["met"] is False          # 0.84 < 0.85
    assert judged["service tokens/s vs engine_process"]["value"] == pytest.approx(0.42)


def _cpu():
    import torch
    return torch.device("cpu")
