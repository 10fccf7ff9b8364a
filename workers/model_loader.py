"""Loading the model a worker serves: Mistral-7B-Instruct-v0.2 in 4 bits (NF4), or the built-in tiny model.

Called once per worker process, in the process that uses the model (CUDA cannot be used in a forked child
of a process that initialised it).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from transformers import MistralConfig, MistralForCausalLM

log = logging.getLogger(__name__)

TINY_RANDOM = "tiny-random"


@dataclass
class LoadedModel:
    model: MistralForCausalLM
    device: torch.device
    name: str          # "tiny-random" or the path/id the real weights came from
    reason: str        # why this model (for the one log line at start-up)


def tiny_mistral_config(max_position_embeddings: int = 32768, **overrides) -> MistralConfig:
    """A small Mistral with the real vocabulary and Mistral-7B v0.2's attention layout in miniature."""
    fields = dict(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=max_position_embeddings, rope_theta=1e6, sliding_window=None,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    fields.update(overrides)
    return MistralConfig(**fields)


def build_tiny_random(seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu",
                      **config_overrides) -> MistralForCausalLM:
    """Random weights from a fixed seed: every worker built this way holds the same model."""
    devices = torch.random.fork_rng(devices=[]) if device == "cpu" else torch.random.fork_rng()
    with devices:
        torch.manual_seed(seed)
        model = MistralForCausalLM(tiny_mistral_config(**config_overrides))
    return model.to(device=device, dtype=dtype).eval()


def load_nf4(path: str, device: torch.device, compute_dtype: torch.dtype) -> MistralForCausalLM:
    """The real weights (Hugging Face id or local directory), quantized to NF4 as they load, on `device`.
    bitsandbytes (>= 0.50) runs NF4 layers on the CPU too: that is how CI tests this path."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=compute_dtype,
                                                 device_map={"": str(device)})
    return model.eval()


def weights_available(path: str) -> bool:
    """A local directory with a config, or a Hugging Face id already in the local cache (we never download)."""
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "config.json"))
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(path, "config.json"), str)
    except Exception:  # malformed id, no cache: not available
        return False


def load_model(settings) -> LoadedModel:
    """MODEL_SOURCE=tiny-random: the built-in tiny model. auto: the real weights in NF4 where there is a CUDA
    device and the weights are here, else the tiny model. hf: the real weights in NF4 always, on the GPU if
    there is one (bf16 compute), else on the CPU (float32 compute: slow, but exactly the GPU's code path)."""
    source = settings.model_source
    if source == TINY_RANDOM:
        return _tiny("MODEL_SOURCE=tiny-random")
    cuda = torch.cuda.is_available()
    if source == "auto" and not (cuda and weights_available(settings.model_path)):
        why = "no CUDA device" if not cuda else f"no weights found at {settings.model_path!r}"
        return _tiny(f"MODEL_SOURCE=auto and {why}")
    device, compute_dtype = (torch.device("cuda", 0), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    model = load_nf4(settings.model_path, device, compute_dtype)
    return LoadedModel(model, device, settings.model_path,
                       f"MODEL_SOURCE={source}: NF4 4-bit on {device}, {str(compute_dtype).removeprefix('torch.')} compute")


def _tiny(reason: str) -> LoadedModel:
    return LoadedModel(build_tiny_random(), torch.device("cpu"), TINY_RANDOM, reason)
