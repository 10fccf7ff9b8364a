"""The whole service over HTTP (API under gunicorn -> Redis/Celery -> a worker holding the model, started with
scripts/stack.py), under a closed loop of c streams from aiohttp or the official openai SDK. The worker serves the
tiny-random model (--model tiny, CPU), or the benchmark's own model on its device (--model mistral7b or tiny7b:
scripts/bench/service_worker.py)."""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from scripts.bench import ROOT
from scripts.bench.report import Req, failure, say, summarize
from scripts.bench.workloads import (GREEDY, max_tokens_of, output_lengths, request_fields, requests_per_level,
                                     text_prompts)


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


async def service_closed_loop(base_url: str, texts: list[str], c: int, n: int, out_len: list[int] | int,
                              timeout: float, client_kind: str = "aiohttp", sampling: str = GREEDY,
                              system: Optional[str] = None) -> list[Req]:
    """c clients, each sending its next streamed request when the previous one ends, until n are done. Request i
    samples with the workload `sampling` and seed i, and sends its output controls (response_format, logprobs and
    top_logprobs) as they are: both clients take the same body. max_tokens is out_len (or out_len[i]). With
    `system`, every request starts with that system message (the shared prefix of --shared-prefix)."""
    from config.settings import SERVED_MODEL_ID

    counter = itertools.count()
    reqs: list[Optional[Req]] = [None] * n
    one = _aiohttp_client if client_kind == "aiohttp" else _openai_client
    send, close = await one(base_url, c, timeout)

    async def client_loop() -> None:
        while (i := next(counter)) < n:
            reqs[i] = req = Req(start=time.perf_counter())
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": texts[i % len(texts)]}]
            try:
                await send(req, dict(model=SERVED_MODEL_ID, messages=messages, max_tokens=max_tokens_of(out_len, i),
                                     **request_fields(sampling), seed=i, stream=True,
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
    """A chunk's arrival (when it carries text) and finish reason; the output tokens from its usage (the count the
    service produced: a json_schema reply ends when its JSON is complete, before max_tokens)."""
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
    """Greedy from --service-client at every level: the rows compared with the engine. Then each --service-sampling
    workload from the same client at the highest level (defaults, and the output controls beside it for
    x defaults). Then each --service-sdk-sampling workload from the official SDK at concurrency 1 and the highest
    level: its x c=1 is what batching gives a client as users run it. A (client, workload) named twice runs
    once, at the union of its levels."""
    top = max(args.levels)
    wanted = ([(args.service_client, GREEDY, set(args.levels))]
              + [(args.service_client, name, {top}) for name in getattr(args, "service_sampling", ())]
              + [("openai", name, {1, top}) for name in args.service_sdk_sampling])
    levels: dict[tuple[str, str], set] = {}
    for client, name, at in wanted:
        levels.setdefault((client, name), set()).update(at)
    return [ServiceSeries(client, name, tuple(sorted(at))) for (client, name), at in levels.items()]


def redis_profile(closed_loop, client, run: ServiceSeries, c: int, args) -> dict:
    """--redis-profile: the greedy row at the highest level once more (untimed, uncounted), every command Redis
    runs logged, and where its time went per job (scripts/bench/redis_cost.py: CommandLog)."""
    from scripts.bench.redis_cost import CommandLog, describe_log

    log = CommandLog(client)
    log.start()
    try:
        rows = closed_loop(run, c, requests_per_level(args, c), args.output_len)
    finally:
        groups = log.read()
    jobs = len([r for r in rows if not r.error])
    for line in describe_log(groups, jobs):
        say(line)
    return dict(jobs=jobs, output_len=args.output_len,
                groups={name: dict(calls=calls, usec=usec) for name, (calls, usec) in groups.items()})


def redis_capacity(closed_loop, redis_cost, run: ServiceSeries, c: int, args, reqs: list[Req], used) -> dict:
    """The capacity model (scripts/bench/capacity.py): the greedy row at the highest level again, with
    SHORT_OUTPUT_LEN tokens per request, and a fit of both rows' Redis CPU to per job and per token."""
    from scripts.bench.capacity import SHORT_OUTPUT_LEN, describe, fit, plan

    def measured(rows: list[Req], usage) -> dict:
        done = [r for r in rows if not r.error]
        return dict(jobs=len(done), tokens=sum(r.output_tokens for r in done), cpu_s=usage.cpu_s,
                    requests=usage.requests)

    before = redis_cost.read()
    short = closed_loop(run, c, requests_per_level(args, c), SHORT_OUTPUT_LEN)
    short_used = redis_cost.read() - before
    rows = dict(long=measured(reqs, used), short=measured(short, short_used))
    model = fit(rows["long"], rows["short"])
    if model is None:
        say(f"redis capacity: no fit from {rows} (noise larger than the difference)")
        return dict(rows=rows, fit=None)
    model.update(concurrency=c, long_len=args.output_len, short_len=SHORT_OUTPUT_LEN)
    # Jobs as long as this run's, and as long as a chat answer; at the 8,000 tok/s per GPU this project
    # targets, for a 16-GPU deployment.
    plans = [plan(model["per_job_us"], model["per_token_us"], length, worker_tok_s=8000, gpus=16)
             for length in dict.fromkeys((args.output_len, 512))]
    for line in describe(model, plans):
        say(line)
    return dict(rows=rows, fit=model, plans=plans)


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

    if model_kind == "tiny" and device.type != "cpu":
        return unavailable("the worker's tiny-random model (MODEL_SOURCE=tiny-random) runs on CPU: use --device cpu, "
                           "or --model mistral7b / tiny7b on this device")
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
    served = (dict(MODEL_SOURCE=env["MODEL_SOURCE"]) if model_kind == "tiny" else
              dict(model=f"{model_kind} on {device} (scripts/bench/service_worker.py: build_model, as the engine "
                         "modes)"))
    meta["service"] = dict(served, MAX_NUM_SEQS=max_c, WORKER_CONCURRENCY=max_c,
                           MAX_MODEL_LEN=args.max_model_len, workers=1,
                           api=f"gunicorn, {API_PROCESSES} gevent workers (as the Procfile)",
                           redis_url=redis_url, logs=str(log_dir))
    started = time.perf_counter()
    try:
        worker_env = {"MAX_NUM_SEQS": str(max_c)}
        if args.service_torch_threads:
            worker_env["TORCH_THREADS"] = str(args.service_torch_threads)
        if model_kind == "tiny":
            stack.start_worker(concurrency=max_c, extra_env=worker_env)
        else:
            from scripts.bench.service_worker import start_bench_worker
            start_bench_worker(stack, model_kind, device, max_c, worker_env)
        stack.start_api(processes=API_PROCESSES)
        stack.wait_ready(timeout=args.service_start_timeout)
        meta["service"]["start_s"] = round(time.perf_counter() - started, 1)
        say(f"service: ready in {meta['service']['start_s']} s at {stack.base_url} (logs in {log_dir})")

        def closed_loop(run: ServiceSeries, c: int, n: int, out_len: list[int] | int) -> list[Req]:
            return asyncio.run(service_closed_loop(stack.base_url, texts, c, n, out_len, args.request_timeout,
                                                   run.client, run.sampling))

        import redis

        from scripts.bench.redis_cost import RedisCost, per_work
        redis_cost = RedisCost(redis.Redis.from_url(redis_url))
        prompt_lens = []
        produced: dict[tuple[str, int, str], list[int]] = {}  # (client, c, workload) -> tokens per request
        for run in runs:
            # Untimed: the service's and this client's first requests pay one-time costs; at the highest level,
            # so that the API's connection pools (to Redis, to the broker) have grown before anything is timed
            # or counted (a new connection costs Redis more than a round trip).
            bad = [r.error for r in closed_loop(run, max_c, max_c, 8) if r.error]
            if bad:
                raise RuntimeError(f"warm-up requests failed ({run.client}, {run.sampling}): {bad[0]}")
            for c in run.levels:
                here = {w: v for (client, at, w), v in produced.items() if (client, at) == (run.client, c)}
                out_len = output_lengths(run.sampling, args.output_len, here)
                before = redis_cost.read()
                reqs = closed_loop(run, c, requests_per_level(args, c), out_len)
                used = redis_cost.read() - before
                produced[run.client, c, run.sampling] = [r.output_tokens for r in reqs]
                prompt_lens += [r.prompt_tokens for r in reqs if r.prompt_tokens]
                cost = per_work(used, tokens=sum(r.output_tokens for r in reqs), events=sum(len(r.times) for r in reqs))
                if run.sampling == GREEDY and c == max_c and run.client == args.service_client:
                    meta.setdefault("redis_capacity", []).append(  # one per round
                        redis_capacity(closed_loop, redis_cost, run, c, args, reqs, used))
                    if args.redis_profile:
                        meta.setdefault("redis_profile", []).append(  # one per round
                            redis_profile(closed_loop, redis_cost.client, run, c, args))
                record(summarize("service", c, reqs, args.output_len,
                                 dict(note="output tokens from usage; ITL per SSE chunk; redis_*: the whole Redis "
                                           "server's CPU and commands over the row, per output token and per SSE "
                                           "chunk with text (scripts/bench/redis_cost.py)", **cost),
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
