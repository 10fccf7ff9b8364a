"""The command line (`python -m scripts.bench`): the options and their defaults per device, and the run: every mode
over every level, --rounds times interleaved, each row printed as it comes, then the table and the JSON."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

import torch

import scripts.bench as bench
from scripts.bench import ROOT
from scripts.bench.engine_runners import run_engine
from scripts.bench.hf_runners import run_hf_generate, run_hf_generate_batch
from scripts.bench.models import MODELS, build_model, device_slug, environment, free_memory, resolve_device
from scripts.bench.report import add_ratios, fmt, mode_label, say, summary, table, targets, write_json
from scripts.bench.service_runners import run_service, service_series
from scripts.bench.shared_prefix import run_shared_prefix
from scripts.bench.workloads import (BASELINES, DEFAULT_SAMPLING, DEFAULT_SERVICE_SAMPLING,
                                     DEFAULT_SERVICE_SDK_SAMPLING, GREEDY, SAMPLING, describe, requests_per_level,
                                     token_prompts, workload_meta, workload_names)


MODES = ("hf_generate", "hf_generate_batch", "engine", "engine_process", "service")
# The service mode runs on CUDA too (its worker then serves --model: scripts/bench/service_worker.py), but needs Redis
# and the service's dependencies, which a bare GPU machine lacks: scripts/gpu_check.sh carries them.
GPU_DEFAULT_MODES = ("hf_generate", "hf_generate_batch", "engine")

RESULTS: list[dict] = []


# --- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.bench", description=bench.__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    p.add_argument("--model", choices=MODELS, help="tiny (CPU default), mistral7b (CUDA default: random-weight "
                   "Mistral-7B v0.2 shape, NF4), tiny7b (the mistral7b code path, tiny)")
    p.add_argument("--modes", help=f"comma-separated of {','.join(MODES)} (default: all on CPU; "
                   f"{','.join(GPU_DEFAULT_MODES)} on CUDA)")
    p.add_argument("--concurrency", help="comma-separated levels (default 1,8,32 on CPU, 1,8,32,64,256 on CUDA)")
    p.add_argument("--num-prompts", type=int, help="requests per level for engine/service: max(waves × c, this) "
                   "(default 32 on CPU, 16 on CUDA)")
    p.add_argument("--input-len", type=int, help="prompt tokens (default 128)")
    p.add_argument("--output-len", type=int, help="new tokens per request (default 128)")
    p.add_argument("--hf-max-requests", type=int, help="most sequential hf_generate requests per level "
                   "(0 = c; default 8 on CPU, 4 on CUDA): one at a time, its speed does not depend on c")
    p.add_argument("--hf-batch-cache", choices=("sized", "default"), help="generate_batch's paged cache: sized "
                   "for the requests (CPU default) or transformers' default (CUDA default)")
    p.add_argument("--max-model-len", type=int, default=4096, help="engine and service context (default 4096)")
    p.add_argument("--kv-cache-tokens", type=int, default=0, help="fix the engine's KV cache size (0 = derive)")
    p.add_argument("--sampling", default=",".join(DEFAULT_SAMPLING),
                   help=f"the engine modes' sampling workloads, comma-separated of {','.join(SAMPLING)} (default "
                        f"%(default)s; the hf_generate modes are greedy): a row each, beside greedy for x greedy "
                        f"(and {', '.join(sorted(BASELINES))} beside defaults for x defaults)")
    p.add_argument("--service-client", choices=("aiohttp", "openai"), default="aiohttp",
                   help="the client of the service's greedy rows: aiohttp (light, as vLLM's benchmark) or the "
                        "official openai SDK")
    p.add_argument("--service-sampling",
                   help="the service's rows from --service-client at the highest level, beside its greedy rows: "
                        f"their workloads, comma-separated (default {','.join(DEFAULT_SERVICE_SAMPLING)} on CPU, "
                        "for x defaults; '' on CUDA; '' for none)")
    p.add_argument("--service-sdk-sampling", default=",".join(DEFAULT_SERVICE_SDK_SAMPLING),
                   help="the service's rows from the official openai SDK, at concurrency 1 and the highest level "
                        "(for x c=1): their workloads, comma-separated (default %(default)s; '' for none)")
    p.add_argument("--service-torch-threads", type=int, default=1,
                   help="TORCH_THREADS for the service's worker and for engine_process (0 = torch's default). 1 by "
                        "default: on a small CPU machine the worker shares its cores with the API, Redis and this "
                        "client")
    p.add_argument("--redis-profile", action="store_true",
                   help="the service's greedy row at the highest level once more with every Redis command logged "
                        "(SLOWLOG, no threshold), and Redis's time per job by command and by script")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds one request may take")
    p.add_argument("--service-start-timeout", type=float, default=180.0)
    p.add_argument("--out", help="JSON path (default bench-results/bench-<device>-<time>.json); a directory "
                   "gets that file name inside it")
    p.add_argument("--waves", type=int, help="engine/service requests per level: at least this many times c, so "
                   "throughput is measured in steady state, not over one burst of c arrivals (default 4)")
    p.add_argument("--rounds", type=int, help="run every mode this many times, interleaved, and report each "
                   "row's median round (default 3 on CPU, 1 on CUDA and with --quick)")
    p.add_argument("--shared-prefix", action="store_true", help="the prefix cache's scenario instead of the modes "
                   "(scripts/bench/shared_prefix.py): --num-prompts requests at once (default 64) sharing a "
                   "--prefix-len prefix, each with --suffix-len tokens of its own, --output-len new tokens (default "
                   "32), with the cache off and on: the engine and the service (--modes engine or service for one)")
    p.add_argument("--prefix-len", type=int, default=1024, help="--shared-prefix: the shared prefix's tokens")
    p.add_argument("--suffix-len", type=int, default=32, help="--shared-prefix: each request's own tokens")
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run: 32 in, 16 out, "
                   "concurrency 1,4, 4 prompts, 2 hf_generate requests")
    return p.parse_args(argv)


def resolve(args: argparse.Namespace, device: torch.device) -> None:
    cuda = device.type == "cuda"
    args.modes_given = args.modes is not None
    if args.shared_prefix:  # its own sizes (shared_prefix.py), unless given
        args.num_prompts = args.num_prompts or 64
        args.output_len = args.output_len or 32
        args.input_len = args.prefix_len + args.suffix_len
    if args.quick:
        defaults = dict(concurrency="1,4", num_prompts=4, input_len=32, output_len=16, hf_max_requests=2, rounds=1,
                        waves=1)
    elif cuda:
        defaults = dict(concurrency="1,8,32,64,256", num_prompts=16, input_len=128, output_len=128,
                        hf_max_requests=4, rounds=1, waves=4)
    else:
        defaults = dict(concurrency="1,8,32", num_prompts=32, input_len=128, output_len=128, hf_max_requests=8,
                        rounds=3, waves=4)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.model is None:
        args.model = "mistral7b" if cuda else "tiny"
    if args.hf_batch_cache is None:
        args.hf_batch_cache = "default" if cuda else "sized"
    args.modes = [m.strip() for m in (args.modes or ",".join(GPU_DEFAULT_MODES if cuda else MODES)).split(",")
                  if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; choose from {','.join(MODES)}")
    if args.service_sampling is None:
        args.service_sampling = "" if cuda else ",".join(DEFAULT_SERVICE_SAMPLING)
    args.sampling = workload_names(args.sampling, "--sampling")
    args.service_sampling = workload_names(args.service_sampling, "--service-sampling")
    args.service_sdk_sampling = workload_names(args.service_sdk_sampling, "--service-sdk-sampling")
    if not args.sampling:
        raise SystemExit("--sampling: name at least one workload")
    args.levels = sorted({int(c) for c in str(args.concurrency).split(",") if c.strip()})
    if not args.levels or min(args.levels) < 1:
        raise SystemExit("--concurrency: positive integers, comma-separated")
    if args.input_len + args.output_len > args.max_model_len:
        raise SystemExit("--input-len + --output-len must fit in --max-model-len")


def sampling_meta(args) -> dict:
    """What the JSON says of sampling: each workload's settings, and which rows ran which."""
    used = dict.fromkeys([GREEDY, *args.sampling, *args.service_sampling, *args.service_sdk_sampling])
    return dict(workloads={name: workload_meta(name) for name in used}, seed="each request's index in its level",
                hf_generate="greedy (the baseline)", engine_modes=args.sampling,
                service=[dataclasses.asdict(run) for run in service_series(args)])


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    device = resolve_device(args.device)
    resolve(args, device)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else ROOT / "bench-results"
    if args.out is None or out.is_dir() or str(args.out).endswith("/"):
        out = out / f"bench-{'shared-prefix-' if args.shared_prefix else ''}{device_slug(device)}-{stamp}.json"
    if args.shared_prefix:
        return run_shared_prefix(args, device, out)

    meta = dict(started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), environment=environment(device),
                config=dict(model=args.model, modes=args.modes, concurrency=args.levels, num_prompts=args.num_prompts,
                            waves=args.waves,
                            requests_per_level="engine/service: max(waves * c, num_prompts); hf_generate: "
                                               + (f"min(c, {args.hf_max_requests})" if args.hf_max_requests else "c")
                                               + "; hf_generate_batch: c",
                            input_len=args.input_len, output_len=args.output_len,
                            hf_max_requests=args.hf_max_requests, hf_batch_cache=args.hf_batch_cache,
                            max_model_len=args.max_model_len,
                            kv_cache_tokens=args.kv_cache_tokens, sampling=sampling_meta(args),
                            rounds=args.rounds, quick=args.quick, argv=sys.argv[1:]))
    env = meta["environment"]
    say(f"bench: {env['device_name']} ({device}), {env['cpus_usable']} CPUs, torch {env['versions']['torch']}, "
        f"transformers {env['versions']['transformers']}, bitsandbytes {env['versions']['bitsandbytes']}")
    say(f"bench: modes {','.join(args.modes)}; concurrency {args.levels}; {args.input_len} in / {args.output_len} "
        f"out; {meta['config']['requests_per_level']}")

    def report() -> dict:
        baseline = add_ratios(RESULTS)
        rows = summary(RESULTS)
        return dict(meta, baseline=baseline, targets=targets(rows, device), summary=rows, results=RESULTS)

    current_round = 1

    def record(row: dict) -> None:
        row["round"] = current_round
        RESULTS.append(row)
        name = f"  {mode_label(row):<17} {row['sampling']:<17} c={row['concurrency']:<4}"
        if row.get("status") == "ok":
            redis = (f"  Redis {fmt(row['redis_cpu_us_per_token'])} us CPU and "
                     f"{fmt(row['redis_commands_per_token'], 2)} commands and "
                     f"{fmt(row.get('redis_requests_per_token'), 3)} round trips per token, "
                     f"{fmt(row['redis_cpu_us_per_event'])} us per event" if "redis_cpu_us_per_token" in row else "")
            say(f"{name} {row['completed']} reqs  {row['output_tok_s']:.1f} out tok/s  "
                f"TTFT mean {fmt(row['ttft_ms']['mean'])} ms  TPOT mean {fmt(row['tpot_ms']['mean'])} ms  "
                f"({row['duration_s']:.1f} s){redis}")
        else:
            say(f"{name} {row.get('status')}: {row.get('error')}")
        write_json(out, report())

    model = None
    needs_model = [m for m in args.modes if m != "service"]
    if needs_model:
        model, info = build_model(args.model, device)
        meta["model"] = info
        say(f"bench: model {info['model']}, weights {info['weights']}")
    elif "service" in args.modes:
        meta["model"] = dict(model=("tiny-random" if args.model == "tiny" else args.model)
                             + " (served by the worker process)")
    max_n = max(requests_per_level(args, c) for c in args.levels)
    prompts = token_prompts(max_n, args.input_len)

    for current_round in range(1, args.rounds + 1):
        for mode in args.modes:
            say(f"== {mode}" + (f" (round {current_round} of {args.rounds})" if args.rounds > 1 else ""))
            started = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            if mode == "hf_generate":
                run_hf_generate(model, device, args, args.levels, prompts, record)
            elif mode == "hf_generate_batch":
                run_hf_generate_batch(model, device, args, args.levels, prompts, record)
            elif mode in ("engine", "engine_process"):
                run_engine(model, device, args, args.levels, prompts, record, meta, mode)
            elif mode == "service":
                run_service(args.model, device, args, record, meta)
            seconds = meta.setdefault("mode_seconds", {})
            seconds[mode] = round(seconds.get(mode, 0) + time.perf_counter() - started, 1)
            if device.type == "cuda":
                meta.setdefault("peak_gpu_memory_GiB", {})[mode] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            free_memory(device)

    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    final = report()
    write_json(out, final)
    say("")
    say(f"{env['device_name']} ({device}); model {args.model} "
        f"({final.get('model', {}).get('weights', 'served by the worker')}); "
        f"{args.input_len} in / {args.output_len} out")
    say(table(final["summary"]))
    shown = dict.fromkeys(r["sampling"] for r in final["summary"])
    say("sampling: " + "; ".join(f"{name} = {describe(name)}" for name in shown)
        + "; each request's seed is its index")
    base = final["baseline"]["hf_generate_tok_s"]
    if base:
        say(f"baseline: hf_generate {base:.1f} output tok/s (x hf_gen divides by it)")
    for t in final["targets"]:
        say(f"target: {t['what']}: {t['value']:.2f} (target >= {t['target']}"
            f"{'' if t['applies'] else ', a CPU target'}): {'met' if t['met'] else 'NOT met'}"
            + (f" ({t['detail']})" if t.get("detail") else ""))
    say(f"json: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
