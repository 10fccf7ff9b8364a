"""Serving benchmark: what `vllm bench serve` reports (TTFT, TPOT, ITL as mean/p50/p99, output tokens/s,
requests/s), over a sweep of concurrency levels, for five ways of generating with the same model:

  hf_generate        Hugging Face `model.generate()`, one request at a time (the baseline): for concurrency c,
                     c requests back to back (at most --hf-max-requests: 8 on CPU, 4 on CUDA); tokens
                     timestamped by a streamer.
  hf_generate_batch  transformers' own continuous batching, `model.generate_batch()` with all c requests at once.
  engine             our engine in this process (workers/engine): a closed loop that keeps c requests in flight
                     until N = max(--waves × c, --num-prompts) are done.
  engine_process     the same engine as the service's worker runs it: in a process of its own (workers/engine/
                     process.py) with the worker's torch threads (--service-torch-threads), the client threads
                     in this process. The service's ratio to it is the cost of HTTP, Redis and Celery alone.
  service            the whole service over HTTP (API under gunicorn -> Redis/Celery -> a worker holding the
                     tiny model), started with scripts/stack.py, with c concurrent streams, N requests in all:
                     greedy from an aiohttp client (--service-client), and t1.0 from the official openai SDK at
                     concurrency 1 and the highest level (--service-sdk-sampling).

Each row runs one sampling workload. The engine modes run --sampling's at every level (default greedy, defaults,
t0.7-p0.9 and penalties: x greedy compares each with greedy); the hf_generate modes stay greedy, the baseline:
  greedy      temperature 0
  defaults    the docs' defaults: temperature 0.3, top_p 1 (what a request gets when it names none)
  t0.7-p0.9   temperature 0.7, top_p 0.9
  penalties   the docs' defaults with frequency_penalty 0.5 and presence_penalty 0.5
  t1.0        temperature 1.0, top_p 1
Request i of a level has seed i: each request draws its own random stream, as distinct users' requests do.

    python -m scripts.bench                        # CPU: tiny model, 128 in / 128 out, concurrency 1,8,32
    python -m scripts.bench --quick                # a smoke run (small sizes)
    python -m scripts.bench --sampling greedy --service-sdk-sampling ''   # greedy rows only
    python -m scripts.bench --device cuda          # GPU: random-weight Mistral-7B v0.2 shape in NF4, 1..256
    python -m scripts.bench --model tiny7b --modes hf_generate,engine --quick   # the GPU code path, tiny, on CPU

Output lengths are forced so every path does the same work: `min_new_tokens` for generate, EOS disabled for
generate_batch and the engine (eos_token_id=-1). The service cannot be told to ignore EOS: a random-weight model
rarely emits it, but if it does the request ends early; its output tokens are counted from the usage the
stream reports (stream_options.include_usage), and the number of short requests is reported.

Metrics follow vLLM's definitions: TTFT = first output - request start; TPOT = (latency - TTFT) / (tokens - 1)
per request; ITL = time between consecutive outputs of a request (an SSE chunk or an engine output, which may
carry more than one token); throughputs = totals / (last request end - first request start). Every throughput
is also given as a ratio to hf_generate's tokens/s, the service's to the engine's (same workload, same
concurrency), each sampled row's to its greedy row (same mode, same concurrency: x greedy) and each row's to
its own series at concurrency 1 (x c=1, the gain from batching). A table is printed and JSON written (default
bench-results/bench-<device>-<time>.json).

CPU timings on a small shared machine move by 20% from one run to the next, so on CPU every mode runs
--rounds times (3), interleaved (round 1: every mode, round 2: every mode...). Ratios are taken within a
round, and the table shows each row's median round, with the median ratios and the spread of tokens/s.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import gc
import importlib.util
import itertools
import json
import logging
import math
import os
import platform
import queue
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
MODES = ("hf_generate", "hf_generate_batch", "engine", "engine_process", "service")
GPU_DEFAULT_MODES = ("hf_generate", "hf_generate_batch", "engine")  # the service serves the tiny model on CPU only
MODELS = ("tiny", "mistral7b", "tiny7b")

# Mistral-7B-Instruct-v0.2's shape (random weights: its cost per token is the real model's), and a tiny stand-in
# built by the same code, so the GPU path can be tried on a CPU.
MISTRAL_7B_V02_SHAPE = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                            rope_theta=1e6, sliding_window=None, bos_token_id=1, eos_token_id=2,
                            tie_word_embeddings=False)
TINY_7B_SHAPE = dict(MISTRAL_7B_V02_SHAPE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)



def workload(temperature: float, top_p: float = 1.0, frequency_penalty: float = 0.0,
             presence_penalty: float = 0.0) -> dict:
    """A workload's settings, every field spelled out (for the JSON). OpenAI's names: they are both the request
    body's fields and SamplingParams' arguments."""
    return dict(temperature=temperature, top_p=top_p, frequency_penalty=frequency_penalty,
                presence_penalty=presence_penalty)


# The sampling workloads (--sampling). `defaults` is what a request gets when it names no sampling field
# (app/protocol.py); the speed claims name one of these.
SAMPLING = {
    "greedy": workload(0.0),
    "defaults": workload(0.3),
    "t0.7-p0.9": workload(0.7, top_p=0.9),
    "penalties": workload(0.3, frequency_penalty=0.5, presence_penalty=0.5),
    "t1.0": workload(1.0),
}
DEFAULT_SAMPLING = ("greedy", "defaults", "t0.7-p0.9", "penalties")  # the engine modes' rows
DEFAULT_SERVICE_SDK_SAMPLING = ("t1.0",)
GREEDY = "greedy"

PROMPT_SEED = 1234
# Plain words for the service's text prompts (most are one token each for the Mistral tokenizer).
WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no will can more other time "
         "some what only into could may then first any new these two like do over such our man me even most "
         "made after also did many before must through back years where much your way well down should because "
         "each just those people how too little state good very make world still own see men work long get here "
         "between both life being under never day same another know while last might us great old year off come "
         "since against go came right used take three").split()

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
               finish_reasons=reasons, short_requests=sum(1 for r in done if r.output_tokens < target_output))
    row.update(extra or {})
    return row


# --- environment

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-") or "cuda"


def versions() -> dict:
    out = dict(python=platform.python_version(), torch=torch.__version__)
    for name in ("transformers", "bitsandbytes", "openai", "aiohttp"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = None
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def environment(device: torch.device) -> dict:
    env = dict(device=str(device), device_name=device_name(device), cpu_count=os.cpu_count(),
               cpus_usable=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
               torch_threads=torch.get_num_threads(), platform=platform.platform(), versions=versions())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu_memory_GiB=round(props.total_memory / 2**30, 1), gpu_sm_count=props.multi_processor_count)
    return env


def bnb_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# --- the model

def quantize_nf4(model, device: torch.device) -> None:
    """Replace every linear of the decoder layers by a bitsandbytes NF4 Linear4bit (bf16 compute, double-quantized
    statistics), as transformers' BitsAndBytesConfig(load_in_4bit, nf4, double quant) would; lm_head stays bf16."""
    import bitsandbytes as bnb
    import torch.nn as nn

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if not isinstance(linear, nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(linear.weight.data.to("cpu"), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True, module=q).to(device)
                if linear.bias is not None:
                    q.bias = torch.nn.Parameter(linear.bias.data.to(device), requires_grad=False)
                setattr(parent, name, q)
                del linear
    free_memory(device)


def build_model(kind: str, device: torch.device):
    """(model, description). tiny: the service's tiny-random model (float32). mistral7b: random weights in
    Mistral-7B-v0.2's shape, bf16 built on the device, then NF4 where CUDA and bitsandbytes are present. tiny7b:
    the mistral7b code path with a tiny shape."""
    started = time.perf_counter()
    if kind == "tiny":
        from workers.model_loader import build_tiny_random
        model = build_tiny_random(device=str(device))
        return model, dict(model="tiny-random (workers.model_loader.build_tiny_random)", dtype="float32",
                           weights="float32", build_s=round(time.perf_counter() - started, 2))
    from transformers import MistralConfig, MistralForCausalLM

    shape = MISTRAL_7B_V02_SHAPE if kind == "mistral7b" else TINY_7B_SHAPE
    config = MistralConfig(**shape)
    default_dtype = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.eval()
    sync(device)
    info = dict(model=f"random-weight Mistral ({kind}: hidden {shape['hidden_size']}, "
                      f"{shape['num_hidden_layers']} layers, {shape['num_attention_heads']} heads, "
                      f"{shape['num_key_value_heads']} KV heads, MLP {shape['intermediate_size']})",
                dtype="bfloat16", init_s=round(time.perf_counter() - started, 2),
                params_B=round(sum(p.numel() for p in model.parameters()) / 1e9, 4))
    if device.type == "cuda" and bnb_available():
        started = time.perf_counter()
        quantize_nf4(model, device)
        info.update(weights="bitsandbytes NF4 (compress_statistics, bf16 compute)",
                    quantize_s=round(time.perf_counter() - started, 2),
                    weights_GiB=round(torch.cuda.memory_allocated(device) / 2**30, 2))
    else:
        why = "not on CUDA" if device.type != "cuda" else "bitsandbytes is not importable"
        info.update(weights=f"bf16 (no NF4: {why})")
        if device.type == "cuda":
            say(f"WARNING: {why}: the model stays bf16, not NF4")
    return model, info


def token_prompts(count: int, length: int) -> list[list[int]]:
    """Deterministic random token ids in [100, 32000)."""
    generator = torch.Generator().manual_seed(PROMPT_SEED)
    return torch.randint(100, 32000, (count, length), generator=generator).tolist()


def text_prompts(count: int, length: int) -> list[str]:
    """Deterministic texts whose chat-formatted prompt (the API's tokenization) is about `length` tokens."""
    from jobs.chat_format import Message, encode_conversation

    def tokens(words: list[str]) -> int:
        return len(encode_conversation([Message("user", " ".join(words))]))

    texts = []
    for i in range(count):
        rng = random.Random(PROMPT_SEED + i)
        pool = [f"Request {i}:"] + [rng.choice(WORDS) for _ in range(2 * length + 16)]
        n = max(1, length - 8)
        for _ in range(12):  # a few corrections by the difference converge (words are ~1 token each)
            diff = length - tokens(pool[:n])
            if diff == 0:
                break
            n = min(len(pool), max(1, n + diff))
        texts.append(" ".join(pool[:n]))
    return texts


# --- mode 1: model.generate(), one request at a time

class TokenClock:
    """A streamer for generate(): put() gets the prompt first, then each new token; we timestamp the tokens."""

    def __init__(self):
        self.times: list[float] = []
        self.tokens = 0
        self._prompt_seen = False

    def put(self, value) -> None:
        now = time.perf_counter()
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(now)
        self.tokens += 1

    def end(self) -> None:
        pass


@torch.inference_mode()
def hf_generate_one(model, device, prompt: list[int], out_len: int) -> Req:
    ids = torch.tensor([prompt], device=device)
    clock = TokenClock()
    req = Req(start=time.perf_counter(), prompt_tokens=len(prompt))
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=out_len,
                         min_new_tokens=out_len, do_sample=False, pad_token_id=0, streamer=clock)
    sync(device)
    req.end = time.perf_counter()
    req.times = clock.times
    req.output_tokens = int(out.shape[1] - ids.shape[1])
    req.finish_reason = "length" if req.output_tokens >= out_len else "stop"
    return req


def run_hf_generate(model, device, args, levels, prompts, record) -> None:
    try:
        for _ in range(2):  # warm-up: first calls pay one-time costs
            hf_generate_one(model, device, prompts[0], min(8, args.output_len))
    except Exception as exc:
        for c in levels:
            record(failure("error", f"{type(exc).__name__}: {exc}", mode="hf_generate", concurrency=c))
        return
    for c in levels:
        n = min(c, args.hf_max_requests) if args.hf_max_requests else c
        reqs = []
        for i in range(n):
            try:
                reqs.append(hf_generate_one(model, device, prompts[i], args.output_len))
            except Exception as exc:
                reqs.append(Req(start=time.perf_counter(), error=f"{type(exc).__name__}: {exc}"))
        record(summarize("hf_generate", c, reqs, args.output_len, dict(note=f"{n} requests one after another")))


# --- mode 2: transformers' continuous batching, generate_batch()

def hf_batch_cache_config(args, c: int):
    """With --hf-batch-cache sized (the CPU default): a paged cache of just the blocks these c requests need.
    transformers' default sizes it from free memory, which on a CPU means allocating many GiB and ~10-40 s of
    set-up per call (outside the timed window either way). None: transformers' defaults (the CUDA default, as in
    the GPU anchor numbers)."""
    if args.hf_batch_cache != "sized":
        return None
    try:
        from transformers import ContinuousBatchingConfig
    except ImportError:
        return None
    names = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)} \
        if dataclasses.is_dataclass(ContinuousBatchingConfig) else set()
    if "num_blocks" not in names:
        return None
    page = getattr(ContinuousBatchingConfig(), "page_size", None) or 256
    return ContinuousBatchingConfig(num_blocks=c * -(-(args.input_len + args.output_len) // page) + 4)


def run_hf_generate_batch(model, device, args, levels, prompts, record) -> None:
    from transformers import GenerationConfig

    for c in levels:
        inputs = prompts[:c]
        try:
            config = GenerationConfig(max_new_tokens=args.output_len, do_sample=False, pad_token_id=0,
                                      eos_token_id=-1)  # -1: EOS disabled, every request runs output_len tokens
            kwargs = dict(generation_config=config)
            cache = hf_batch_cache_config(args, c)
            if cache is not None:
                kwargs["continuous_batching_config"] = cache
            call_start = time.perf_counter()
            try:
                outs = model.generate_batch(inputs=inputs, record_timestamps=True, **kwargs)
                timestamps = True
            except TypeError as exc:  # older transformers: no per-token timestamps
                if "record_timestamps" not in str(exc):
                    raise
                call_start = time.perf_counter()
                outs = model.generate_batch(inputs=inputs, **kwargs)
                timestamps = False
            sync(device)
            call_end = time.perf_counter()
        except Exception as exc:
            record(failure("unavailable", f"{type(exc).__name__}: {str(exc)[:500]}", mode="hf_generate_batch",
                           concurrency=c))
            continue
        reqs = []
        for out, prompt in zip(outs.values(), inputs):
            created = getattr(out, "created_time", None)
            times = list(getattr(out, "timestamps", None) or []) if timestamps else []
            lifespan = getattr(out, "lifespan", (-1, -1))
            req = Req(start=created if created is not None else call_start, times=times,
                      prompt_tokens=len(prompt), output_tokens=len(out.generated_tokens))
            req.end = times[-1] if times else (lifespan[1] if lifespan and lifespan[1] > 0 else call_end)
            status = getattr(out, "status", None)
            req.finish_reason = getattr(status, "name", str(status)).lower() if status is not None else None
            if getattr(out, "error", None):
                req.error = str(out.error)
            reqs.append(req)
        missing = len(inputs) - len(reqs)
        reqs += [Req(start=call_start, error="no result (generate_batch ended early)") for _ in range(missing)]
        tokens = sum(r.output_tokens for r in reqs)
        extra = dict(call_s=call_end - call_start, call_output_tok_s=tokens / (call_end - call_start),
                     paged_cache=args.hf_batch_cache,
                     note="times from each request's creation (after the manager's set-up and warm-up); "
                          "call_s includes them" + ("" if timestamps else "; no per-token timestamps here"))
        record(summarize("hf_generate_batch", c, reqs, args.output_len, extra))
        free_memory(device)


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


def engine_closed_loop(engine, c: int, n: int, prompts, out_len: int, timeout: float,
                       sampling: str = GREEDY) -> list[Req]:
    """c client threads, each submitting its next request when the previous one ends, until n are done. Request i
    samples with the workload `sampling` and seed i."""
    from workers.engine.engine import EngineRequest
    from workers.engine.sampling import SamplingParams

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
                stream = engine.submit(EngineRequest(f"bench-{tag}-{c}-{i}", list(prompt), params, out_len))
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


def requests_per_level(args, c: int) -> int:
    return max(args.waves * c, args.num_prompts)


def build_engine_in_own_process(model_kind: str, device_name: str, config, torch_threads: int):
    """`engine_process`'s build step, run in the engine process (spawned: it must be a picklable module-level
    function): the model built as `build_model` builds it, the engine warmed up, the worker's torch threads."""
    from workers.engine.engine import Engine

    if torch_threads:
        torch.set_num_threads(torch_threads)
    device = torch.device(device_name)
    model, _ = build_model(model_kind, device)
    engine = Engine(model, device, eos_token_id=-1, **({"config": config} if config is not None else {}))
    engine.warmup()
    return engine, dict(torch_threads=torch.get_num_threads(), pid=os.getpid())


def run_engine(model, device, args, levels, prompts, record, meta, mode: str = "engine") -> None:
    """`engine`: the engine in this process, with torch's default threads. `engine_process`: the engine in a
    process of its own, as the worker runs it (EngineProcess: same interface, outputs over a pipe)."""
    from workers.engine.engine import Engine
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
            engine = Engine(model, device, eos_token_id=-1, **({"config": config} if config is not None else {}))
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
        for c, name in itertools.product(levels, args.sampling):
            n = requests_per_level(args, c)
            reqs = engine_closed_loop(engine, c, n, prompts, args.output_len, args.request_timeout, name)
            record(summarize(mode, c, reqs, args.output_len, dict(engine_stats=engine.stats()), sampling=name))
    finally:
        engine.shutdown()
        del engine
        free_memory(device)


# --- mode 4: the whole service over HTTP

def find_redis(url: str) -> str:
    """The URL of a Redis that answers: `url`, or the one scripts/ensure_redis.sh starts (local only)."""
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
        return url
    except Exception:
        pass
    say(f"service: no Redis answers at {url}; asking scripts/ensure_redis.sh for one")
    done = subprocess.run([str(ROOT / "scripts" / "ensure_redis.sh"), "--print-url", "--fallback-port"],
                          env={**os.environ, "REDIS_URL": url}, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"no Redis: {done.stderr.strip()[-500:]}")
    return done.stdout.strip().splitlines()[-1]


async def service_closed_loop(base_url: str, texts: list[str], c: int, n: int, out_len: int,
                              timeout: float, client_kind: str = "aiohttp", sampling: str = GREEDY) -> list[Req]:
    """c clients, each sending its next streamed request when the previous one ends, until n are done. Request i
    samples with the workload `sampling` and seed i."""
    from config.settings import SERVED_MODEL_ID

    counter = itertools.count()
    reqs: list[Optional[Req]] = [None] * n
    one = _aiohttp_client if client_kind == "aiohttp" else _openai_client
    send, close = await one(base_url, c, timeout)

    async def client_loop() -> None:
        while (i := next(counter)) < n:
            reqs[i] = req = Req(start=time.perf_counter())
            messages = [{"role": "user", "content": texts[i % len(texts)]}]
            try:
                await send(req, dict(model=SERVED_MODEL_ID, messages=messages, max_tokens=out_len,
                                     **SAMPLING[sampling], seed=i, stream=True,
                                     stream_options={"include_usage": True}))
            except Exception as exc:
                cause = exc.__cause__ or exc.__context__
                req.error = f"{type(exc).__name__}: {str(exc)[:300]}" + (
                    f" ({type(cause).__name__}: {str(cause)[:200]})" if cause is not None else "")

    try:
        await asyncio.gather(*(client_loop() for _ in range(c)))
    finally:
        await close()
    return [r for r in reqs if r is not None]


def _record_chunk(req: Req, chunk: dict, now: float) -> None:
    if chunk.get("choices"):
        choice = chunk["choices"][0]
        if (choice.get("delta") or {}).get("content"):
            req.times.append(now)
        if choice.get("finish_reason"):
            req.finish_reason = choice["finish_reason"]
    if chunk.get("usage"):
        req.output_tokens = chunk["usage"]["completion_tokens"]
        req.prompt_tokens = chunk["usage"]["prompt_tokens"]


async def _aiohttp_client(base_url: str, c: int, timeout: float):
    """aiohttp and json, as vLLM's serving benchmark: the client shares the machine with the service, so its
    own CPU per SSE chunk should be small (half of httpx's, measured here)."""
    import aiohttp

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=c + 8),
                                    timeout=aiohttp.ClientTimeout(total=timeout, connect=30))

    async def send(req: Req, body: dict) -> None:
        async with session.post(base_url + "/v1/chat/completions", json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {(await response.read())[:200]!r}")
            async for line in response.content:  # one SSE line at a time
                if not line.startswith(b"data: {"):
                    continue
                now = time.perf_counter()
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(str(chunk["error"])[:300])
                _record_chunk(req, chunk, now)
        _ended(req)

    return send, session.close


async def _openai_client(base_url: str, c: int, timeout: float):
    """The official openai SDK (heavier per chunk: pydantic objects)."""
    import httpx
    from openai import AsyncOpenAI

    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=c + 8), timeout=httpx.Timeout(timeout, connect=30))
    client = AsyncOpenAI(base_url=base_url + "/v1", api_key="bench", max_retries=0, http_client=http)

    async def send(req: Req, body: dict) -> None:
        async for chunk in await client.chat.completions.create(**body):
            _record_chunk(req, chunk.model_dump(), time.perf_counter())
        _ended(req)

    async def close() -> None:
        await client.close()
        await http.aclose()

    return send, close


def _ended(req: Req) -> None:
    req.end = time.perf_counter()
    if not req.output_tokens:
        req.error = "the stream carried no usage chunk"


API_PROCESSES = 2  # the Procfile's `web` line (what `make run` starts)


@dataclass(frozen=True)
class ServiceSeries:
    """One line of service rows: its client, its sampling workload and the levels it runs at."""
    client: str
    sampling: str
    levels: tuple[int, ...]


def service_series(args) -> list[ServiceSeries]:
    """Greedy from --service-client at every level: the rows compared with the engine. Then each
    --service-sdk-sampling workload from the official SDK at concurrency 1 and the highest level: its x c=1 is
    what batching gives a client as users run it."""
    sdk_levels = tuple(sorted({1, max(args.levels)}))
    return ([ServiceSeries(args.service_client, GREEDY, tuple(args.levels))]
            + [ServiceSeries("openai", name, sdk_levels) for name in args.service_sdk_sampling])


def run_service(model_kind, device, args, record, meta) -> None:
    runs = service_series(args)
    pending = [(run, c) for run in runs for c in run.levels]  # the rows this round still owes

    def fail_pending(status: str, reason: str) -> None:
        for run, c in pending:
            record(failure(status, reason, mode="service", concurrency=c, sampling=run.sampling, client=run.client))
        pending.clear()

    def unavailable(reason: str) -> None:
        say(f"service: unavailable: {reason}")
        fail_pending("unavailable", reason)

    if model_kind != "tiny" or device.type != "cpu":
        return unavailable("the service mode runs the worker's tiny-random model on CPU (MODEL_SOURCE=tiny-random): "
                           "use --model tiny --device cpu")
    try:
        from scripts.stack import DEFAULT_REDIS_URL, Stack, stack_env
        redis_url = find_redis(DEFAULT_REDIS_URL)
        texts = text_prompts(max(requests_per_level(args, c) for _, c in pending), args.input_len)
    except Exception as exc:
        return unavailable(f"{type(exc).__name__}: {exc}")
    max_c = max(c for _, c in pending)
    env = stack_env(redis_url=redis_url, max_model_len=args.max_model_len, MAX_NUM_SEQS=str(max_c),
                    WORKER_CONCURRENCY=str(max_c), SSE_KEEPALIVE_S="5")
    if args.kv_cache_tokens:
        env["KV_CACHE_TOKENS"] = str(args.kv_cache_tokens)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-stack-"))
    stack = Stack(env, log_dir)
    meta["service"] = dict(MODEL_SOURCE=env["MODEL_SOURCE"], MAX_NUM_SEQS=max_c, WORKER_CONCURRENCY=max_c,
                           MAX_MODEL_LEN=args.max_model_len, workers=1,
                           api=f"gunicorn, {API_PROCESSES} gevent workers (as the Procfile)",
                           redis_url=redis_url, logs=str(log_dir))
    started = time.perf_counter()
    try:
        worker_env = {"MAX_NUM_SEQS": str(max_c)}
        if args.service_torch_threads:
            worker_env["TORCH_THREADS"] = str(args.service_torch_threads)
        stack.start_worker(concurrency=max_c, extra_env=worker_env)
        stack.start_api(processes=API_PROCESSES)
        stack.wait_ready(timeout=args.service_start_timeout)
        meta["service"]["start_s"] = round(time.perf_counter() - started, 1)
        say(f"service: ready in {meta['service']['start_s']} s at {stack.base_url} (logs in {log_dir})")

        def closed_loop(run: ServiceSeries, c: int, n: int, out_len: int) -> list[Req]:
            return asyncio.run(service_closed_loop(stack.base_url, texts, c, n, out_len, args.request_timeout,
                                                   run.client, run.sampling))

        prompt_lens = []
        for run in runs:
            # Untimed: the service's and this client's first requests pay one-time costs.
            bad = [r.error for r in closed_loop(run, min(4, max_c), min(4, max_c), 8) if r.error]
            if bad:
                raise RuntimeError(f"warm-up requests failed ({run.client}, {run.sampling}): {bad[0]}")
            for c in run.levels:
                reqs = closed_loop(run, c, requests_per_level(args, c), args.output_len)
                prompt_lens += [r.prompt_tokens for r in reqs if r.prompt_tokens]
                record(summarize("service", c, reqs, args.output_len,
                                 dict(note="output tokens from usage; ITL per SSE chunk"),
                                 sampling=run.sampling, client=run.client))
                pending.remove((run, c))
        if prompt_lens:
            meta["service"]["prompt_tokens_mean"] = round(sum(prompt_lens) / len(prompt_lens), 1)
    except Exception as exc:
        traceback.print_exc()
        for name in ("worker", "api"):
            path = log_dir / f"{name}.log"
            if path.exists():
                say(f"--- tail of {path}\n" + "".join(path.read_text(errors="replace").splitlines(True)[-15:]))
        fail_pending("error", f"{type(exc).__name__}: {exc}")
    finally:
        stack.stop_all()
        try:
            stack.cleanup_redis()
        except Exception:
            pass


# --- report

RESULTS: list[dict] = []


ENGINE_MODES = ("engine", "engine_process")


def add_ratios(results: list[dict]) -> dict:
    """Within each round, a row's tokens/s over another row's in the same round:
      vs_hf_generate                every row: over hf_generate's (all its requests in the round)
      vs_engine, vs_engine_process  service rows: over that engine mode's row, same workload and concurrency
      vs_greedy                     sampled rows: over their mode's (and client's) greedy row, same concurrency
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
            if c != 1:
                r["vs_c1"] = over(r, (mode, client, sampling, 1))
    return dict(hf_generate_tok_s=overall, note="all hf_generate requests of this run: tokens / seconds")


RATIOS = ("vs_hf_generate", "vs_engine", "vs_engine_process", "vs_greedy", "vs_c1")


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
        for ratio in RATIOS:
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
)


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
            out.append(dict(what=what, value=row[ratio], target=least, met=row[ratio] >= least,
                            applies=device.type == "cpu"))
    return out


def describe(settings: dict) -> str:
    """A workload's settings, those not at OpenAI's neutral value: `temperature 0.7, top_p 0.9`."""
    neutral = dict(temperature=None, top_p=1.0, frequency_penalty=0.0, presence_penalty=0.0)
    return ", ".join(f"{k} {v:g}" for k, v in settings.items() if v != neutral[k])


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
    head = ["mode", "sampling", "conc", "reqs", "out tok/s", "req/s", "TTFT ms mean/p50/p99", "TPOT ms mean/p50/p99",
            "ITL ms mean/p50/p99", "x hf_gen", "x engine", "x engine_process", "x greedy", "x c=1",
            "rounds: tok/s min-max"]
    rows: list[list[str]] = []
    for r in results:
        names = [mode_label(r), r["sampling"], str(r["concurrency"])]
        if r.get("status") != "ok":  # one message in place of the numbers
            rows.append(names + [f"{r.get('status')}: {str(r.get('error'))[:160]}"])
            continue
        triple = lambda m: "/".join(fmt(r[m][k]) for k in ("mean", "p50", "p99"))  # noqa: E731
        reqs = f"{r['completed']}" + (f" ({r['failed']} failed)" if r["failed"] else "")
        if r.get("short_requests"):
            reqs += f" ({r['short_requests']} short)"
        rows.append(names + [reqs, fmt(r["output_tok_s"]), fmt(r["request_s"], 2), triple("ttft_ms"),
                             triple("tpot_ms"), triple("itl_ms")]
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


# --- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.bench", description=__doc__.split("\n\n")[0],
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
                        f"%(default)s; the hf_generate modes are greedy): a row each, beside greedy for x greedy")
    p.add_argument("--service-client", choices=("aiohttp", "openai"), default="aiohttp",
                   help="the client of the service's greedy rows: aiohttp (light, as vLLM's benchmark) or the "
                        "official openai SDK")
    p.add_argument("--service-sdk-sampling", default=",".join(DEFAULT_SERVICE_SDK_SAMPLING),
                   help="the service's rows from the official openai SDK, at concurrency 1 and the highest level "
                        "(for x c=1): their workloads, comma-separated (default %(default)s; '' for none)")
    p.add_argument("--service-torch-threads", type=int, default=1,
                   help="TORCH_THREADS for the service's worker and for engine_process (0 = torch's default). 1 by "
                        "default: on a small CPU machine the worker shares its cores with the API, Redis and this "
                        "client")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds one request may take")
    p.add_argument("--service-start-timeout", type=float, default=180.0)
    p.add_argument("--out", help="JSON path (default bench-results/bench-<device>-<time>.json); a directory "
                   "gets that file name inside it")
    p.add_argument("--waves", type=int, help="engine/service requests per level: at least this many times c, so "
                   "throughput is measured in steady state, not over one burst of c arrivals (default 4)")
    p.add_argument("--rounds", type=int, help="run every mode this many times, interleaved, and report each "
                   "row's median round (default 3 on CPU, 1 on CUDA and with --quick)")
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run: 32 in, 16 out, "
                   "concurrency 1,4, 4 prompts, 2 hf_generate requests")
    return p.parse_args(argv)


def resolve(args: argparse.Namespace, device: torch.device) -> None:
    cuda = device.type == "cuda"
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
    args.sampling = workload_names(args.sampling, "--sampling")
    args.service_sdk_sampling = workload_names(args.service_sdk_sampling, "--service-sdk-sampling")
    if not args.sampling:
        raise SystemExit("--sampling: name at least one workload")
    args.levels = sorted({int(c) for c in str(args.concurrency).split(",") if c.strip()})
    if not args.levels or min(args.levels) < 1:
        raise SystemExit("--concurrency: positive integers, comma-separated")
    if args.input_len + args.output_len > args.max_model_len:
        raise SystemExit("--input-len + --output-len must fit in --max-model-len")


def workload_names(text: str, option: str) -> list[str]:
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))  # once each, in order
    unknown = [name for name in names if name not in SAMPLING]
    if unknown:
        raise SystemExit(f"{option}: unknown workload(s) {unknown}; choose from {','.join(SAMPLING)}")
    return names


def sampling_meta(args) -> dict:
    """What the JSON says of sampling: each workload's settings, and which rows ran which."""
    used = dict.fromkeys([GREEDY, *args.sampling, *args.service_sdk_sampling])
    return dict(workloads={name: SAMPLING[name] for name in used}, seed="each request's index in its level",
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
        out = out / f"bench-{device_slug(device)}-{stamp}.json"

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
        name = f"  {mode_label(row):<17} {row['sampling']:<10} c={row['concurrency']:<4}"
        if row.get("status") == "ok":
            say(f"{name} {row['completed']} reqs  {row['output_tok_s']:.1f} out tok/s  "
                f"TTFT mean {fmt(row['ttft_ms']['mean'])} ms  TPOT mean {fmt(row['tpot_ms']['mean'])} ms  "
                f"({row['duration_s']:.1f} s)")
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
        meta["model"] = dict(model="tiny-random (served by the worker process)")
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
    say("sampling: " + "; ".join(f"{name} = {describe(SAMPLING[name])}" for name in shown)
        + "; each request's seed is its index")
    base = final["baseline"]["hf_generate_tok_s"]
    if base:
        say(f"baseline: hf_generate {base:.1f} output tok/s (x hf_gen divides by it)")
    for t in final["targets"]:
        say(f"target: {t['what']}: {t['value']:.2f} (target >= {t['target']}"
            f"{'' if t['applies'] else ', a CPU target'}): {'met' if t['met'] else 'NOT met'}")
    say(f"json: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
