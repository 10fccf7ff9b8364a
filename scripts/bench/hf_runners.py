"""The Hugging Face baselines: `model.generate()` one request at a time (hf_generate), and transformers' own
continuous batching, `model.generate_batch()` with all c requests at once (hf_generate_batch)."""
from __future__ import annotations

import dataclasses
import time

import torch

from scripts.bench.models import free_memory, sync
from scripts.bench.report import Req, failure, summarize


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
