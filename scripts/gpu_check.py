"""The GPU check (`python -m scripts.gpu_check`; scripts/gpu_check.sh sets up a bare GPU machine and runs it): on the
random-weight Mistral-7B v0.2 in NF4 (or its tiny stand-in, tiny7b, on a CPU), within a time budget:

  nf4          on CUDA the model's linears are bitsandbytes NF4 (not applicable on a CPU, where it stays bf16)
  greedy       our engine's greedy tokens equal Hugging Face generate()'s for 8 prompts of 5..600 tokens, 32 new
               tokens each, all 8 in the engine at once; where a prompt's tokens part, the two tokens involved
               (generate()'s and ours) are within one bf16 step of each other in generate()'s logits and in ours
               at that position (a tie at bf16 precision: either choice is right)
  graphs       after the engine's warm-up every CUDA-graph bucket was captured (engine.runner.graph_report():
               captured == expected for each kind); not applicable on a CPU
  sweep        `python -m scripts.bench` over engine_process, service and engine at concurrency 1,8,32,64,256 (1,8
               on a CPU), greedy and the docs' default sampling (temperature 0.3); stopped cleanly when the budget
               runs out, with what finished kept

Writes under --out: gpu-check.json (environment, checks, timings), gpu-check.md (the same as tables, with the
sweep's), bench.json (the benchmark's own JSON) and, where the service ran, service-worker.log and service-api.log.
Exit status: 0 every check passed and the sweep finished; 1 a check failed; 3 every check passed but the budget
stopped the sweep.
"""
from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent

PASS, FAIL, NA, UNAVAILABLE, INCOMPLETE = "pass", "fail", "n/a", "unavailable", "incomplete"
BF16_EPS = 2.0 ** -7  # torch.finfo(torch.bfloat16).eps: one bf16 step, relative to the value
PROMPT_LENGTHS = (5, 17, 33, 64, 100, 128, 257, 600)  # 600: more than one prefill chunk (512)
NEW_TOKENS = 32
CHECK_KV_TOKENS = 32768  # the check engine's KV cache (the sweep's engines size theirs themselves)


# --- the rules (pure: tests/unit/test_gpu_check.py)

def first_difference(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
    """The first position where a and b differ (a length difference counts), or None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def within_bf16_step(x: float, y: float) -> bool:
    """Two logits within one bf16 step of each other: |x - y| <= eps * max(|x|, |y|) (eps = 2**-7)."""
    if not (math.isfinite(x) and math.isfinite(y)):
        return False
    return abs(x - y) <= BF16_EPS * max(abs(x), abs(y))


def parting_is_a_tie(generate_logits: tuple[float, float], engine_logits: tuple[float, float]) -> bool:
    """Where our greedy token b parts from generate()'s a: each pair is (logit of a, logit of b), from
    generate()'s logits and from our engine's at that position. The parting is rounding, not a bug, when the two
    tokens are within one bf16 step of each other on both sides."""
    return within_bf16_step(*generate_logits) and within_bf16_step(*engine_logits)


def compare_greedy(expected: Sequence[int], ours: Sequence[int],
                   logits_at: Callable[[int], tuple[tuple[float, float], tuple[float, float]]]) -> dict:
    """One prompt's verdict: equal tokens pass; else at the first difference k, logits_at(k) gives
    (generate()'s, ours) as (logit of expected[k], logit of ours[k]), judged by parting_is_a_tie."""
    k = first_difference(expected, ours)
    if k is None:
        return dict(status=PASS, equal=len(expected))
    if k >= min(len(expected), len(ours)):
        return dict(status=FAIL, equal=k, why=f"lengths differ: {len(expected)} expected, {len(ours)} from ours")
    try:
        theirs, mine = logits_at(k)
    except Exception as exc:  # the glue could not compute our logits there: the difference stands
        return dict(status=FAIL, equal=k, tokens=[expected[k], ours[k]],
                    why=f"tokens part at {k} and our logits there are unavailable: {type(exc).__name__}: {exc}")
    tie = parting_is_a_tie(theirs, mine)
    return dict(status=PASS if tie else FAIL, equal=k, tokens=[expected[k], ours[k]],
                generate_logits=list(theirs), engine_logits=list(mine),
                why=("tokens part at %d: a tie within one bf16 step" if tie else
                     "tokens part at %d: not within one bf16 step") % k)


def judge_graphs(report: Optional[dict], cuda: bool) -> tuple[str, str]:
    """(status, detail) of graph_report()'s {kind: {expected, captured}}; None: the runner has no report."""
    if not cuda:
        detail = "not applicable (no CUDA)"
        if report is not None:
            detail += ": " + ", ".join(f"{k} {v['captured']}/{v['expected']}" for k, v in report.items())
        return NA, detail
    if report is None:
        return FAIL, "unavailable: the runner has no graph_report(), so capture cannot be verified"
    if not report:
        return FAIL, "graph_report() names no kind of graph"
    text = ", ".join(f"{k} {v['captured']}/{v['expected']} captured" for k, v in report.items())
    ok = all(v["expected"] > 0 and v["captured"] == v["expected"] for v in report.values())
    return (PASS if ok else FAIL), text


def check(name: str, status: str, detail: str, **data) -> dict:
    return dict(name=name, status=status, detail=detail, **data)


# --- the environment

def versions() -> dict:
    import torch

    out = dict(python=platform.python_version(), torch=torch.__version__,
               cuda=torch.version.cuda if torch.cuda.is_available() else None)
    for name in ("transformers", "bitsandbytes", "triton", "accelerate", "celery", "flask", "gunicorn", "redis",
                 "openai", "aiohttp"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment(device) -> dict:
    import torch

    from scripts.bench.models import device_name

    env = dict(device=str(device), device_name=device_name(device), cpus=os.cpu_count(), versions=versions(),
               platform=platform.platform())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu_memory_GiB=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}")
    return env


# --- correctness: our engine against generate()

def check_prompts(count: int = len(PROMPT_LENGTHS)) -> list[list[int]]:
    """Deterministic random token ids after BOS, of PROMPT_LENGTHS' lengths."""
    import torch

    gen = torch.Generator().manual_seed(2024)
    return [[1] + torch.randint(3, 32000, (n - 1,), generator=gen).tolist() for n in PROMPT_LENGTHS[:count]]


def hf_greedy(model, prompt: list[int], n: int):
    """generate()'s greedy tokens (n of them, EOS ignored) and its raw logits for each: ([n], [n, V] float32)."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    return tokens, torch.cat([step.float() for step in out.logits]).cpu()  # [n, V]


def engine_logits(engine, prompt: list[int], generated: list[int], k: int):
    """Our engine's logits [V] (float32, on the CPU) for output position k after greedy tokens generated[:k],
    computed as the engine computed them: position 0 by the prompt's prefill (in chunks), position k > 0 by a
    decode step of generated[k-1] after a prefill of prompt + generated[:k-1]. The glue to the runner, kept here
    alone: it drives engine.runner.run(ScheduledBatch) directly, so the engine thread must be stopped
    (engine.shutdown()) and batch slot 0 free."""
    import torch

    from workers.engine.interface import SamplingParams
    from workers.engine.scheduler import ScheduledBatch
    from workers.engine.sequence import Sequence as EngineSequence

    seq = EngineSequence("gpu-check-logits", prompt + generated[:max(k - 1, 0)], SamplingParams(temperature=0.0), 1)
    seq.slot = 0
    blocks, runner = engine.blocks, engine.runner
    if not blocks.allocate(seq.block_table, seq.num_tokens + 1):
        raise RuntimeError("no free KV blocks for the recomputation")
    try:
        with torch.inference_mode():
            logits, fresh = None, True
            while seq.num_computed_tokens < seq.num_tokens:
                n = min(engine.config.prefill_chunk_tokens, seq.num_tokens - seq.num_computed_tokens)
                batch = ScheduledBatch(prefill=[seq], prefill_lens=[n], admitted=[seq] if fresh else [])
                logits = runner.run(batch).logits
                seq.num_computed_tokens += n
                fresh = False
            if k > 0:
                seq.token_ids.append(generated[k - 1])
                logits = runner.run(ScheduledBatch(decode=[seq])).logits
            return logits[-1].float().cpu()
    finally:
        blocks.free(seq.block_table)


def run_engine_greedy(engine, prompts: list[list[int]], n: int, timeout: float = 300.0) -> list[list[int]]:
    """All prompts submitted at once (the engine batches them, prefill chunks beside decodes), greedy, n tokens."""
    from workers.engine.interface import EngineRequest, SamplingParams

    streams = [engine.submit(EngineRequest(f"gpu-check-{i}", list(p), SamplingParams(temperature=0.0), n))
               for i, p in enumerate(prompts)]
    results = []
    for stream in streams:
        tokens, done = [], False
        while not done:
            for output in stream.next_outputs(timeout=timeout):
                tokens += output.token_ids
                if output.finish_reason is not None:
                    if output.finish_reason not in ("length", "stop"):
                        raise RuntimeError(f"{output.finish_reason}: {output.error}")
                    done = True
        results.append(tokens)
    return results


def correctness_and_graphs(model, device, levels: list[int], max_model_len: int) -> list[dict]:
    """The greedy and graphs checks on one engine with the sweep's batch and context limits (so its graph buckets
    are the sweep's), with a KV cache of CHECK_KV_TOKENS."""
    from workers.engine.config import EngineConfig
    from workers.engine.engine import Engine

    config = EngineConfig(max_num_seqs=max(levels), max_model_len=max_model_len,
                          num_kv_blocks=-(-CHECK_KV_TOKENS // EngineConfig().block_size))
    prompts = check_prompts()
    started = time.perf_counter()
    expected = [hf_greedy(model, p, NEW_TOKENS) for p in prompts]
    generate_s = time.perf_counter() - started
    out: list[dict] = []
    engine = Engine(model, device, eos_token_id=-1, config=config)
    try:
        started = time.perf_counter()
        engine.warmup()
        warmup_s = time.perf_counter() - started
        report_fn = getattr(engine.runner, "graph_report", None)
        report = report_fn() if callable(report_fn) else None
        status, detail = judge_graphs(report, device.type == "cuda")
        out.append(check("graphs", status, detail, report=report, warmup_s=round(warmup_s, 2)))
        started = time.perf_counter()
        ours = run_engine_greedy(engine, prompts, NEW_TOKENS)
        engine_s = time.perf_counter() - started
        stats = engine.stats()
    finally:
        engine.shutdown()
    verdicts = []
    for prompt, (tokens, logits), mine in zip(prompts, expected, ours):
        seen: dict = {}

        def logits_at(k: int, prompt=prompt, tokens=tokens, logits=logits, mine=mine, engine=engine, seen=seen):
            row = engine_logits(engine, prompt, mine, k)
            a, b = tokens[k], mine[k]
            # Whether the recomputation (alone, not in the engine's batch) picks our token again.
            seen["recomputed_token"] = int(row.argmax())
            return (float(logits[k, a]), float(logits[k, b])), (float(row[a]), float(row[b]))
        verdicts.append(dict(prompt_tokens=len(prompt), **compare_greedy(tokens, mine, logits_at), **seen))
    bad = [v for v in verdicts if v["status"] != PASS]
    parted = [v for v in verdicts if v["status"] == PASS and v["equal"] < NEW_TOKENS]
    steps = f"engine steps: {stats.get('graph_steps', '?')} from CUDA graphs, {stats.get('eager_steps', '?')} eager"
    detail = (f"{len(prompts) - len(bad)}/{len(prompts)} prompts ({min(PROMPT_LENGTHS)}..{max(PROMPT_LENGTHS)} "
              f"tokens) x {NEW_TOKENS} tokens: " + ("all equal" if not parted and not bad else
              f"{len(prompts) - len(bad) - len(parted)} equal, {len(parted)} part at a bf16 tie, {len(bad)} fail")
              + f"; {steps}")
    out.insert(0, check("greedy", FAIL if bad else PASS, detail, prompts=verdicts,
                        generate_s=round(generate_s, 2), engine_s=round(engine_s, 2), engine_stats=stats))
    return out


# --- the sweep: python -m scripts.bench in a subprocess

def bench_argv(args, json_path: Path) -> list[str]:
    return [sys.executable, "-m", "scripts.bench", "--device", args.device, "--model", args.model,
            "--modes", args.modes, "--concurrency", ",".join(map(str, args.levels)),
            "--sampling", args.sampling, "--service-sdk-sampling", args.service_sdk_sampling,
            "--num-prompts", str(args.num_prompts), "--waves", str(args.waves), "--rounds", "1",
            "--input-len", str(args.input_len), "--output-len", str(args.output_len),
            "--max-model-len", str(args.max_model_len), "--out", str(json_path)]


def run_sweep(args, json_path: Path, seconds: float) -> dict:
    """The benchmark as a subprocess, its output passed through. Past `seconds`: SIGINT (it stops its engine
    process and its service stack as any exception would), then SIGKILL to whatever is left of it."""
    argv = bench_argv(args, json_path)
    print("gpu_check: " + " ".join(argv[1:]), flush=True)
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def relay() -> None:
        for line in proc.stdout:
            print(line, end="", flush=True)

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    stopped = False
    try:
        proc.wait(timeout=max(seconds, 1))
    except subprocess.TimeoutExpired:
        stopped = True
        print(f"gpu_check: the budget is spent ({seconds:.0f} s for the sweep): stopping the benchmark", flush=True)
        from scripts.stack import descendants  # (the service's dependencies come from the carried wheels)
        below = descendants(proc.pid)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pid in below:  # the service's processes are in sessions of their own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    reader.join(timeout=10)
    return dict(returncode=proc.returncode, stopped_by_budget=stopped, seconds=round(time.monotonic() - started, 1),
                argv=argv[1:])


def sweep_rows(json_path: Path) -> tuple[Optional[dict], list[dict]]:
    """The benchmark's JSON and its summary rows (computed from its results when it was stopped mid-way)."""
    from scripts.bench.report import add_ratios, summary

    if not json_path.exists():
        return None, []
    data = json.loads(json_path.read_text())
    if "summary" in data and data.get("finished"):
        return data, data["summary"]
    results = data.get("results", [])
    add_ratios(results)
    return data, summary(results)


def judge_sweep(run: dict, rows: list[dict]) -> tuple[str, str]:
    bad = [r for r in rows if r.get("status") != "ok"]
    ok = len(rows) - len(bad)
    if bad:
        first = bad[0]
        return FAIL, (f"{ok} rows ok, {len(bad)} not (first: {first['mode']} {first['sampling']} "
                      f"c={first['concurrency']}: {first.get('status')}: {str(first.get('error'))[:200]})")
    if run["stopped_by_budget"]:
        return INCOMPLETE, f"{ok} rows ok before the budget ran out (after {run['seconds']} s)"
    if run["returncode"] != 0 or not rows:
        return FAIL, f"the benchmark exited with {run['returncode']} after {ok} rows"
    return PASS, f"{ok} rows ok in {run['seconds']} s"


def copy_service_logs(bench: Optional[dict], out: Path, limit: int = 4 * 2**20) -> list[str]:
    """The service stack's worker and API logs (their last `limit` bytes) beside the reports."""
    logs = ((bench or {}).get("service") or {}).get("logs")
    copied = []
    for name in ("worker", "api"):
        src = Path(logs or "/nonexistent") / f"{name}.log"
        if src.exists():
            data = src.read_bytes()[-limit:]
            (out / f"service-{name}.log").write_bytes(data)
            copied.append(f"service-{name}.log")
    return copied


# --- the report

def fmt(value, digits: int = 1) -> str:
    from scripts.bench.report import fmt as bench_fmt
    return bench_fmt(value, digits)


def markdown(report: dict, rows: list[dict]) -> str:
    from scripts.bench.report import mode_label, table

    env, v = report["environment"], report["environment"]["versions"]
    lines = [f"# GPU check: {env['device_name']} ({env['device']}): {report['verdict'].upper()}", "",
             f"- started {report['started']}, {report['seconds']} s of a {report['budget_s']:.0f} s budget",
             f"- torch {v['torch']} (CUDA {v['cuda'] or '-'}), transformers {v['transformers']}, bitsandbytes "
             f"{v['bitsandbytes']}, triton {v['triton']}, python {v['python']}",
             f"- model: {report['model'].get('model')}, weights {report['model'].get('weights')}"]
    if env.get("gpu_memory_GiB"):
        lines.append(f"- GPU: {env['gpu_memory_GiB']} GiB, {env['sm_count']} SMs, compute capability "
                     f"{env['capability']}")
    lines += ["", "## Checks", "", "| check | result | detail |", "| --- | --- | --- |"]
    for c in report["checks"]:
        lines.append(f"| {c['name']} | {c['status']} | {c['detail']} |")
    sweep = report.get("sweep") or {}
    cfg = sweep.get("config") or {}
    lines += ["", f"## Sweep ({cfg.get('model')}, {cfg.get('input_len')} in / {cfg.get('output_len')} out, "
              f"requests per level max({cfg.get('waves')} x c, {cfg.get('num_prompts')}); sampling: greedy = "
              f"temperature 0, defaults = the docs' defaults, temperature 0.3, top_p 1)", ""]
    if not rows:
        lines.append("No rows.")
        return "\n".join(lines) + "\n"
    lines += ["| mode | sampling | conc | reqs | out tok/s | req/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | "
              "ITL p50 / p99 ms |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        names = f"| {mode_label(r)} | {r['sampling']} | {r['concurrency']} |"
        if r.get("status") != "ok":
            lines.append(f"{names} {r.get('status')}: {str(r.get('error'))[:120]} | | | | | |")
            continue
        pair = lambda m: f"{fmt(r[m]['p50'])} / {fmt(r[m]['p99'])}"  # noqa: E731
        reqs = str(r["completed"]) + (f" ({r['failed']} failed)" if r.get("failed") else "") + (
            f" ({r['short_requests']} short)" if r.get("short_requests") else "")
        lines.append(f"{names} {reqs} | {fmt(r['output_tok_s'])} | {fmt(r['request_s'], 2)} | {pair('ttft_ms')} | "
                     f"{pair('tpot_ms')} | {pair('itl_ms')} |")
    lines += ["", "The benchmark's own table (ratios: x engine and x engine_process divide the service's tokens/s by "
              "the engine mode's, x greedy by the same mode's greedy row, x c=1 by its row at concurrency 1):", "",
              "```", table(rows), "```"]
    return "\n".join(lines) + "\n"


# --- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.gpu_check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("mistral7b", "tiny7b"), help="default: mistral7b on CUDA, tiny7b on a CPU")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    p.add_argument("--out", default=str(ROOT / "bench-results" / "gpu-check"), help="the folder for the reports")
    p.add_argument("--budget-s", type=float, default=480.0, help="seconds for everything (default 480: 8 minutes)")
    p.add_argument("--concurrency", help="the sweep's levels (default 1,8,32,64,256 on CUDA, 1,8 on a CPU)")
    p.add_argument("--modes", default="engine_process,service,engine", help="the sweep's modes, in this order "
                   "(default %(default)s: the ones the service is judged by first)")
    p.add_argument("--sampling", default="greedy,defaults", help="the engine modes' workloads (default %(default)s)")
    p.add_argument("--service-sdk-sampling", default="defaults", help="the service's rows from the openai SDK, at "
                   "concurrency 1 and the highest level (default %(default)s; its greedy rows run at every level)")
    p.add_argument("--num-prompts", type=int, default=8, help="least requests per level (default 8)")
    p.add_argument("--waves", type=int, default=1, help="requests per level: at least waves x c (default 1)")
    p.add_argument("--input-len", type=int, help="prompt tokens (default 128 on CUDA, 64 on a CPU)")
    p.add_argument("--output-len", type=int, help="new tokens (default 128 on CUDA, 32 on a CPU)")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--skip-sweep", action="store_true", help="the checks alone")
    p.add_argument("--min-sweep-s", type=float, default=60.0, help="start the sweep only with this much left")
    return p.parse_args(argv)


def main(argv=None) -> int:
    started_wall = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t0 = time.monotonic()
    args = parse_args(argv)
    deadline = t0 + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("gpu-check.json", "gpu-check.md", "bench.json", "service-worker.log", "service-api.log"):
        (out / stale).unlink(missing_ok=True)  # a re-run leaves no earlier run's file behind

    import torch

    from scripts.bench.models import build_model, free_memory, resolve_device

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.device = str(device)
    args.model = args.model or ("mistral7b" if cuda else "tiny7b")
    args.levels = sorted({int(c) for c in (args.concurrency or ("1,8,32,64,256" if cuda else "1,8")).split(",")})
    args.input_len = args.input_len or (128 if cuda else 64)
    args.output_len = args.output_len or (128 if cuda else 32)
    env = environment(device)
    print(f"gpu_check: {env['device_name']} ({device}); {json.dumps(env['versions'])}", flush=True)
    report = dict(started=started_wall, budget_s=args.budget_s, environment=env, checks=[], timings={})

    def write(verdict: str, rows: list[dict]) -> None:
        report.update(verdict=verdict, seconds=round(time.monotonic() - t0, 1))
        (out / "gpu-check.json").write_text(json.dumps(report, indent=1, default=str))
        (out / "gpu-check.md").write_text(markdown(report, rows))

    started = time.perf_counter()
    model, info = build_model(args.model, device)
    report["model"] = info
    report["timings"]["build_s"] = round(time.perf_counter() - started, 1)
    print(f"gpu_check: model {info['model']}, weights {info['weights']} ({report['timings']['build_s']} s)",
          flush=True)
    if cuda:
        nf4 = str(info.get("weights", "")).startswith("bitsandbytes NF4")
        report["checks"].append(check("nf4", PASS if nf4 else FAIL, f"{info['weights']}"
                                      + (f", {info.get('weights_GiB')} GiB on the GPU" if nf4 else "")))
    else:
        report["checks"].append(check("nf4", NA, f"not applicable (no CUDA): {info['weights']}"))

    started = time.perf_counter()
    try:
        report["checks"] += correctness_and_graphs(model, device, args.levels, args.max_model_len)
    except Exception as exc:
        import traceback
        traceback.print_exc()
        report["checks"].append(check("greedy", FAIL, f"the check itself failed: {type(exc).__name__}: {exc}"))
    report["timings"]["checks_s"] = round(time.perf_counter() - started, 1)
    for c in report["checks"]:
        print(f"gpu_check: {c['name']}: {c['status']}: {c['detail']}", flush=True)
    del model
    gc.collect()
    free_memory(device)
    if cuda:
        report["timings"]["gpu_memory_after_checks_GiB"] = round(torch.cuda.memory_allocated(device) / 2**30, 2)
    failed = any(c["status"] == FAIL for c in report["checks"])
    write(FAIL if failed else "running", [])

    rows: list[dict] = []
    left = deadline - time.monotonic() - 20  # 20 s for the reports after it
    json_path = out / "bench.json"
    if args.skip_sweep:
        report["checks"].append(check("sweep", NA, "skipped (--skip-sweep)"))
    elif left < args.min_sweep_s:
        report["checks"].append(check("sweep", INCOMPLETE, f"not started: {left:.0f} s left of the budget"))
    else:
        run = run_sweep(args, json_path, left)
        bench, rows = sweep_rows(json_path)
        status, detail = judge_sweep(run, rows)
        report["sweep"] = dict(run, json="bench.json", logs=copy_service_logs(bench, out),
                               config=(bench or {}).get("config", {}), model=(bench or {}).get("model"),
                               mode_seconds=(bench or {}).get("mode_seconds"),
                               peak_gpu_memory_GiB=(bench or {}).get("peak_gpu_memory_GiB"),
                               service=(bench or {}).get("service"))
        report["checks"].append(check("sweep", status, detail))
    statuses = [c["status"] for c in report["checks"]]
    verdict = FAIL if FAIL in statuses else INCOMPLETE if INCOMPLETE in statuses else PASS
    write(verdict, rows)
    print("", flush=True)
    print((out / "gpu-check.md").read_text(), flush=True)
    print(f"gpu_check: {verdict} in {report['seconds']} s; reports in {out}", flush=True)
    return {PASS: 0, FAIL: 1, INCOMPLETE: 3}[verdict]


if __name__ == "__main__":
    sys.exit(main())
