"""Fairness, measured on one stack in one run (real worker, API under gunicorn, the official SDK):

--scenario keys (default): one key's latency while another floods the queue. Key B sends one streamed
request a second for a minute with no other load, then key A submits 500 background jobs at once and B
does the same again; B's TTFT p50/p99 both times, and all of A's jobs polled until they complete. The
target: B's p50 under A's flood at most 3x its p50 alone (fair dispatch: jobs/fair_queue.py).
--fair-reserve 0 keeps the round-robin but lets A's jobs hold every slot (B then waits for one of them to end);
no setting restores the single FIFO of before fair dispatch: measure that on the code before it.

    python -m scripts.fairness [--a-jobs 500] [--a-max-tokens 384] [--duration 60] [--max-num-seqs 16]

--scenario batch: interactive latency while a batch runs: TTFT p50/p99 of interactive streams with no batch,
then while a large batch is in progress; and the API's memory while it drives the batch.

    python -m scripts.fairness --scenario batch [--batch-lines 2000] [--requests 40] [--clients 4]
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from openai import AsyncOpenAI, OpenAI

from app.auth import owner_of
from scripts.stack import Stack, stack_env, wait_until

MODEL = "mistralai/mistral-7b-instruct-v0.2"
KEY = "fairness-key"
KEY_A, KEY_B = "fairness-key-a", "fairness-key-b"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms_summary(values: list[float]) -> dict:
    """Seconds as milliseconds: how many, p50, p99, mean."""
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50": round(1000 * percentile(values, 0.5), 1),
            "p99": round(1000 * percentile(values, 0.99), 1), "mean": round(1000 * statistics.mean(values), 1)}


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (gunicorn's master and its workers)."""
    pids = [pid] + [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                                   text=True).stdout.split()]
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total / 1024


async def streamed_ttft(client: AsyncOpenAI, question: int, max_tokens: int) -> float:
    """Seconds from sending one streamed request to its first content delta (its whole time if none came)."""
    started = time.perf_counter()
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"Interactive question {question}"}],
        max_tokens=max_tokens, stream=True)
    first = None
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
    return first if first is not None else time.perf_counter() - started


async def interactive_ttfts(base_url: str, requests: int, clients: int, max_tokens: int) -> list[float]:
    ttfts: list[float] = []
    queue = list(range(requests))

    async with AsyncOpenAI(base_url=base_url + "/v1", api_key=KEY, max_retries=0, timeout=300) as client:
        async def worker():
            while queue:
                ttfts.append(await streamed_ttft(client, queue.pop(), max_tokens))

        await asyncio.gather(*(worker() for _ in range(clients)))
    return ttfts


def batch_scenario(args) -> None:
    log_dir = Path(tempfile.mkdtemp(prefix="fairness-"))
    stack = Stack(stack_env(api_keys=(KEY,), MAX_NUM_SEQS=str(args.max_num_seqs)), log_dir)
    stack.start_worker(concurrency=args.max_num_seqs)
    stack.start_api()
    with stack.serving():
        base = stack.base_url
        asyncio.run(interactive_ttfts(base, 4, 2, 4))  # warm-up
        alone = asyncio.run(interactive_ttfts(base, args.requests, args.clients, args.max_tokens))

        client = OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=3, timeout=300)
        lines = "\n".join(json.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/chat/completions",
                                      "body": {"model": MODEL, "max_tokens": args.batch_max_tokens,
                                               "messages": [{"role": "user", "content": f"Batch item {i}"}]}})
                          for i in range(args.batch_lines))
        rss_before = rss_mib(stack.processes["api"].pid)
        upload = client.files.create(file=("batch.jsonl", io.BytesIO(lines.encode())), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 20, 300,
                   "the batch to be under way", interval=0.5)
        during = asyncio.run(interactive_ttfts(base, args.requests, args.clients, args.max_tokens))
        progress = client.batches.retrieve(batch.id).request_counts
        rss_peak = rss_mib(stack.processes["api"].pid)
        started = time.time()
        done = wait_until(lambda: (b := client.batches.retrieve(batch.id)).status in
                          ("completed", "failed", "cancelled", "expired") and b, 3600, "the batch", interval=2)
        rss_peak = max(rss_peak, rss_mib(stack.processes["api"].pid))
        report = {
            "interactive_requests": args.requests, "clients": args.clients, "max_tokens": args.max_tokens,
            "batch_lines": args.batch_lines, "batch_status": done.status,
            "batch_counts": done.request_counts.model_dump(),
            "batch_completed_during_measurement": progress.completed,
            "batch_seconds_after_measurement": round(time.time() - started, 1),
            "ttft_no_batch_ms": ms_summary(alone), "ttft_with_batch_ms": ms_summary(during),
            "api_rss_mib": {"before_batch": round(rss_before, 1), "peak": round(rss_peak, 1)},
        }
        print(json.dumps(report, indent=2))
        a, d = report["ttft_no_batch_ms"], report["ttft_with_batch_ms"]
        print(f"\n| | TTFT p50 (ms) | TTFT p99 (ms) |\n|---|---|---|\n| no batch | {a['p50']} | {a['p99']} |\n"
              f"| {args.batch_lines}-line batch running | {d['p50']} | {d['p99']} |")


# --- --scenario keys: one key's latency while another floods the queue
async def b_requests(base_url: str, duration_s: float, rate: float, max_tokens: int, backlog) -> list[dict]:
    """Key B: one streamed request every 1/rate seconds for duration_s (sent on schedule, whether or not the
    previous one is done); each one's TTFT, and A's unfinished jobs when it was sent (`backlog()`)."""
    results: list[dict] = []
    async with AsyncOpenAI(base_url=base_url + "/v1", api_key=KEY_B, max_retries=0, timeout=600) as client:
        async def one(i: int) -> None:
            a_unfinished = backlog()
            results.append({"ttft_s": await streamed_ttft(client, i, max_tokens), "a_unfinished": a_unfinished})

        loop = asyncio.get_running_loop()
        start, tasks = loop.time(), []
        for i in range(int(duration_s * rate)):
            await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return results


async def a_flood(base_url: str, jobs: int, max_tokens: int, submitters: int) -> list[str]:
    """Key A: `jobs` background jobs submitted at once (`submitters` in flight), their ids."""
    ids: list[str] = []
    async with AsyncOpenAI(base_url=base_url + "/v1", api_key=KEY_A, max_retries=5, timeout=120) as client:
        pending = list(range(jobs))

        async def submitter() -> None:
            while pending:
                i = pending.pop()
                raw = await client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=[{"role": "user", "content": f"Backlog job {i}"}], max_tokens=max_tokens,
                    extra_body={"background": True})
                assert raw.http_response.status_code == 202, raw.http_response.text
                ids.append(raw.http_response.json()["id"])

        await asyncio.gather(*(submitter() for _ in range(submitters)))
    return ids


async def poll_until_done(base_url: str, ids: list[str], timeout_s: float) -> dict[str, int]:
    """Poll A's jobs (GET /v1/chat/completions/{id}) until none is queued or in progress; count by status."""
    final: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    async with AsyncOpenAI(base_url=base_url + "/v1", api_key=KEY_A, max_retries=3, timeout=60) as client:
        while len(final) < len(ids) and time.monotonic() < deadline:
            todo = [i for i in ids if i not in final]
            for start in range(0, len(todo), 50):
                chunk = todo[start:start + 50]
                jobs = await asyncio.gather(*(client.get(f"/chat/completions/{i}", cast_to=object) for i in chunk))
                final.update({j["id"]: j["status"] for j in jobs if j["status"] not in ("queued", "in_progress")})
            if len(final) < len(ids):
                await asyncio.sleep(2)
    counts = collections.Counter(final.values())
    counts["unfinished"] = len(ids) - len(final)
    return dict(counts)


def keys_scenario(args) -> None:
    log_dir = Path(tempfile.mkdtemp(prefix="fairness-keys-"))
    extra = {name: str(value) for name, value in (("FAIR_DISPATCH_MARGIN", args.fair_margin),
                                                  ("FAIR_DISPATCH_RESERVE", args.fair_reserve)) if value is not None}
    env = stack_env(api_keys=(KEY_A, KEY_B), MAX_NUM_SEQS=str(args.max_num_seqs), **extra)
    stack = Stack(env, log_dir)
    stack.start_worker(concurrency=args.max_num_seqs)
    stack.start_api()
    a_unfinished_key = f"{stack.prefix}:owner:{owner_of(KEY_A)}:unfinished"  # A's queued + running jobs
    backlog = lambda: int(stack.redis.zcard(a_unfinished_key))  # noqa: E731
    with stack.serving():
        base = stack.base_url
        asyncio.run(b_requests(base, 4, 2, args.b_max_tokens, backlog))  # warm-up
        alone = asyncio.run(b_requests(base, args.duration, args.b_rate, args.b_max_tokens, backlog))
        flood_started = time.perf_counter()
        a_ids = asyncio.run(a_flood(base, args.a_jobs, args.a_max_tokens, args.a_submitters))
        submitted_s = time.perf_counter() - flood_started
        a_at_start = backlog()
        loaded = asyncio.run(b_requests(base, args.duration, args.b_rate, args.b_max_tokens, backlog))
        a_at_end = backlog()
        a_final = asyncio.run(poll_until_done(base, a_ids, timeout_s=3600))
        drained_s = time.perf_counter() - flood_started
        alone_ttft = [r["ttft_s"] for r in alone]
        loaded_ttft = [r["ttft_s"] for r in loaded]
        during_backlog = [r["ttft_s"] for r in loaded if r["a_unfinished"] > 0]
        report = {
            "scenario": "keys", "max_num_seqs": args.max_num_seqs,
            "fair_dispatch_margin": args.fair_margin if args.fair_margin is not None else "default",
            "fair_dispatch_reserve": args.fair_reserve if args.fair_reserve is not None else "default",
            "b_requests_per_s": args.b_rate, "b_seconds": args.duration, "b_max_tokens": args.b_max_tokens,
            "a_jobs": len(a_ids), "a_max_tokens": args.a_max_tokens, "a_submitted_in_s": round(submitted_s, 1),
            "a_unfinished_when_b_loaded_began": a_at_start, "a_unfinished_when_b_loaded_ended": a_at_end,
            "a_final_statuses": a_final, "a_drained_in_s": round(drained_s, 1),
            "b_ttft_alone_ms": ms_summary(alone_ttft), "b_ttft_under_a_ms": ms_summary(loaded_ttft),
            "b_ttft_while_a_had_unfinished_jobs_ms": ms_summary(during_backlog),
        }
        ratio = percentile(loaded_ttft, 0.5) / percentile(alone_ttft, 0.5)
        report["p50_ratio"] = round(ratio, 2)
        report["target_p50_at_most_3x"] = ratio <= 3.0
        report["all_a_jobs_completed"] = a_final.get("completed", 0) == len(a_ids) == args.a_jobs
        print(json.dumps(report, indent=2))
        print("B under A's load, each request: [TTFT ms, A's unfinished jobs when it was sent]:",
              json.dumps([[round(1000 * r["ttft_s"], 1), r["a_unfinished"]] for r in loaded]))
        a, d, w = (report[k] for k in ("b_ttft_alone_ms", "b_ttft_under_a_ms", "b_ttft_while_a_had_unfinished_jobs_ms"))
        print(f"\n| key B, 1 streamed request/s | n | TTFT p50 (ms) | TTFT p99 (ms) |\n|---|---|---|---|\n"
              f"| alone | {a['n']} | {a['p50']} | {a['p99']} |\n"
              f"| key A's {len(a_ids)} background jobs submitted | {d['n']} | {d['p50']} | {d['p99']} |\n"
              f"| ... of which sent while A had unfinished jobs | {w['n']} | {w.get('p50', '-')} | {w.get('p99', '-')} |\n"
              f"\np50 under load / alone: {ratio:.2f}x (target <= 3x); A: {a_final} "
              f"(all {len(a_ids)} done {drained_s:.0f} s after the flood began)")
        if w["n"] < len(loaded):
            print(f"note: A's backlog was gone after {w['n']} of B's {len(loaded)} requests under load: a larger "
                  f"--a-max-tokens keeps it for the whole measurement")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=("keys", "batch"), default="keys")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="the engine's batch, and the worker's slots")
    keys = parser.add_argument_group("--scenario keys")
    keys.add_argument("--a-jobs", type=int, default=500, help="background jobs key A submits at once")
    keys.add_argument("--a-max-tokens", type=int, default=384,
                      help="each of A's jobs' max_tokens: at 384 A's backlog lasts past B's minute on a 2-core CPU "
                           "(at 16 it drains within seconds, and the measurement shows little)")
    keys.add_argument("--a-submitters", type=int, default=32, help="A's submissions in flight at once")
    keys.add_argument("--duration", type=float, default=60.0, help="seconds of B's requests, alone and loaded")
    keys.add_argument("--b-rate", type=float, default=1.0, help="B's streamed requests per second")
    keys.add_argument("--b-max-tokens", type=int, default=16)
    keys.add_argument("--fair-margin", type=int, default=None,
                      help="FAIR_DISPATCH_MARGIN for the stack (default: the setting's default)")
    keys.add_argument("--fair-reserve", type=int, default=None,
                      help="FAIR_DISPATCH_RESERVE for the stack (default: the setting's default)")
    batch = parser.add_argument_group("--scenario batch")
    batch.add_argument("--batch-lines", type=int, default=2000)
    batch.add_argument("--batch-max-tokens", type=int, default=16)
    batch.add_argument("--requests", type=int, default=40)
    batch.add_argument("--clients", type=int, default=4)
    batch.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    if args.scenario == "keys":
        keys_scenario(args)
    else:
        batch_scenario(args)


if __name__ == "__main__":
    main()
