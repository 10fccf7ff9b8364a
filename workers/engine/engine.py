"""The engine: token ids in, token ids out, behind a small interface that the worker task uses.

    stream = engine.submit(EngineRequest(...))   # returns at once
    for output in stream: ...                     # new token ids, then a finish reason
    engine.cancel(request_id)                     # leaves at the next step

One engine thread owns the model; callers only touch queues. This version runs one sequence at a time;
text (detokenizing, stop strings) and Redis stay with the caller, off the decode loop.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from workers.engine import model_runner
from workers.engine.sampling import SamplingParams, apply_penalties, make_generator, sample, sampling_tensors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    max_tokens: int


@dataclass(frozen=True)
class EngineOutput:
    token_ids: list[int]                 # tokens generated since the previous output
    finish_reason: Optional[str] = None  # "stop" (EOS), "length", "cancelled", "error"; None while running
    error: Optional[str] = None


class RequestStream:
    """What `submit` returns: iterate it for the request's outputs; the last one has a finish reason."""

    def __init__(self, request: EngineRequest):
        self.request = request
        self._outputs: "queue.Queue[EngineOutput]" = queue.Queue()

    def put(self, output: EngineOutput) -> None:
        self._outputs.put(output)

    def __iter__(self) -> Iterator[EngineOutput]:
        while True:
            output = self._outputs.get()
            yield output
            if output.finish_reason is not None:
                return

    def next_outputs(self, timeout: Optional[float] = None) -> list[EngineOutput]:
        """Everything produced since the last call (waiting for at least one), so the caller can write
        a burst of tokens to Redis in one round trip. Raises queue.Empty after `timeout` seconds."""
        outputs = [self._outputs.get(timeout=timeout)]
        while outputs[-1].finish_reason is None:
            try:
                outputs.append(self._outputs.get_nowait())
            except queue.Empty:
                break
        return outputs


class Engine:
    def __init__(self, model, device: torch.device, eos_token_id: int):
        self.model = model
        self.device = device
        self.eos_token_id = eos_token_id
        self.vocab_size = model.config.vocab_size
        self._waiting: "queue.Queue[Optional[RequestStream]]" = queue.Queue()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    # --- the interface
    def submit(self, request: EngineRequest) -> RequestStream:
        stream = RequestStream(request)
        self._waiting.put(stream)
        return stream

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancelled.add(request_id)

    def shutdown(self) -> None:
        self._waiting.put(None)
        self._thread.join(timeout=10)

    # --- inside
    def _take_cancel(self, request_id: str) -> bool:
        with self._lock:
            if request_id in self._cancelled:
                self._cancelled.discard(request_id)
                return True
            return False

    def _loop(self) -> None:
        while (stream := self._waiting.get()) is not None:
            try:
                self._generate(stream)
            except Exception as exc:  # one bad request must not kill the engine
                log.exception("generation failed for %s", stream.request.request_id)
                stream.put(EngineOutput([], "error", error=f"{type(exc).__name__}: {exc}"))
            with self._lock:  # a cancel that arrived after the end must not linger
                self._cancelled.discard(stream.request.request_id)

    def _generate(self, stream: RequestStream) -> None:
        request = stream.request
        if self._take_cancel(request.request_id):
            stream.put(EngineOutput([], "cancelled"))
            return
        temperature, top_p, frequency, presence = sampling_tensors([request.sampling], self.device)
        generators = [make_generator(request.sampling.seed, self.device)]
        output_counts = torch.zeros(1, self.vocab_size, device=self.device)  # [1, V]
        cache = model_runner.new_cache()
        prompt = torch.tensor([request.prompt_token_ids], device=self.device)  # [1, T]
        logits = model_runner.prefill(self.model, prompt, cache)              # [1, V]
        for step in range(request.max_tokens):
            logits = apply_penalties(logits, output_counts, frequency, presence)
            token = sample(logits, temperature, top_p, generators)             # [1]
            token_id = int(token.item())
            output_counts[0, token_id] += 1
            if token_id == self.eos_token_id:
                stream.put(EngineOutput([token_id], "stop"))
                return
            if step + 1 == request.max_tokens:
                stream.put(EngineOutput([token_id], "length"))
                return
            if self._take_cancel(request.request_id):
                stream.put(EngineOutput([token_id], "cancelled"))
                return
            stream.put(EngineOutput([token_id]))
            logits = model_runner.decode_one_token(self.model, token.view(1, 1), cache)
