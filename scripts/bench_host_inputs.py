"""Host time of a step's inputs (ModelRunner.prepare): B decoding rows with C-token contexts, on the CPU.

    python -m scripts.bench_host_inputs [B C ...]    (default: 64 2048  256 2048  256 128)

This is the work the host does before each step's kernels can start (on a GPU, while the GPU waits): a
microbenchmark of one function, not a speed claim about serving.
"""
from __future__ import annotations

import sys
import time

import torch

from workers.engine.config import EngineConfig
from workers.engine.model_runner import ModelRunner
from workers.engine.sampling import SamplingParams
from workers.engine.scheduler import ScheduledBatch
from workers.engine.sequence import Sequence
from workers.model_loader import build_tiny_random


def prepare_ms(batch_size: int, context: int, repeats: int = 200) -> float:
    block = 16
    per_row = context // block + 1
    config = EngineConfig(max_num_seqs=batch_size, block_size=block, num_kv_blocks=batch_size * per_row + 1,
                          max_model_len=max(8192, context + 1))
    runner = ModelRunner(build_tiny_random(), torch.device("cpu"), config)
    rows = []
    for i in range(batch_size):
        seq = Sequence(f"r{i}", list(range(context)), SamplingParams(), 10)
        seq.block_table, seq.slot = list(range(i * per_row, (i + 1) * per_row)), i
        seq.num_computed_tokens = context - 1
        rows.append(seq)
    batch = ScheduledBatch(decode=rows)
    for _ in range(5):
        runner.prepare(batch)
    started = time.perf_counter()
    for _ in range(repeats):
        runner.prepare(batch)
    return 1e3 * (time.perf_counter() - started) / repeats


def main(argv: list[str]) -> None:
    numbers = [int(a) for a in argv] or [64, 2048, 256, 2048, 256, 128]
    for batch_size, context in zip(numbers[::2], numbers[1::2]):
        print(f"B={batch_size} C={context}: prepare {prepare_ms(batch_size, context):.3f} ms/step")


if __name__ == "__main__":
    main(sys.argv[1:])
