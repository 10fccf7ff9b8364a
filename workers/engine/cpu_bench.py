"""CPU throughput of the engine against Hugging Face `generate()` one request at a time, on the tiny model.

    .venv/bin/python -m workers.engine.cpu_bench [--concurrency 1 8 32] [--prompt 128] [--new 128] [--repeat 3]
                                                 [--threads N]

Output tokens per second, all requests together (EOS ignored: eos_token_id=-1), per wall second and per CPU
second of the process (the second is steadier on a busy shared machine). Each figure is the best of `--repeat`
runs, and the baseline is re-measured between them.
"""
from __future__ import annotations

import argparse
import time

import torch

from workers.engine.config import EngineConfig
from workers.engine.engine import Engine, EngineRequest
from workers.engine.sampling import SamplingParams
from workers.model_loader import build_tiny_random


def hf_tokens_per_s(model, prompts: list[list[int]], new: int) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second of this process)."""
    started, cpu = time.perf_counter(), time.process_time()
    for prompt in prompts:
        ids = torch.tensor([prompt])
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, eos_token_id=None, pad_token_id=0)
    total = len(prompts) * new
    return total / (time.perf_counter() - started), total / (time.process_time() - cpu)


def engine_tokens_per_s(engine: Engine, prompts: list[list[int]], new: int) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second of this process: engine thread and consumer together)."""
    started, cpu = time.perf_counter(), time.process_time()
    streams = [engine.submit(EngineRequest(f"bench-{i}", p, SamplingParams(temperature=0.0), new))
               for i, p in enumerate(prompts)]
    total = sum(len(output.token_ids) for stream in streams for output in stream)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert total == len(prompts) * new, total
    return total / elapsed, total / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--hf-requests", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_tiny_random()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 32000, (args.prompt,), generator=gen).tolist() for _ in range(max(args.concurrency))]
    engine = Engine(model, torch.device("cpu"), eos_token_id=-1, config=EngineConfig())
    try:
        engine.warmup()
        engine_tokens_per_s(engine, prompts[:4], 8)
        hf_tokens_per_s(model, prompts[:1], 8)
        print(f"tiny model, CPU threads={torch.get_num_threads()}, prompt {args.prompt} tokens, {args.new} new "
              f"tokens, greedy, EOS ignored; best of {args.repeat}")
        best = lambda a, b: (max(a[0], b[0]), max(a[1], b[1]))  # noqa: E731
        baseline = (0.0, 0.0)
        results = {c: (0.0, 0.0) for c in args.concurrency}
        for _ in range(args.repeat):
            baseline = best(baseline, hf_tokens_per_s(model, prompts[:args.hf_requests], args.new))
            for c in args.concurrency:
                results[c] = best(results[c], engine_tokens_per_s(engine, prompts[:c], args.new))
        print("                                       wall tok/s         tok per CPU-second")
        print(f"HF generate(), one request at a time: {baseline[0]:9.1f}            {baseline[1]:9.1f}")
        for c in args.concurrency:
            wall, cpu = results[c]
            print(f"engine, {c:3d} concurrent requests:    {wall:9.1f} ({wall / baseline[0]:5.1f}x)   "
                  f"{cpu:9.1f} ({cpu / baseline[1]:5.1f}x)")
        print(f"engine stats: {engine.stats()}")
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
