"""The service's worker serving the benchmark's own model, for the service mode with --model mistral7b or tiny7b:

    BENCH_MODEL=mistral7b BENCH_DEVICE=cuda:0 python -m scripts.bench.service_worker [celery args]

It is the worker's child process (`python -m workers --child`: Celery's threads pool feeding one engine process),
with one change: its engine process loads the model with `scripts.bench.models.build_model(BENCH_MODEL,
BENCH_DEVICE)` (the random-weight Mistral-7B v0.2 in NF4 on CUDA, or tiny7b), the model the engine modes run,
instead of the one MODEL_SOURCE names. Everything else (settings, engine config, queues, the relay) is the worker's.

How: importing this module replaces `workers.model_loader.load_model`. The engine process is spawned
(multiprocessing's "spawn"), and a spawned child first imports its parent's main module by name (as
`__mp_main__`), so this module is imported there too, before `workers.engine_setup.build_engine` looks up
`load_model`. The worker's supervisor (which restarts a crashed child) is left out: the benchmark would report
such a crash as failed rows anyway.
"""
from __future__ import annotations

import os
import sys
import uuid

import workers.model_loader as model_loader

MODEL_ENV, DEVICE_ENV = "BENCH_MODEL", "BENCH_DEVICE"


def load_bench_model(settings) -> "model_loader.LoadedModel":
    """workers.model_loader.load_model's stand-in: the benchmark's model, on the benchmark's device."""
    import torch

    from scripts.bench.models import build_model

    kind = os.environ[MODEL_ENV]
    device = torch.device(os.environ.get(DEVICE_ENV, "cpu"))
    model, info = build_model(kind, device)
    return model_loader.LoadedModel(model, device, f"bench-{kind}",
                                    f"{MODEL_ENV}={kind} (scripts/bench/service_worker.py): {info['weights']}")


if os.environ.get(MODEL_ENV):
    model_loader.load_model = load_bench_model


def start_bench_worker(stack, model_kind: str, device, concurrency: int, extra_env: dict,
                       name: str = "worker") -> None:
    """As Stack.start_worker, with this module in place of `python -m workers`."""
    env = {"HONCHO_PROCESS_NAME": f"{name}-{uuid.uuid4().hex[:6]}", "WORKER_CONCURRENCY": str(concurrency),
           MODEL_ENV: model_kind, DEVICE_ENV: str(device), **extra_env}
    stack._spawn(name, [sys.executable, "-m", "scripts.bench.service_worker"], env)


if __name__ == "__main__":
    if not os.environ.get(MODEL_ENV):
        raise SystemExit(f"{MODEL_ENV} must name the model (mistral7b or tiny7b)")
    from workers.__main__ import run_child

    run_child(sys.argv[1:])
