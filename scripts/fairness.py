"""Interactive latency while a batch runs: TTFT p50/p99 of interactive streams with no batch, then while a
large batch is in progress, in one run on one stack; and the API's memory while it drives the batch.

    python -m scripts.fairness [--batch-lines 2000] [--requests 40] [--clients 4]
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from openai import AsyncOpenAI, OpenAI

from scripts.stack import Stack, stack_env, wait_until

MODEL = "mistralai/mistral-7b-instruct-v0.2"
KEY = "fairness-key"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


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


async def interactive_ttfts(base_url: str, requests: int, clients: int, max_tokens: int) -> list[float]:
    ttfts: list[float] = []
    queue = list(range(requests))

    async with AsyncOpenAI(base_url=base_url + "/v1", api_key=KEY, max_retries=0, timeout=300) as client:
        async def worker():
            while queue:
                i = queue.pop()
                started = time.perf_counter()
                stream = await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"Interactive question {i}"}],
                    max_tokens=max_tokens, stream=True)
                first = None
                async for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter() - started
                ttfts.append(first if first is not None else time.perf_counter() - started)

        await asyncio.gather(*(worker() for _ in range(clients)))
    return ttfts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-lines", type=int, default=2000)
    parser.add_argument("--batch-max-tokens", type=int, default=16)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    args = parser.parse_args()

    log_dir = Path(tempfile.mkdtemp(prefix="fairness-"))
    stack = Stack(stack_env(api_keys=(KEY,), MAX_NUM_SEQS=str(args.max_num_seqs)), log_dir)
    stack.start_worker(concurrency=args.max_num_seqs)
    stack.start_api()
    try:
        stack.wait_ready()
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
            "ttft_no_batch_ms": {"p50": round(1000 * percentile(alone, 0.5), 1),
                                 "p99": round(1000 * percentile(alone, 0.99), 1),
                                 "mean": round(1000 * statistics.mean(alone), 1)},
            "ttft_with_batch_ms": {"p50": round(1000 * percentile(during, 0.5), 1),
                                   "p99": round(1000 * percentile(during, 0.99), 1),
                                   "mean": round(1000 * statistics.mean(during), 1)},
            "api_rss_mib": {"before_batch": round(rss_before, 1), "peak": round(rss_peak, 1)},
        }
        print(json.dumps(report, indent=2))
        a, d = report["ttft_no_batch_ms"], report["ttft_with_batch_ms"]
        print(f"\n| | TTFT p50 (ms) | TTFT p99 (ms) |\n|---|---|---|\n| no batch | {a['p50']} | {a['p99']} |\n"
              f"| {args.batch_lines}-line batch running | {d['p50']} | {d['p99']} |")
    finally:
        stack.stop_all()
        stack.cleanup_redis()


if __name__ == "__main__":
    main()
