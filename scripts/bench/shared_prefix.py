"""`--shared-prefix`: what the prefix cache is for. N requests (64) share a long prefix (1,024 tokens: a batch's
system prompt) and each ends with a suffix of its own (32 tokens), all sent at once, each asking for 32 new tokens,
greedy and with the docs' defaults, with the prefix cache off and on:

  engine   token ids into the engine in this process; a fresh engine per row, so the cache starts cold and the
           first request computes the prefix; rounds interleave cache off and on.
  service  the whole service (scripts/stack.py: gunicorn API, Redis/Celery, one worker, PREFIX_CACHING=false, then
           true) with c streamed chat requests: a system message of about the prefix's length, new for each row
           (so again the first request of a row computes it), and a user message of about the suffix's length.

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
MODES = ("engine", "service")
TARGET_REQUEST_S = 3.0       # at least this many times the requests/s without the cache
TARGET_TTFT_P50 = 1 / 3      # at most this share of the TTFT p50 without the cache


def shared_prefix_prompts(count: int, prefix_len: int, suffix_len: int) -> list[list[int]]:
    """`count` prompts: one prefix of prefix_len random token ids, then suffix_len of each prompt's own."""
    generator = torch.Generator().manual_seed(PROMPT_SEED)
    prefix = torch.randint(100, 32000, (prefix_len,), generator=generator).tolist()
    suffixes = torch.randint(100, 32000, (count, suffix_len), generator=generator).tolist()
    return [prefix + suffix for suffix in suffixes]


def run_engine_row(model, device, args, prompts, caching: bool, sampling: str) -> dict:
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


def run_service_rows(args, caching: bool, record) -> None:
    """One stack with the prefix cache on or off, every round and workload on it (`record(row, round)`)."""
    import asyncio
    import tempfile
    from pathlib import Path

    from scripts.bench.service_runners import find_redis, service_closed_loop
    from scripts.bench.workloads import text_prompts
    from scripts.stack import DEFAULT_REDIS_URL, Stack, stack_env

    n = args.num_prompts
    env = stack_env(redis_url=find_redis(DEFAULT_REDIS_URL), max_model_len=args.max_model_len, MAX_NUM_SEQS=str(n),
                    WORKER_CONCURRENCY=str(n), PREFIX_CACHING=str(caching).lower())
    stack = Stack(env, Path(tempfile.mkdtemp(prefix="bench-shared-prefix-")))
    rows = len(WORKLOADS) * args.rounds
    # Texts of about the prefix's length, one per row (+ one to warm up with), and the users' own questions.
    systems = text_prompts(rows + 1, args.prefix_len)
    questions = text_prompts(n, args.suffix_len)
    stack.start_worker(concurrency=n, extra_env={"MAX_NUM_SEQS": str(n), "TORCH_THREADS": "1"})
    stack.start_api(processes=2)
    with stack.serving(timeout=args.service_start_timeout):
        def closed_loop(system: str, sampling: str, count: int, out_len: int):
            return asyncio.run(service_closed_loop(stack.base_url, questions, count, count, out_len,
                                                   args.request_timeout, args.service_client, sampling,
                                                   system=system))
        closed_loop(systems[-1], "greedy", 4, 4)  # untimed: the first requests' one-time costs
        counts = prefix_counts(stack.base_url)
        for index, (round_, sampling) in enumerate((r, w) for r in range(1, args.rounds + 1) for w in WORKLOADS):
            reqs = closed_loop(systems[index], sampling, n, args.output_len)
            row = summarize("service", n, reqs, args.output_len, dict(client=args.service_client), sampling=sampling)
            before, counts = counts, prefix_counts(stack.base_url)
            queries = counts[1] - before[1]
            row.update(prefix_cache="on" if caching else "off",
                       prefix_cache_hit_rate=(counts[0] - before[0]) / queries if queries > 0 else None)
            record(row, round_)


def prefix_counts(base_url: str) -> tuple[float, float]:
    """The worker's prefix-cache (hits, queries) from /metrics, after its next heartbeat (every 2 s)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    time.sleep(2.5)
    text = httpx.get(base_url + "/metrics", timeout=10).text
    totals = {"llmq_prefix_cache_hits_total": 0.0, "llmq_prefix_cache_queries_total": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals["llmq_prefix_cache_hits_total"], totals["llmq_prefix_cache_queries_total"]


def add_ratios(rows: list[dict]) -> None:
    """Each cached row over the uncached row of its mode, workload and round."""
    base = {(r["mode"], r["round"], r["sampling"]): r for r in rows
            if r["prefix_cache"] == "off" and r["status"] == "ok"}
    for r in rows:
        other = base.get((r["mode"], r["round"], r["sampling"]))
        if r["prefix_cache"] == "on" and r["status"] == "ok" and other:
            r["vs_no_cache_request_s"] = r["request_s"] / other["request_s"]
            r["ttft_p50_vs_no_cache"] = r["ttft_ms"]["p50"] / other["ttft_ms"]["p50"]


def median_rows(rows: list[dict]) -> list[dict]:
    """Per (mode, workload, cache): the round with the median requests/s, with the median ratios."""
    out = []
    for mode, sampling, cache in ((m, w, c) for m in MODES for w in WORKLOADS for c in ("off", "on")):
        group = sorted((r for r in rows if (r["mode"], r["sampling"], r["prefix_cache"]) == (mode, sampling, cache)
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
    head = "| mode | sampling | prefix cache | req/s | out tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | ITL p50 / p99 ms " \
           "| hit rate | x no cache (req/s) | TTFT p50 / no cache |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        pair = lambda m: f"{fmt(r[m]['p50'])} / {fmt(r[m]['p99'])}"  # noqa: E731
        hit_rate = fmt(r.get("prefix_cache_hit_rate"), 2)
        lines.append(f"| {r['mode']} | {r['sampling']} | {r['prefix_cache']} | {fmt(r['request_s'], 2)} | {fmt(r['output_tok_s'])} "
                     f"| {pair('ttft_ms')} | {pair('tpot_ms')} | {pair('itl_ms')} "
                     f"| {hit_rate} | {fmt(r.get('vs_no_cache_request_s'), 2)} "
                     f"| {fmt(r.get('ttft_p50_vs_no_cache'), 2)} |")
    return "\n".join(lines)


def run_shared_prefix(args, device, out) -> int:
    modes = [m for m in args.modes if m in MODES] if args.modes_given else list(MODES)
    prompts = shared_prefix_prompts(args.num_prompts, args.prefix_len, args.suffix_len)
    meta = dict(started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), scenario="shared-prefix", modes=modes,
                config=dict(num_prompts=args.num_prompts, prefix_len=args.prefix_len, suffix_len=args.suffix_len,
                            output_len=args.output_len, concurrency=args.num_prompts, rounds=args.rounds,
                            max_model_len=args.max_model_len, workloads=WORKLOADS, service_client=args.service_client,
                            note="each row starts with its prefix not in the cache (engine: a fresh engine; service: "
                                 "a new system text)"))
    say(f"bench --shared-prefix: {', '.join(modes)} on {device}; {args.num_prompts} requests at once, a "
        f"{args.prefix_len}-token shared prefix + {args.suffix_len} tokens each, {args.output_len} new tokens")
    rows: list[dict] = []

    def record(row: dict, round_: int) -> None:
        row["round"] = round_
        rows.append(row)
        name = f"  {row['mode']:<7} round {round_} {row['sampling']:<8} cache {row['prefix_cache']:<3}"
        if row["status"] == "ok":
            say(f"{name} {row['request_s']:.2f} req/s  TTFT p50 {fmt(row['ttft_ms']['p50'])} ms  "
                f"hit rate {fmt(row.get('prefix_cache_hit_rate'), 2)}")
        else:
            say(f"{name} {row['status']}: {row.get('error')}")
        write_json(out, dict(meta, results=rows))

    if "engine" in modes:
        model, meta["model"] = build_model(args.model, device)
        for round_ in range(1, args.rounds + 1):
            for sampling in WORKLOADS:
                for caching in (False, True):
                    record(run_engine_row(model, device, args, prompts, caching, sampling), round_)
                    free_memory(device)
        del model
    if "service" in modes:
        if device.type != "cpu":
            say("service: the tiny-random worker runs on the CPU only; skipped")
        else:
            for caching in (False, True):
                run_service_rows(args, caching, record)
    add_ratios(rows)
    summary = median_rows(rows)
    targets = [dict(what=f"{r['mode']} {r['sampling']}: requests/s with the prefix cache vs without",
                    value=r["vs_no_cache_request_s"], target=f">= {TARGET_REQUEST_S}",
                    met=r["vs_no_cache_request_s"] >= TARGET_REQUEST_S)
               for r in summary if r.get("vs_no_cache_request_s") is not None]
    targets += [dict(what=f"{r['mode']} {r['sampling']}: TTFT p50 with the prefix cache / without",
                     value=r["ttft_p50_vs_no_cache"], target=f"<= {TARGET_TTFT_P50:.2f}",
                     met=r["ttft_p50_vs_no_cache"] <= TARGET_TTFT_P50)
                for r in summary if r.get("ttft_p50_vs_no_cache") is not None]
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json(out, dict(meta, summary=summary, targets=targets, results=rows))
    say("")
    say(table(summary))
    for t in targets:
        say(f"target: {t['what']}: {t['value']:.2f} (target {t['target']}): {'met' if t['met'] else 'NOT met'}")
    say(f"json: {out}")
    return 0
