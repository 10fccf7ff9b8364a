"""The engine in its own process (workers/engine/process.py), with the real tiny model: it gives the same
tokens as the engine in this process, for requests running together; a cancel reaches it; two submits with
one request id keep their outputs apart; a build that fails is an error at start; and if the process dies,
every open stream ends with an error and the owner is told."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from workers.engine.config import EngineConfig
from workers.engine.engine import Engine, EngineRequest
from workers.engine.process import EngineProcess, EngineProcessError
from workers.engine.sampling import SamplingParams
from workers.model_loader import build_tiny_random

EOS = 2
PROMPTS = [[1, 733, 16289, 28793], [1] + list(range(300, 340)), [1, 5, 7000, 12000, 31999]]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build_tiny_engine(num_kv_blocks: int = 256):
    """Runs in the engine process (so it must be importable there: a module-level function)."""
    torch.set_num_threads(1)
    engine = Engine(build_tiny_random(), torch.device("cpu"), eos_token_id=EOS,
                    config=EngineConfig(num_kv_blocks=num_kv_blocks))
    engine.warmup()
    return engine, {"model": "tiny-random", "pid": os.getpid()}


def build_fails():
    raise RuntimeError("no weights here")


def collect(stream):
    tokens, reason = [], None
    for output in stream:
        tokens += output.token_ids
        reason = output.finish_reason
    return tokens, reason


@pytest.fixture(scope="module")
def engine_process():
    engine = EngineProcess(build_tiny_engine)
    yield engine
    engine.shutdown()


def test_it_runs_in_another_process_and_gives_the_in_process_engine_s_tokens(engine_process):
    assert engine_process.info["pid"] == engine_process.pid != os.getpid()
    local = Engine(build_tiny_random(), torch.device("cpu"), eos_token_id=EOS, config=EngineConfig(num_kv_blocks=256))
    try:
        expected = [collect(local.submit(EngineRequest(f"r{i}", p, SamplingParams(temperature=0.0), 20)))
                    for i, p in enumerate(PROMPTS)]
        seeded = collect(local.submit(EngineRequest("s", PROMPTS[0], SamplingParams(temperature=0.9, seed=7), 20)))
    finally:
        local.shutdown()
    streams = [engine_process.submit(EngineRequest(f"r{i}", p, SamplingParams(temperature=0.0), 20))
               for i, p in enumerate(PROMPTS)]  # all at once: they run as one batch
    seeded_stream = engine_process.submit(EngineRequest("s", PROMPTS[0], SamplingParams(temperature=0.9, seed=7), 20))
    assert [collect(s) for s in streams] == expected
    assert collect(seeded_stream) == seeded
    assert engine_process.stats()["kv_blocks_total"] == 256


def test_a_cancel_ends_the_request_and_the_same_id_can_run_again(engine_process):
    first = engine_process.submit(EngineRequest("same", PROMPTS[1], SamplingParams(temperature=0.0), 1000))
    next(iter(first))  # it is running
    engine_process.cancel("same")
    tokens, reason = collect(first)
    assert reason == "cancelled" and len(tokens) < 1000
    again = engine_process.submit(EngineRequest("same", PROMPTS[1], SamplingParams(temperature=0.0), 5))
    assert collect(again)[1] in ("length", "stop")


def test_a_build_that_fails_is_an_error_at_start():
    with pytest.raises(EngineProcessError, match="no weights here"):
        EngineProcess(build_fails, start_timeout_s=120)


def test_when_the_process_dies_open_streams_end_with_an_error_and_the_owner_is_told():
    died = threading.Event()
    engine = EngineProcess(build_tiny_engine, on_exit=died.set)
    try:
        stream = engine.submit(EngineRequest("long", PROMPTS[0], SamplingParams(temperature=0.0), 4000))
        next(iter(stream))
        os.kill(engine.pid, signal.SIGKILL)
        tokens, reason = collect(stream)
        assert reason == "error"
        assert died.wait(10)
        later = engine.submit(EngineRequest("later", PROMPTS[0], SamplingParams(), 5))
        assert collect(later) == ([], "error")
    finally:
        engine.shutdown()


def build_engine_on_a_broken_device():
    """An engine whose every step fails as a sticky CUDA error does (in the engine process)."""
    engine, info = build_tiny_engine()

    def broken_run(batch):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    engine.runner.run = broken_run
    return engine, info


def test_a_broken_device_ends_the_engine_process_and_the_owner_hears_first():
    """Issue 13, case 5: the process exits on the first CUDA error, and the owner is told before its open
    streams end with an error: a worker exits there, so its jobs resume on another worker, not failed."""
    streams_ended_before_told = []
    stream_holder = {}

    def told():
        streams_ended_before_told.append(stream_holder["stream"].drain())

    engine = EngineProcess(build_engine_on_a_broken_device, on_exit=told)
    try:
        stream_holder["stream"] = stream = engine.submit(EngineRequest("r", PROMPTS[0], SamplingParams(), 5))
        tokens, reason = collect(stream)
        assert reason == "error"
        assert streams_ended_before_told == [[]]  # told while the stream still had nothing
        engine._process.join(10)
        assert engine._process.exitcode == 75
    finally:
        engine.shutdown()


def test_stalled_for_grows_only_while_the_engine_has_work(engine_process):
    assert engine_process.stalled_for() == 0.0
    stream = engine_process.submit(EngineRequest("s", PROMPTS[0], SamplingParams(temperature=0.0), 2000))
    next(iter(stream))
    assert engine_process.stalled_for() < 1.5  # it steps, and says so
    os.kill(engine_process.pid, signal.SIGSTOP)  # hung
    try:
        time.sleep(2.0)
        assert engine_process.stalled_for() >= 2.0
    finally:
        os.kill(engine_process.pid, signal.SIGCONT)
    engine_process.cancel("s")
    collect(stream)
    assert engine_process.stalled_for() == 0.0
