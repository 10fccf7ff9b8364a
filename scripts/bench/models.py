"""What is benchmarked on: the device and its description for the JSON (name, CPUs, versions), and the models
(the service's tiny-random model; random-weight Mistral-7B v0.2 in NF4 on CUDA; tiny7b, its code path tiny)."""
from __future__ import annotations

import gc
import importlib.util
import os
import platform
import re
import time

import torch

from scripts.bench.report import say


MODELS = ("tiny", "mistral7b", "tiny7b")

# Mistral-7B-Instruct-v0.2's shape (random weights: its cost per token is the real model's), and a tiny stand-in
# built by the same code, so the GPU path can be tried on a CPU.
MISTRAL_7B_V02_SHAPE = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                            rope_theta=1e6, sliding_window=None, bos_token_id=1, eos_token_id=2,
                            tie_word_embeddings=False)
TINY_7B_SHAPE = dict(MISTRAL_7B_V02_SHAPE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)


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
