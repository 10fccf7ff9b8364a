"""What crosses the engine's boundary: a request, its sampling settings, its outputs and the stream that
carries them. Free of torch, so that the worker process, which only talks to the engine (in its own process:
process.py), never imports torch.
"""
from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass
from typing import Iterator, Optional


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings (OpenAI names and meanings)."""

    temperature: float = 0.3  # 0 => greedy argmax
    top_p: float = 1.0  # nucleus mass, in [0, 1]; 0 keeps only the top token
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the row's logits

    def __post_init__(self) -> None:
        # Only the constraints the math needs; API-level ranges are checked upstream.
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not (0.0 <= self.top_p <= 1.0):
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if not (math.isfinite(self.frequency_penalty) and math.isfinite(self.presence_penalty)):
            raise ValueError("penalties must be finite")
        if not all(math.isfinite(bias) for _, bias in self.logit_bias):
            raise ValueError("logit biases must be finite")


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    max_tokens: int
    priority: int = 0  # lower is admitted first: interactive 0, batch 1
    # How many tokens at the end of prompt_token_ids earlier attempts of the job generated (a resume): they
    # count as output for penalties and for the position of each random draw.
    num_resumed_tokens: int = 0
    logprobs: Optional[int] = None  # None: none; k >= 0: each token's logprob and the k most likely tokens'
    grammar: Optional[str] = None   # an llguidance grammar the output must follow (jobs/structured_output.py)
    # Another choice of the same job (its request id): the prompt's KV is copied from it once it has computed
    # it, instead of being computed again (scheduler.py).
    shares_prompt_with: Optional[str] = None


# One generated token's logprob (of the model's own distribution), and the top-k tokens' as (id, logprob).
TokenLogprob = tuple[float, tuple[tuple[int, float], ...]]


@dataclass(frozen=True)
class EngineOutput:
    token_ids: list[int]                 # tokens generated since the previous output
    finish_reason: Optional[str] = None  # "stop" (EOS, or the grammar complete), "length", "cancelled", "error"
    error: Optional[str] = None
    logprobs: Optional[list[TokenLogprob]] = None  # one per token id, when the request asked for logprobs


class RequestStream:
    """What `submit` returns: iterate it for the request's outputs; the last one has a finish reason."""

    def __init__(self, request: EngineRequest):
        self.request = request
        self._outputs: "queue.Queue[EngineOutput]" = queue.Queue()
        self.notify: Optional[threading.Event] = None  # set on every output (a consumer of many streams)

    def put(self, output: EngineOutput) -> None:
        self._outputs.put(output)
        if self.notify is not None:
            self.notify.set()

    def drain(self) -> list[EngineOutput]:
        """Everything produced since the last call, without waiting (maybe nothing)."""
        outputs = []
        while not (outputs and outputs[-1].finish_reason is not None):
            try:
                outputs.append(self._outputs.get_nowait())
            except queue.Empty:
                break
        return outputs

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
