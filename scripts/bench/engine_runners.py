"""Our engine (workers/engine) under a closed loop of c client threads: in this process (engine), or in a process
of its own as the service's worker runs it (engine_process)."""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import itertools
import os
import queue
import threading
import time
import traceback
import uuid
from typing import Optional

import torch

from scripts.bench.models import build_model, free_memory
from scripts.bench.report import Req, failure, summarize
from scripts.bench.workloads import (GREEDY, SAMPLING, engine_fields, max_tokens_of, output_lengths,
                                     requests_per_level)


# --- mode 3: our engine, in process

def engine_config(args, max_num_seqs: int):
    """EngineConfig(max_num_seqs=..., max_model_len=...) where workers/engine/config.py exists, else None."""
    if importlib.util.find_spec("workers.engine.config") is None:
        return None
    from workers.engine.config import EngineConfig
    names = {f.name for f in dataclasses.fields(EngineConfig)} if dataclasses.is_dataclass(EngineConfig) else set()
    wanted = dict(max_num_seqs=max_num_seqs, max_model_len=args.max_model_len)
    kwargs = {k: v for k, v in wanted.items() if not names or k in names}
    if args.kv_cache_tokens and "num_kv_blocks" in names:
        block = getattr(EngineConfig(), "block_size", 16)
        kwargs["num_kv_blocks"] = -(-args.kv_cache_tokens // block)
    return EngineConfig(**kwargs)


def engine_closed_loop(engine, c: int, n: int, prompts, out_len: list[int] | int, timeout: float,
                       sampling: str = GREEDY) -> list[Req]:
    """c client threads, each submitting its next request when the previous one ends, until n are done. Request i
    samples with the workload `sampling` and seed i (and its output controls: a grammar, logprobs), and asks for
    out_len tokens (or out_len[i])."""
    from workers.engine.engine import EngineRequest
    from workers.engine.sampling import SamplingParams

    controls = engine_fields(sampling)
    counter = itertools.count()
    lock = threading.Lock()
    reqs: list[Optional[Req]] = [None] * n
    tag = uuid.uuid4().hex[:6]

    def client() -> None:
        while True:
            with lock:
                i = next(counter)
            if i >= n:
                return
            prompt = prompts[i % len(prompts)]
            req = Req(start=time.perf_counter(), prompt_tokens=len(prompt))
            reqs[i] = req
            try:
                params = SamplingParams(**SAMPLING[sampling], seed=i)
                stream = engine.submit(EngineRequest(f"bench-{tag}-{c}-{i}", list(prompt), params,
                                                     max_tokens_of(out_len, i), **controls))
                finished = False
                while not finished:
                    outputs = stream.next_outputs(timeout=timeout)
                    finished = _take(req, outputs, time.perf_counter())
                req.end = time.perf_counter()
            except queue.Empty:
                req.error = f"no output within {timeout} s"
                engine.cancel(f"bench-{tag}-{c}-{i}")
            except Exception as exc:
                req.error = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=client, name=f"bench-client-{k}", daemon=True) for k in range(c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for r in reqs if r is not None]


def _take(req: Req, outputs, now: float) -> bool:
    """The tokens the outputs carry (the count produced, whatever --output-len: a grammar's row ends sooner)."""
    tokens = sum(len(o.token_ids) for o in outputs)
    if tokens:
        req.times.append(now)
        req.output_tokens += tokens
    last = outputs[-1]
    if last.finish_reason is not None:
        req.finish_reason = last.finish_reason
        if last.finish_reason in ("error", "cancelled"):
            req.error = f"{last.finish_reason}: {getattr(last, 'error', None)}"
        return True
    return False


def bench_engine(model, device, config):
    """The engine as the benchmark runs it: eos_token_id=-1, so no row ends on EOS and every unconstrained row
    makes --output-len tokens. A constrained row still ends by itself, with "stop", when its grammar is
    complete (the grammar knows the tokenizer's own EOS)."""
    from workers.engine.engine import Engine

    return Engine(model, device, eos_token_id=-1, **({"config": config} if config is not None else {}))


def build_engine_in_own_process(model_kind: str, device_name: str, config, torch_threads: int):
    """`engine_process`'s build step, run in the engine process (spawned: it must be a picklable module-level
    function): the model built as `build_model` builds it, the engine warmed up, the worker's torch threads."""
    if torch_threads:
        torch.set_num_threads(torch_threads)
    device = torch.device(device_name)
    model, _ = build_model(model_kind, device)
    engine = bench_engine(model, device, config)
    engine.warmup()
    return engine, dict(torch_threads=torch.get_num_threads(), pid=os.getpid())


def run_engine(model, device, args, levels, prompts, record, meta, mode: str = "engine") -> None:
    """`engine`: the engine in this process, with torch's default threads. `engine_process`: the engine in a
    process of its own, as the worker runs it (EngineProcess: same interface, outputs over a pipe)."""
    from workers.engine.process import EngineProcess

    config = engine_config(args, max(levels))
    started = time.perf_counter()
    try:
        if mode == "engine_process":
            engine = EngineProcess(functools.partial(build_engine_in_own_process, args.model, str(device), config,
                                                     args.service_torch_threads),
                                   start_timeout_s=args.service_start_timeout)
            threads = engine.info["torch_threads"]
        else:
            engine = bench_engine(model, device, config)
            threads = torch.get_num_threads()
        engine.warmup()
        for name in args.sampling:  # each workload's first steps pay its one-time costs here, untimed
            engine_closed_loop(engine, min(4, max(levels)), min(4, max(levels)), prompts, 8, args.request_timeout,
                               name)
    except Exception as exc:
        traceback.print_exc()
        for c, name in itertools.product(levels, args.sampling):
            record(failure("error", f"{type(exc).__name__}: {exc}", mode=mode, concurrency=c, sampling=name))
        return
    meta[mode] = dict(torch_threads=threads,
                      config=dataclasses.asdict(config) if config is not None else "default (no config.py)",
                      eos_token_id=-1, setup_and_warmup_s=round(time.perf_counter() - started, 2))
    try:
        # A level's workloads one after another, so that x greedy compares runs seconds apart.
        produced: dict[tuple[int, str], list[int]] = {}
        for c, name in itertools.product(levels, args.sampling):
            n = requests_per_level(args, c)
            out_len = output_lengths(name, args.output_len, {w: v for (at, w), v in produced.items() if at == c})
            reqs = engine_closed_loop(engine, c, n, prompts, out_len, args.request_timeout, name)
            produced[c, name] = [r.output_tokens for r in reqs]
            record(summarize(mode, c, reqs, args.output_len, dict(engine_stats=engine.stats()), sampling=name))
    finally:
        engine.shutdown()
        del engine
        free_memory(device)
