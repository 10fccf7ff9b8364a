"""The benchmark's arithmetic (scripts/bench/report.py): vLLM's metric definitions, ratios taken within a round, the
median round reported, and the targets judged on it. The numbers in the README come from these functions."""
from __future__ import annotations

import pytest

from scripts.bench.report import Req, add_ratios, labels, summarize, summary, table, targets


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


def row(round_: int, mode: str, tok_s: float, c: int = 32, sampling: str = "greedy", client=None) -> dict:
    """A measured row, as summarize() makes it, reduced to what the ratios read (tokens over one second)."""
    return dict(labels(mode, c, sampling, client), status="ok", round=round_, output_tok_s=tok_s,
                output_tokens=tok_s, duration_s=1.0)


def rows_of(round_: int, hf: float, engine: float, engine_process: float, service: float) -> list[dict]:
    return [row(round_, "hf_generate", hf, 8), row(round_, "engine", engine),
            row(round_, "engine_process", engine_process), row(round_, "service", service, client="aiohttp")]


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


def sampled_rows(round_: int, greedy: float, defaults: float, sdk_1: float, sdk_32: float) -> list[dict]:
    """engine_process greedy and defaults at 32, and the service's SDK t1.0 series at 1 and 32."""
    return [row(round_, "engine_process", greedy), row(round_, "engine_process", defaults, sampling="defaults"),
            row(round_, "service", sdk_1, c=1, sampling="t1.0", client="openai"),
            row(round_, "service", sdk_32, sampling="t1.0", client="openai")]


def test_x_greedy_is_over_the_greedy_row_of_the_same_mode_concurrency_and_round():
    results = (sampled_rows(1, 1000, 900, 100, 600) + sampled_rows(2, 500, 400, 100, 600)
               + sampled_rows(3, 1000, 700, 100, 600) + [row(1, "engine", 2000, sampling="defaults")])
    add_ratios(results)
    defaults = [r for r in results if r["mode"] == "engine_process" and r["sampling"] == "defaults"]
    assert [r["vs_greedy"] for r in defaults] == pytest.approx([0.9, 0.8, 0.7])   # each round's own greedy row
    assert all("vs_greedy" not in r for r in results if r["sampling"] == "greedy")
    assert results[-1]["vs_greedy"] is None                                          # engine has no greedy row
    reported = {(r["mode"], r["sampling"], r["concurrency"]): r for r in summary(results)}
    assert reported[("engine_process", "defaults", 32)]["output_tok_s"] == 700        # the median round (of 900, 400, 700)
    assert reported[("engine_process", "defaults", 32)]["vs_greedy"] == pytest.approx(0.8)  # the median ratio


def test_x_c1_is_over_the_same_series_at_concurrency_1_in_the_same_round():
    results = (sampled_rows(1, 1000, 900, 100, 600) + sampled_rows(2, 1000, 900, 200, 600)
               + [row(1, "service", 50, c=1, client="aiohttp")])   # another series at c=1: not the SDK's
    add_ratios(results)
    sdk_32 = [r for r in results if r.get("client") == "openai" and r["concurrency"] == 32]
    assert [r["vs_c1"] for r in sdk_32] == pytest.approx([6.0, 3.0])
    assert all("vs_c1" not in r for r in results if r["concurrency"] == 1)
    assert {r["vs_c1"] for r in results if r["mode"] == "engine_process"} == {None}  # no c=1 row of theirs
    # The SDK's t1.0 rows have no engine or greedy row of their workload to compare with.
    assert (sdk_32[0]["vs_engine_process"], sdk_32[0]["vs_greedy"]) == (None, None)


def test_the_sampling_targets_are_judged_on_their_rows_at_32():
    results = sampled_rows(1, 1000, 850, 100, 490) + [
        row(1, "engine_process", 690, sampling="t0.7-p0.9"), row(1, "engine_process", 700, sampling="penalties")]
    add_ratios(results)
    judged = {t["what"].split(" tokens/s")[0].split(":")[0]: t for t in targets(summary(results), device=_cpu())}
    assert (judged["engine_process defaults (temperature 0.3, top_p 1)"]["met"],
            judged["engine_process defaults (temperature 0.3, top_p 1)"]["value"]) == (True, pytest.approx(0.85))
    assert judged["engine_process t0.7-p0.9 (temperature 0.7, top_p 0.9)"]["met"] is False   # 0.69 < 0.7
    assert judged["engine_process penalties (frequency and presence 0.5)"]["met"] is True    # 0.7 >= 0.7
    sdk = judged["service, openai SDK streams, t1.0 (temperature 1.0)"]
    assert (sdk["value"], sdk["target"], sdk["met"]) == (pytest.approx(4.9), 5.0, False)
    assert not any(t["what"].startswith("service tokens/s") for t in judged.values())   # no greedy service row


def test_the_table_names_each_row_s_workload_and_client():
    reqs = [req(0.0, [0.1, 0.2], 2)]
    rows = [summarize("service", 32, reqs, 2, sampling="t1.0", client="openai"),
            dict(labels("engine_process", 32, "defaults"), status="error", error="boom")]
    lines = table(rows).splitlines()
    assert lines[0].split()[:3] == ["mode", "sampling", "conc"]
    assert lines[2].split()[:4] == ["service", "(openai)", "t1.0", "32"]
    assert lines[3].split() == ["engine_process", "defaults", "32", "error:", "boom"]


# --- the output controls (issue 15): json_schema and logprobs against the defaults row

def controls_rows(round_: int, defaults: float, json_schema: float, twin: float, logprobs: float,
                  mode: str = "engine_process", client=None) -> list[dict]:
    return [row(round_, mode, defaults, sampling="defaults", client=client),
            row(round_, mode, json_schema, sampling="json_schema", client=client),
            row(round_, mode, twin, sampling="defaults-json-len", client=client),
            row(round_, mode, logprobs, sampling="logprobs", client=client)]


def test_a_grammar_row_counts_the_tokens_it_produced():
    # Two json_schema requests that ended with "stop" after 3 and 5 tokens, of --output-len 128.
    reqs = [Req(start=0.0, times=[0.1, 0.2, 0.3], end=0.3, output_tokens=3, prompt_tokens=4, finish_reason="stop"),
            Req(start=0.0, times=[0.1, 0.5], end=0.5, output_tokens=5, prompt_tokens=4, finish_reason="stop")]
    r = summarize("engine", 2, reqs, target_output=128, sampling="json_schema")
    assert r["output_tokens"] == 8 and r["output_tok_s"] == pytest.approx(8 / 0.5)  # real tokens, not 2 x 128
    assert r["output_len_mean"] == pytest.approx(4.0)
    assert r["tpot_ms"]["mean"] == pytest.approx((200 / 2 + 400 / 4) / 2)  # each request over its own tokens - 1
    assert r["finish_reasons"] == {"stop": 2}
    line = table([r]).splitlines()[2].split()
    assert line[:5] == ["engine", "json_schema", "2", "2", "4.0"]           # no "(2 short)": shorter by design
    cut = summarize("engine", 1, [req(0.0, [0.1, 0.2], 2)], target_output=2, sampling="json_schema")
    assert "(1 cut)" in table([cut])                                          # --output-len ended its JSON


def test_x_defaults_is_over_the_defaults_row_of_the_same_series_concurrency_and_round():
    results = (controls_rows(1, 1000, 500, 800, 900) + controls_rows(2, 800, 480, 720, 600)
               + controls_rows(3, 1000, 300, 900, 870)
               + [row(1, "engine", 700, sampling="json_schema")]                 # engine: no defaults row
               + controls_rows(1, 600, 420, 540, 480, mode="service", client="aiohttp")
               + [row(1, "service", 900, sampling="defaults", client="openai")])  # another client's: not its
    add_ratios(results)
    ep = [r for r in results if r["mode"] == "engine_process"]
    assert [r["vs_defaults"] for r in ep if r["sampling"] == "json_schema"] == pytest.approx([0.5, 0.6, 0.3])
    assert [r["vs_defaults"] for r in ep if r["sampling"] == "logprobs"] == pytest.approx([0.9, 0.75, 0.87])
    assert [r["vs_defaults"] for r in ep if r["sampling"] == "defaults-json-len"] == pytest.approx([0.8, 0.9, 0.9])
    assert [r["vs_length_matched"] for r in ep if r["sampling"] == "json_schema"] == pytest.approx(
        [500 / 800, 480 / 720, 300 / 900])
    assert all("vs_defaults" not in r for r in results if r["sampling"] in ("defaults", "greedy"))
    assert next(r for r in results if r["mode"] == "engine")["vs_defaults"] is None
    service = {r["sampling"]: r for r in results if r.get("client") == "aiohttp"}
    assert service["json_schema"]["vs_defaults"] == pytest.approx(0.7)   # over aiohttp's defaults (600), not 900
    reported = {(r["mode"], r["sampling"]): r for r in summary(results)}
    json_row = reported[("engine_process", "json_schema")]
    assert json_row["output_tok_s"] == 480 and json_row["vs_defaults"] == pytest.approx(0.5)   # medians
    assert json_row["vs_length_matched"] == pytest.approx(500 / 800)
    assert "vs_length_matched" not in reported[("engine_process", "logprobs")]
    header = table([]).splitlines()[0]
    assert "x defaults" in header and "out len" in header


def test_the_issue_15_targets_are_judged_per_mode_on_the_rows_at_32():
    results = (controls_rows(1, 1000, 800, 900, 849) + controls_rows(1, 1000, 790, 850, 850, mode="engine")
               + controls_rows(1, 1000, 900, 950, 900, mode="service", client="aiohttp"))
    for r in results:
        r.update(output_len_mean=26.0 if r["sampling"] in ("json_schema", "defaults-json-len") else 128.0,
                 tpot_ms=dict(mean=9.0))
    add_ratios(results)
    judged = {t["what"].split(" (")[0]: t for t in targets(summary(results), device=_cpu())}
    assert {name: (t["value"], t["target"], t["met"]) for name, t in judged.items()
            if "defaults at 32" in t["what"]} == {
        "engine_process json_schema": (pytest.approx(0.8), 0.8, True),
        "engine_process logprobs": (pytest.approx(0.849), 0.85, False),
        "engine json_schema": (pytest.approx(0.79), 0.8, False),
        "engine logprobs": (pytest.approx(0.85), 0.85, True),
        "service json_schema": (pytest.approx(0.9), 0.8, True),
        "service logprobs": (pytest.approx(0.9), 0.85, True)}
    detail = judged["engine_process json_schema"]["detail"]
    assert "mean output 26.0 vs 128.0 tokens" in detail and "0.89x the length-matched defaults-json-len" in detail
    assert "length-matched" not in judged["engine_process logprobs"]["detail"]


def test_a_length_matched_twin_asks_each_request_for_its_source_s_length():
    from scripts.bench.workloads import max_tokens_of, output_lengths, workload_names

    assert output_lengths("defaults", 128, {}) == 128
    lengths = output_lengths("defaults-json-len", 128, {"json_schema": [26, 0, 31]})
    assert lengths == [26, 1, 31] and [max_tokens_of(lengths, i) for i in (0, 2, 3)] == [26, 31, 26]
    with pytest.raises(RuntimeError):
        output_lengths("defaults-json-len", 128, {})
    with pytest.raises(SystemExit):
        workload_names("defaults-json-len,json_schema", "--sampling")   # its source must run first


def test_the_controls_reach_the_engine_and_the_request_body():
    from scripts.bench.workloads import engine_fields, request_fields

    assert engine_fields("defaults") == dict(grammar=None, logprobs=None)
    assert engine_fields("logprobs") == dict(grammar=None, logprobs=5)
    grammar = engine_fields("json_schema")["grammar"]
    assert isinstance(grammar, str) and '"maxLength":16' in grammar.replace(" ", "")
    body = request_fields("json_schema")
    assert body["temperature"] == 0.3 and body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"]["required"] == ["name", "age", "tags"]
    assert request_fields("logprobs") == dict(request_fields("defaults"), logprobs=True, top_logprobs=5)
