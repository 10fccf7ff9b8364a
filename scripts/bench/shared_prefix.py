"""`--shared-prefix`: what the prefix cache is for. N requests (64) share a long prefix (1,024 tokens: a batch's
system prompt) and each ends with a suffix of its own (32 tokens), all sent at once, each asking for 32 new tokens;
the engine runs them with the prefix cache off, then on (a fresh engine each time, so the cache starts cold and the
first request computes the prefix), greedy and with the docs' defaults, --rounds times interleaved.

x no cache is a row's requests/s over the same workload's row without the cache in the same round (target >= 3x),
and TTFT p50 / no cache its TTFT p50 over that row's (target <= 1/3)."""
from __future__ import annotations

import dataclasses
import time

import torch

from scripts.bench.engine_runners import bench_engine, engine_closed_loop, engine_config
from scripts.bench.models import build_model, free_memory
from scripts.bench.report import fmt, percentile, say, summarize, write_json
from scripts.bench.workloads import PROMPT_SEED

WORKLOADS = ("greedy", "defaults")
TARGET_REQUEST_S = 3.0       # at least this many times the requests/s without the cache
TARGET_TTFT_P50 = 1 / 3      # at most this share of the TTFT p50 without the cache


def shared_prefix_prompts(count: int, prefix_len: int, suffix_len: int) -> list[list[int]]:
    """`count` prompts: one prefix of prefix_len random token ids, then suffix_len of each prompt's own."""
    generator = torch.Generator().manual_seed(PROMPT_SEED)
    prefix = torch.randint(100, 32000, (prefix_len,), generator=generator).tolist()
    suffixes = torch.randint(100, 32000, (count, suffix_len), generator=generator).tolist()
    return [prefix + suffix for suffix in suffixes]


def run_once(model, device, args, prompts, caching: bool, sampling: str) -> dict:
    config = dataclasses.replace(engine_config(args, len(prompts)), enable_prefix_caching=caching)
    engine = bench_engine(model, device, config)
    try:
        engine.warmup()
        reqs = engine_closed_loop(engine, len(prompts), len(prompts), prompts, args.output_len, args.request_timeout,
                                  sampling)
        stats = engine.stats()
    finally:
        engine.shutdown()
    row = summarize("engine", len(prompts), reqs, args.output_len, dict(engine_stats=stats), sampling=sampling)
    row["prefix_cache"] = "on" if caching else "off"
    row["prefix_cache_hit_rate"] = (stats["prefix_cache_hits"] / stats["prefix_cache_queries"]
                                    if stats["prefix_cache_queries"] else 0.0)
    return row


def add_ratios(rows: list[dict]) -> None:
    """Each cached row over the uncached row of its workload and round."""
    base = {(r["round"], r["sampling"]): r for r in rows if r["prefix_cache"] == "off" and r["status"] == "ok"}
    for r in rows:
        other = base.get((r["round"], r["sampling"]))
        if r["prefix_cache"] == "on" and r["status"] == "ok" and other:
            r["vs_no_cache_request_s"] = r["request_s"] / other["request_s"]
            r["ttft_p50_vs_no_cache"] = r["ttft_ms"]["p50"] / other["ttft_ms"]["p50"]


def median_rows(rows: list[dict]) -> list[dict]:
    """Per (workload, cache): the round with the median requests/s, with the median ratios."""
    out = []
    for sampling in WORKLOADS:
        for cache in ("off", "on"):
            group = sorted((r for r in rows if (r["sampling"], r["prefix_cache"]) == (sampling, cache)
                            and r["status"] == "ok"), key=lambda r: r["request_s"])
            if not group:
                continue
            row = dict(group[(len(group) - 1) // 2], rounds=len(group))
            for ratio in ("vs_no_cache_request_s", "ttft_p50_vs_no_cache"):
                values = [r[ratio] for r in group if r.get(ratio) is not None]
                row[ratio] = percentile(values, 50) if values else None
            out.append(row)
    return out


def table(rows: list[dict]) -> str:
    head = "| sampling | prefix cache | req/s | out tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | ITL p50 / p99 ms " \
           "| hit rate | x no cache (req/s) | TTFT p50 / no cache |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        pair = lambda m: f"{fmt(r[m]['p50'])} / {fmt(r[m]['p99'])}"  # noqa: E731
        lines.append(f"| {r['sampling']} | {r['prefix_cache']} | {fmt(r['request_s'], 2)} | {fmt(r['output_tok_s'])} "
                     f"| {pair('ttft_ms')} | {pair('tpot_ms')} | {pair('itl_ms')} "
                     f"| {r['prefix_cache_hit_rate']:.2f} | {fmt(r.get('vs_no_cache_request_s'), 2)} "
                     f"| {fmt(r.get('ttft_p50_vs_no_cache'), 2)} |")
    return "\n".join(lines)


def run_shared_prefix(args, device, out) -> int:
    model, info = build_model(args.model, device)
    prompts = shared_prefix_prompts(args.num_prompts, args.prefix_len, args.suffix_len)
    meta = dict(started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), scenario="shared-prefix", model=info,
                config=dict(num_prompts=args.num_prompts, prefix_len=args.prefix_len, suffix_len=args.suffix_len,
                            output_len=args.output_len, concurrency=args.num_prompts, rounds=args.rounds,
                            max_model_len=args.max_model_len, workloads=WORKLOADS,
                            note="a fresh engine per row: the cache starts cold"))
    say(f"bench --shared-prefix: model {info['model']} on {device}; {args.num_prompts} requests at once, a "
        f"{args.prefix_len}-token shared prefix + {args.suffix_len} tokens each, {args.output_len} new tokens")
    rows: list[dict] = []
    for round_ in range(1, args.rounds + 1):
        for sampling in WORKLOADS:
            for caching in (False, True):
                row = run_once(model, device, args, prompts, caching, sampling)
                row["round"] = round_
                rows.append(row)
                if row["status"] == "ok":
                    say(f"  round {round_} {sampling:<8} cache {row['prefix_cache']:<3} {row['request_s']:.2f} req/s  "
                        f"TTFT p50 {fmt(row['ttft_ms']['p50'])} ms  hit rate {row['prefix_cache_hit_rate']:.2f}")
                else:
                    say(f"  round {round_} {sampling} cache {row['prefix_cache']}: {row.get('error')}")
                free_memory(device)
    add_ratios(rows)
    summary = median_rows(rows)
    targets = [dict(what=f"{r['sampling']}: requests/s with the prefix cache vs without", value=r["vs_no_cache_request_s"],
                    target=f">= {TARGET_REQUEST_S}", met=r["vs_no_cache_request_s"] >= TARGET_REQUEST_S)
               for r in summary if r.get("vs_no_cache_request_s") is not None]
    targets += [dict(what=f"{r['sampling']}: TTFT p50 with the prefix cache / without", value=r["ttft_p50_vs_no_cache"],
                     target=f"<= {TARGET_TTFT_P50:.2f}", met=r["ttft_p50_vs_no_cache"] <= TARGET_TTFT_P50)
                for r in summary if r.get("ttft_p50_vs_no_cache") is not None]
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json(out, dict(meta, summary=summary, targets=targets, results=rows))
    say("")
    say(table(summary))
    for t in targets:
        say(f"target: {t['what']}: {t['value']:.2f} (target {t['target']}): {'met' if t['met'] else 'NOT met'}")
    say(f"json: {out}")
    return 0
