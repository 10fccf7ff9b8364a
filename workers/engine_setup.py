"""What the worker's engine process runs first (workers/engine/process.py): load the model and build its
engine. Its own module, so that the worker process can name it without importing torch."""
from __future__ import annotations

import time


def build_engine(settings, eos_token_id: int):
    """In the engine process (workers/engine/process.py): torch's threads, the model, its engine, warmed up
    (CUDA graphs are captured here on a GPU, never on a user's request). Returns (engine, facts to log)."""
    import torch

    from config.logging import setup_logging
    from workers.engine.config import EngineConfig
    from workers.engine.engine import Engine
    from workers.model_loader import load_model

    setup_logging("engine")
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    started = time.perf_counter()
    loaded = load_model(settings)
    loaded_s = time.perf_counter() - started
    engine = Engine(loaded.model, loaded.device, eos_token_id=eos_token_id,
                    config=EngineConfig.from_settings(settings))
    started = time.perf_counter()
    engine.warmup()
    return engine, dict(model=loaded.name, device=str(loaded.device), reason=loaded.reason,
                        load_s=round(loaded_s, 1), warmup_s=round(time.perf_counter() - started, 1))
