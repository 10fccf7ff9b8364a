"""What the benchmark measures and prints: one request's timeline (Req), a level's metrics by vLLM's definitions
(percentiles, TTFT, TPOT, ITL, throughputs), the ratio columns taken within a round, the median round per row,
the targets, the table and the JSON file."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from scripts.bench.workloads import BASELINES, GRAMMAR_WORKLOADS, GREEDY, LENGTH_OF

if TYPE_CHECKING:
    import torch


def say(*parts) -> None:
    print(*parts, flush=True)


# --- one request's timeline, and the statistics over a level

@dataclass
class Req:
    start: float                                      # perf_counter when the request was sent / submitted
    times: list[float] = field(default_factory=list)  # arrival of each output carrying tokens
    end: Optional[float] = None                       # the request's stream ended
    output_tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: Optional[str] = None
    error: Optional[str] = None


def percentile(values: list[float], q: float) -> Optional[float]:
    """numpy's default (linear interpolation between closest ranks)."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stats_ms(values_s: list[float]) -> dict:
    ms = [v * 1000 for v in values_s]
    if not ms:
        return dict(mean=None, p50=None, p99=None, n=0)
    return dict(mean=sum(ms) / len(ms), p50=percentile(ms, 50), p99=percentile(ms, 99), n=len(ms))


def labels(mode: str, concurrency: int, sampling: str = GREEDY, client: Optional[str] = None) -> dict:
    """What names a row: its series (mode, the service's client, the sampling workload) and its concurrency."""
    return dict(mode=mode, concurrency=concurrency, sampling=sampling, **({"client": client} if client else {}))


def series(row: dict) -> tuple:
    """The line of the table a row belongs to, whatever its concurrency."""
    return row["mode"], row.get("client"), row["sampling"]


def key(row: dict) -> tuple:
    """A row's place in the table: its series and concurrency (one row per round)."""
    return series(row) + (row["concurrency"],)


def failure(status: str, error: str, **row_labels) -> dict:
    """A row in place of numbers (a mode that could not run, a level that failed)."""
    return dict(labels(**row_labels), status=status, error=error)


def summarize(mode: str, concurrency: int, reqs: list[Req], target_output: int, extra: Optional[dict] = None,
              sampling: str = GREEDY, client: Optional[str] = None) -> dict:
    """A level's row. Every count is of the tokens produced (a grammar's row ends before target_output): tokens/s is
    their total over the duration, output_len_mean their mean per request, TPOT each request's own (its tokens - 1)
    and ITL the gaps between its outputs, so both stay per token (per output) whatever a request's length."""
    done = [r for r in reqs if r.error is None and r.end is not None]
    failed = [r for r in reqs if r not in done]
    row = dict(labels(mode, concurrency, sampling, client), status="ok", num_requests=len(reqs),
               completed=len(done), failed=len(failed))
    if failed:
        row["errors"] = sorted({r.error or "no end" for r in failed})[:5]
    if not done:
        row.update(status="error", error=(row.get("errors") or ["no request completed"])[0])
        return row
    start = min(r.start for r in reqs)
    end = max(r.end for r in done)
    duration = max(end - start, 1e-9)
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    ttft = [r.times[0] - r.start for r in done if r.times]
    tpot = [(r.end - r.times[0]) / (r.output_tokens - 1) for r in done if r.times and r.output_tokens > 1]
    itl = [b - a for r in done for a, b in zip(r.times, r.times[1:])]
    e2el = [r.end - r.start for r in done]
    reasons: dict[str, int] = {}
    for r in done:
        reasons[str(r.finish_reason)] = reasons.get(str(r.finish_reason), 0) + 1
    row.update(duration_s=duration, input_tokens=in_tokens, output_tokens=out_tokens,
               output_tok_s=out_tokens / duration, request_s=len(done) / duration,
               total_tok_s=(in_tokens + out_tokens) / duration,
               ttft_ms=stats_ms(ttft), tpot_ms=stats_ms(tpot), itl_ms=stats_ms(itl), e2el_ms=stats_ms(e2el),
               output_len_mean=out_tokens / len(done), finish_reasons=reasons,
               short_requests=sum(1 for r in done if r.output_tokens < target_output))
    row.update(extra or {})
    return row


ENGINE_MODES = ("engine", "engine_process")


def add_ratios(results: list[dict]) -> dict:
    """Within each round, a row's tokens/s over another row's in the same round:
      vs_hf_generate                every row: over hf_generate's (all its requests in the round)
      vs_engine, vs_engine_process  service rows: over that engine mode's row, same workload and concurrency
      vs_greedy                     sampled rows: over their mode's (and client's) greedy row, same concurrency
      vs_defaults                   the output controls (json_schema, logprobs: workloads.BASELINES): over their
                                    mode's (and client's) defaults row, same concurrency (unconstrained sampling)
      vs_length_matched             json_schema rows: over their series' defaults-json-len row (workloads.LENGTH_OF:
                                    unconstrained, each request as long as json_schema's), same concurrency
      vs_c1                         rows above concurrency 1: over their series' row at 1 (the gain from batching)
    Returns the baseline (all rounds' hf_generate requests)."""
    ok = [r for r in results if r.get("status") == "ok"]

    def tok_s(rows):
        seconds = sum(r["duration_s"] for r in rows)
        return sum(r["output_tokens"] for r in rows) / seconds if seconds else None

    overall = tok_s([r for r in ok if r["mode"] == "hf_generate"])
    for round_ in {r.get("round", 1) for r in ok}:
        rows = [r for r in ok if r.get("round", 1) == round_]
        baseline = tok_s([r for r in rows if r["mode"] == "hf_generate"]) or overall
        by = {key(r): r for r in rows}

        def over(row: dict, other_key: tuple) -> Optional[float]:
            other = by.get(other_key)
            return row["output_tok_s"] / other["output_tok_s"] if other else None

        for r in rows:
            mode, client, sampling, c = key(r)
            r["vs_hf_generate"] = r["output_tok_s"] / baseline if baseline else None
            if mode == "service":
                for engine in ENGINE_MODES:
                    r[f"vs_{engine}"] = over(r, (engine, None, sampling, c))
            if sampling != GREEDY:
                r["vs_greedy"] = over(r, (mode, client, GREEDY, c))
            if sampling in BASELINES:
                r["vs_defaults"] = over(r, (mode, client, BASELINES[sampling], c))
            twin = TWIN_OF.get(sampling)
            if twin is not None:
                r["vs_length_matched"] = over(r, (mode, client, twin, c))
            if c != 1:
                r["vs_c1"] = over(r, (mode, client, sampling, 1))
    return dict(hf_generate_tok_s=overall, note="all hf_generate requests of this run: tokens / seconds")


TWIN_OF = {source: twin for twin, source in LENGTH_OF.items()}  # json_schema -> defaults-json-len
RATIOS = ("vs_hf_generate", "vs_engine", "vs_engine_process", "vs_greedy", "vs_defaults", "vs_c1")  # the columns
MORE_RATIOS = ("vs_length_matched",)  # in the JSON and the targets' detail, not the table


def summary(results: list[dict]) -> list[dict]:
    """One row per (series, concurrency): the round with the median tokens/s, with each ratio's median over
    the rounds and the spread of tokens/s. Failed rows pass through."""
    out, groups = [], {}
    for r in results:
        groups.setdefault(key(r), []).append(r)
    for rows in groups.values():
        ok = sorted((r for r in rows if r.get("status") == "ok"), key=lambda r: r["output_tok_s"])
        if not ok:
            out.append(rows[-1])
            continue
        row = dict(ok[(len(ok) - 1) // 2], rounds=len(ok),
                   output_tok_s_range=[ok[0]["output_tok_s"], ok[-1]["output_tok_s"]])
        for ratio in RATIOS + MORE_RATIOS:
            if ratio in RATIOS or any(ratio in r for r in ok):
                row[ratio] = percentile([r[ratio] for r in ok if r.get(ratio) is not None], 50)
        out.append(row)
    return out


# The targets (the CPU ones: this machine), each judged on one reported row at 32 concurrent:
# (what, the row: its mode and, where they matter, workload and client, the ratio, its least value).
TARGETS = (
    ("engine tokens/s vs hf_generate at 32 concurrent", dict(mode="engine"), "vs_hf_generate", 5.0),
    ("service tokens/s vs engine at 32 concurrent", dict(mode="service"), "vs_engine", 0.85),
    ("service tokens/s vs engine_process at 32 concurrent (not the target's measure: the cost of HTTP, Redis and "
     "Celery alone)", dict(mode="service"), "vs_engine_process", 0.85),
    ("engine_process defaults (temperature 0.3, top_p 1) tokens/s vs greedy at 32 concurrent",
     dict(mode="engine_process", sampling="defaults"), "vs_greedy", 0.85),
    ("engine_process t0.7-p0.9 (temperature 0.7, top_p 0.9) tokens/s vs greedy at 32 concurrent",
     dict(mode="engine_process", sampling="t0.7-p0.9"), "vs_greedy", 0.7),
    ("engine_process penalties (frequency and presence 0.5) tokens/s vs greedy at 32 concurrent",
     dict(mode="engine_process", sampling="penalties"), "vs_greedy", 0.7),
    ("service, openai SDK streams, t1.0 (temperature 1.0): tokens/s at 32 concurrent vs 1",
     dict(mode="service", client="openai", sampling="t1.0"), "vs_c1", 5.0),
) + tuple(  # issue 15: the output controls' cost over unconstrained sampling (the defaults row), in every mode
    (f"{mode} {name} ({what}) tokens/s vs defaults at 32 concurrent", dict(mode=mode, sampling=name), "vs_defaults",
     least)
    for mode in ("engine", "engine_process", "service")
    for name, what, least in (("json_schema", "the docs' defaults + response_format json_schema", 0.8),
                              ("logprobs", "the docs' defaults + logprobs, top_logprobs 5", 0.85)))


def target_row(rows: list[dict], mode: str, sampling: str = GREEDY, client: Optional[str] = None,
               concurrency: int = 32) -> Optional[dict]:
    """The reported row a target reads; client None: whichever client ran that workload."""
    for r in rows:
        if (r.get("status") == "ok" and (r["mode"], r["sampling"], r["concurrency"]) == (mode, sampling, concurrency)
                and client in (None, r.get("client"))):
            return r
    return None


def targets(rows: list[dict], device: torch.device) -> list[dict]:
    out = []
    for what, where, ratio, least in TARGETS:
        row = target_row(rows, **where)
        if row and row.get(ratio) is not None:
            target = dict(what=what, value=row[ratio], target=least, met=row[ratio] >= least,
                          applies=device.type == "cpu")
            if ratio == "vs_defaults":
                target["detail"] = baseline_detail(row, target_row(rows, row["mode"], BASELINES[row["sampling"]],
                                                                   row.get("client"), row["concurrency"]))
            out.append(target)
    return out


def baseline_detail(row: dict, base: Optional[dict]) -> Optional[str]:
    """What an x defaults ratio compares, beyond tokens/s: the mean output length (a grammar's row is shorter, so
    its prefill weighs more per output token), TPOT (the decode time per token a stream sees), and for json_schema
    its ratio to the length-matched unconstrained row (the grammar's own cost)."""
    if base is None:
        return None
    detail = (f"mean output {fmt(row.get('output_len_mean'))} vs {fmt(base.get('output_len_mean'))} tokens; TPOT "
              f"mean {fmt(row['tpot_ms']['mean'], 2)} vs {fmt(base['tpot_ms']['mean'], 2)} ms")
    if row.get("vs_length_matched") is not None:
        detail += (f"; {row['vs_length_matched']:.2f}x the length-matched {TWIN_OF[row['sampling']]} row "
                   "(the grammar's own cost)")
    return detail


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 10000 else f"{value:.0f}"
    return str(value)


def mode_label(row: dict) -> str:
    """The mode, with the client for the service's rows: `service (openai)`."""
    return row["mode"] + (f" ({row['client']})" if row.get("client") else "")


def table(results: list[dict]) -> str:
    head = ["mode", "sampling", "conc", "reqs", "out len", "out tok/s", "req/s", "TTFT ms mean/p50/p99",
            "TPOT ms mean/p50/p99", "ITL ms mean/p50/p99", "Redis us/tok", "x hf_gen", "x engine", "x engine_process", "x greedy",
            "x defaults", "x c=1", "rounds: tok/s min-max"]
    rows: list[list[str]] = []
    for r in results:
        names = [mode_label(r), r["sampling"], str(r["concurrency"])]
        if r.get("status") != "ok":  # one message in place of the numbers
            rows.append(names + [f"{r.get('status')}: {str(r.get('error'))[:160]}"])
            continue
        triple = lambda m: "/".join(fmt(r[m][k]) for k in ("mean", "p50", "p99"))  # noqa: E731
        reqs = f"{r['completed']}" + (f" ({r['failed']} failed)" if r["failed"] else "")
        if r["sampling"] in GRAMMAR_WORKLOADS:  # shorter by design: those its --output-len cut off instead
            cut = (r.get("finish_reasons") or {}).get("length")
            reqs += f" ({cut} cut)" if cut else ""
        elif r.get("short_requests") and r["sampling"] not in LENGTH_OF:  # (a twin is as short as its source)
            reqs += f" ({r['short_requests']} short)"
        rows.append(names + [reqs, fmt(r.get("output_len_mean")), fmt(r["output_tok_s"]), fmt(r["request_s"], 2),
                             triple("ttft_ms"), triple("tpot_ms"), triple("itl_ms"),
                             fmt(r.get("redis_cpu_us_per_token"))]
                    + [fmt(r.get(ratio), 2) for ratio in RATIOS] + [spread(r)])
    # A failed row's names count for the widths, not its message.
    widths = [max([len(h)] + [len(row[i]) for row in rows if len(row) == len(head) or i < len(row) - 1])
              for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    for row in rows:  # a failed row's message (its fourth cell) runs on past the columns
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def spread(row: dict) -> str:
    low, high = row.get("output_tok_s_range") or (None, None)
    return f"{row.get('rounds', 1)}: {fmt(low)}-{fmt(high)}" if low is not None else "1"


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(path)
