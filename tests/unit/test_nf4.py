"""The 4-bit path on the CPU (issue 14, part 1): the real loader (`load_nf4`, `load_model` with MODEL_SOURCE=hf)
loads a tiny Mistral saved to a directory in NF4 (bitsandbytes >= 0.50 runs NF4 layers on the CPU), and the
engine's greedy tokens equal Hugging Face `generate()` on that same NF4 model, token for token (float32
compute): alone, batched with staggered arrivals, and through the static (CUDA-graph) decode path."""
from __future__ import annotations

import pytest
import torch

from config.settings import Settings
from tests.unit.test_engine import EOS, expected_greedy, finish_all, prompts_of, start, static_decode_tokens
from workers.engine.config import EngineConfig
from workers.engine.engine import Engine
from workers.model_loader import build_tiny_random, load_model, load_nf4

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random-weight Mistral saved as Hugging Face weights, as a real model directory would be."""
    path = tmp_path_factory.mktemp("tiny-mistral")
    build_tiny_random(seed=3).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def nf4_model(model_dir):
    return load_nf4(str(model_dir), torch.device("cpu"), torch.float32)


def test_the_loader_quantizes_every_projection_to_nf4(nf4_model):
    layers = [module for module in nf4_model.modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    assert all(layer.weight.quant_type == "nf4" and layer.weight.dtype == torch.uint8 for layer in layers)
    assert nf4_model.device.type == "cpu"


def test_model_source_hf_loads_the_directory_in_nf4_on_the_cpu(model_dir):
    loaded = load_model(Settings(model_source="hf", model_path=str(model_dir)))
    assert loaded.name == str(model_dir) and loaded.device == torch.device("cpu")
    assert "NF4" in loaded.reason and "float32" in loaded.reason
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.modules())


def test_engine_greedy_equals_generate_on_nf4_alone_and_batched(nf4_model):
    engine = Engine(nf4_model, torch.device("cpu"), eos_token_id=EOS, config=EngineConfig(num_kv_blocks=128))
    try:
        prompts = prompts_of([4, 40, 17, 90, 3, 23], seed=5)
        alone = start(engine, "alone", prompts[0], 24, temperature=0.0)
        finish_all([alone[2]])
        runs = []
        for i, prompt in enumerate(prompts[1:]):  # staggered: each arrives while the others decode
            runs.append(start(engine, f"b{i}", prompt, 24, temperature=0.0))
            runs[-1][1].wait(30)
        finish_all([thread for _, _, thread in runs])
    finally:
        engine.shutdown()
    assert alone[0]["tokens"] == expected_greedy(nf4_model, prompts[0], 24)
    for (result, _, _), prompt in zip(runs, prompts[1:]):
        assert result["tokens"] == expected_greedy(nf4_model, prompt, 24)


def test_static_decode_path_on_nf4_equals_generate(nf4_model):
    prompts = prompts_of([5, 33, 12], seed=6)
    assert static_decode_tokens(nf4_model, prompts, 20) == [expected_greedy(nf4_model, p, 20) for p in prompts]
