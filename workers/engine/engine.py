"""The engine: token ids in, token ids out, behind a small interface that the worker task uses.

    stream = engine.submit(EngineRequest(...))   # returns at once, from any thread
    for output in stream: ...                     # new token ids, then a finish reason
    engine.cancel(request_id)                     # leaves the batch at the next step, its KV blocks freed

One engine thread owns the model and runs `step()` in a loop: continuous batching over a paged KV cache
(scheduler.py decides who runs, model_runner.py runs them, sampling.py picks the tokens). Callers only touch
queues; text (detokenizing, stop strings) and Redis stay with the caller, off the decode loop.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Optional

import torch

from workers.engine.block_manager import BlockManager
from workers.engine.config import EngineConfig
from workers.engine.grammar import GrammarSupport
from workers.engine.interface import EngineOutput, EngineRequest, RequestStream
from workers.engine.logits_processors import LogprobsPass, apply_logit_bias_, bias_tensors
from workers.engine.model_runner import ModelRunner, StepOutput
from workers.engine.penalties import PenaltyTable
from workers.engine.sampling import EXACT, argmax_rows, finish_exact, sample
from workers.engine.scheduler import ScheduledBatch, Scheduler
from workers.engine.sequence import Sequence

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineConfig", "EngineOutput", "EngineRequest", "RequestStream"]


def is_device_error(exc: BaseException) -> bool:
    """A CUDA error: sticky (every later kernel launch fails too), so the process cannot go on."""
    return isinstance(exc, getattr(torch, "AcceleratorError", ())) or "CUDA error" in str(exc)


def is_out_of_memory(exc: BaseException) -> bool:
    """The device ran out of memory: not sticky, a smaller step can run."""
    return isinstance(exc, torch.OutOfMemoryError)


# Successful steps after an out-of-memory before the batch grows back to its configured size.
OOM_RECOVERY_STEPS = 256


class Engine:
    def __init__(self, model, device: torch.device, eos_token_id: int, config: Optional[EngineConfig] = None):
        self.model = model
        self.device = torch.device(device)
        self.eos_token_id = eos_token_id
        self.config = config or EngineConfig()
        self.vocab_size = model.config.vocab_size
        self.runner = ModelRunner(model, self.device, self.config)
        self.blocks = BlockManager(self.runner.num_blocks, self.config.block_size, self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.config, self.blocks)
        self.penalties = PenaltyTable(self.config.max_num_seqs, self.vocab_size, self.device)
        self.grammars = GrammarSupport(self.vocab_size, self.config.max_num_seqs, self.device)
        self.logprobs = LogprobsPass(self.device)  # on the CPU, on a spare core while a step samples
        # The step's sampled tokens come back through this pinned buffer: one non-blocking copy, one wait.
        self._host_tokens = torch.zeros(self.config.max_num_seqs, dtype=torch.long,
                                        pin_memory=self.device.type == "cuda")
        self._steps = 0
        # Called on the engine thread after every pass of its loop that may have produced outputs (the
        # engine process sends each step's outputs in one message through it).
        self.on_step: Optional[Callable[[], None]] = None
        # Called on the engine thread when the device is broken (a CUDA error, or every step failing): the
        # engine process exits there, so its requests resume on another worker instead of failing one by one.
        # Unset (an engine inside a test or the benchmark), failed steps fail their requests and it goes on.
        self.on_fatal: Optional[Callable[[BaseException], None]] = None
        self._failed_steps = 0  # in a row
        self._torch_threads = 1  # torch's threads on the engine thread (read there when its loop starts)
        self._steps_since_oom = 0
        # Shared with other threads, under _cond.
        self._cond = threading.Condition()
        self._new: list[Sequence] = []
        self._cancels: list[str] = []
        self._calls: list[tuple[Callable[[], None], "queue.Queue[Optional[BaseException]]"]] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    # --- the interface (any thread)
    def submit(self, request: EngineRequest, stream: Optional[RequestStream] = None) -> RequestStream:
        """Queue a request; its outputs go to `stream` (a new RequestStream unless given)."""
        stream = stream if stream is not None else RequestStream(request)
        seq = Sequence(request.request_id, request.prompt_token_ids, request.sampling, request.max_tokens, stream,
                       priority=request.priority, num_resumed_tokens=request.num_resumed_tokens,
                       logprobs=request.logprobs, leader_id=request.shares_prompt_with)
        try:  # here, on the caller's thread: a grammar's matcher takes milliseconds to build
            if request.grammar is not None:
                resumed = request.prompt_token_ids[len(request.prompt_token_ids) - seq.num_resumed_tokens:]
                seq.matcher = self.grammars.matcher(request.grammar, resumed)
            seq.bias = bias_tensors(seq, self.device)
        except ValueError as exc:
            stream.put(EngineOutput([], "error", error=f"the response format cannot be enforced: {exc}"))
            return stream
        with self._cond:
            if self._stopping:
                stream.put(EngineOutput([], "error", error="the engine is shut down"))
                return stream
            self._new.append(seq)
            self._cond.notify()
        return stream

    def cancel(self, request_id: str) -> None:
        with self._cond:
            self._cancels.append(request_id)
            self._cond.notify()

    def warmup(self) -> None:
        """Start-up work on the engine thread (a dummy step; CUDA-graph capture on GPU). Call it once, before
        serving: it blocks until done."""
        self._call_in_engine_thread(self.runner.warmup)
        self._call_in_engine_thread(self._warm_sampler)

    def _warm_sampler(self) -> None:
        """One sampled draw with a nucleus, so that the first request does not wait for the compiled kernels."""
        with torch.inference_mode():
            logits = torch.zeros(2, self.vocab_size, device=self.device)
            sample(logits, torch.tensor([0.7, 0.0]), torch.tensor([0.5, 1.0]), torch.tensor([1, 2]),
                   torch.tensor([0, 0]))

    def stats(self) -> dict:
        """A read-only snapshot for metrics (racy by a step at most)."""
        return dict(running=len(self.scheduler.running), waiting=len(self.scheduler.waiting) + len(self._new),
                    kv_blocks_used=self.blocks.num_used, kv_blocks_total=self.blocks.num_blocks,
                    kv_blocks_cached=self.blocks.num_cached, prefix_cache_queries=self.blocks.prefix_queries,
                    prefix_cache_hits=self.blocks.prefix_hits, steps=self._steps,
                    graph_steps=self.runner.graph_steps, eager_steps=self.runner.eager_steps)

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # --- the engine thread
    def _loop(self) -> None:
        # On the CPU, float32 results too small for a normal float (an exp far below a row's top) are 0 instead of
        # denormals, whose arithmetic is 5-50x as slow (a log_softmax over a real model's rows: 4.2 ms against
        # 0.7 at [32, 32000]). This thread's own setting; no logit, probability or K/V that matters is that small.
        torch.set_flush_denormal(True)
        self._torch_threads = torch.get_num_threads()
        while True:
            with self._cond:
                while not (self._new or self._cancels or self._calls or self._stopping
                           or self.scheduler.has_unfinished()):
                    self._cond.wait()
                if self._stopping:
                    break
                calls, self._calls = self._calls, []
            for fn, done in calls:
                self._run_call(fn, done)
            try:
                if not self.step() and self.scheduler.has_unfinished():
                    with self._cond:  # nothing could run (should not happen): do not spin
                        self._cond.wait(0.01)
            except Exception as exc:  # a bug outside the model call: fail everyone rather than loop on it
                log.exception("engine step failed; failing every request and starting afresh")
                self._reset(exc)
            self._after_step()
        self._close()
        self._after_step()

    def _after_step(self) -> None:
        if self.on_step is not None:
            try:
                self.on_step()
            except Exception:  # the hook's own failure must not stop the engine
                log.exception("engine on_step hook failed")

    def step(self) -> bool:
        """One engine step; False when there was nothing to run."""
        self._intake()
        batch = self.scheduler.schedule()
        self._end(batch.ended)
        if batch.is_empty:
            return False
        sampled = batch.sampled()
        try:
            self._reset_slots(batch.admitted)
            self.runner.copy_blocks(batch.kv_copies)
            masks = self.grammars.fill_async([s.matcher for s in sampled if s.matcher is not None])
            tokens, logprobs = self._sample(sampled, self._run_model(batch, grammar_running=masks is not None),
                                            masks)
        except Exception as exc:  # the model or sampling failed: this step's requests fail, the engine goes on
            self._failed_steps += 1
            if is_out_of_memory(exc) and self._shrink_after_oom(exc):
                return True
            if self.on_fatal is not None and (is_device_error(exc) or is_out_of_memory(exc) or
                                              self._failed_steps >= self.config.max_failed_steps):
                log.critical("engine step failed (%d in a row); the device is unusable: %s", self._failed_steps, exc)
                self.on_fatal(exc)
            log.exception("engine step failed for %d sequences", len(batch.decode) + len(batch.prefill))
            self._fail(batch.decode + batch.prefill, exc)
            return True
        self._failed_steps = 0
        self._steps_since_oom += 1
        if self.scheduler.shrunk and self._steps_since_oom >= OOM_RECOVERY_STEPS:
            log.info("%d steps without running out of memory: the batch is back to its configured size",
                     self._steps_since_oom)
            self.scheduler.restore()
        self._postprocess(batch, sampled, tokens, logprobs)
        self._steps += 1
        return True

    def _run_model(self, batch: ScheduledBatch, grammar_running: bool) -> StepOutput:
        """The model's step. On the CPU, while the grammar thread fills a step's masks, torch leaves it a core:
        on 2 cores, torch's 2 threads beside it made a json_schema step slower (14.4-17.4 ms at 32 rows, against
        12.4-13.5 ms with 1), and the unconstrained steps gain nothing from the second thread in this thread."""
        threads = self._torch_threads
        if not grammar_running or self.device.type != "cpu" or threads < 2:
            return self.runner.run(batch)
        torch.set_num_threads(threads - 1)
        try:
            return self.runner.run(batch)
        finally:
            torch.set_num_threads(threads)

    def _shrink_after_oom(self, exc: BaseException) -> bool:
        """Out of device memory in a step: retry it smaller (the newest half of the batch preempted, to be
        recomputed later), unless one sequence runs or every retry ran out too (max_failed_steps in a row). Then
        False: the engine ends through on_fatal (a fresh process sizes its memory again, and the jobs resume),
        or without it the step's requests fail with the error."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self._steps_since_oom = 0
        if len(self.scheduler.running) < 2 or self._failed_steps >= self.config.max_failed_steps:
            return False
        preempted = self.scheduler.shrink()
        log.warning("out of device memory in a step (%s): preempted %d of the batch's sequences, they are "
                    "recomputed later; the batch is capped at %d and the prefill budget at %d tokens for %d steps",
                    exc, preempted, self.scheduler.max_num_seqs, self.scheduler.prefill_chunk_tokens,
                    OOM_RECOVERY_STEPS)
        return True

    def _intake(self) -> None:
        with self._cond:
            new, self._new = self._new, []
            cancels, self._cancels = self._cancels, []
        for seq in new:
            error = self._invalid(seq) or self.scheduler.check(seq)
            if error:
                seq.stream.put(EngineOutput([], "error", error=error))
            elif seq.max_tokens <= 0:
                seq.stream.put(EngineOutput([], "length"))
            else:
                self.scheduler.add(seq)
        for request_id in cancels:
            for seq in self.scheduler.abort(request_id):
                seq.stream.put(EngineOutput([], "cancelled"))

    def _invalid(self, seq: Sequence) -> Optional[str]:
        ids = seq.token_ids + [token for token, _ in seq.sampling.logit_bias]
        if ids and not (0 <= min(ids) and max(ids) < self.vocab_size):
            bad = next(t for t in ids if not 0 <= t < self.vocab_size)
            return f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})"
        return None

    def _reset_slots(self, admitted: list[Sequence]) -> None:
        """Fresh per-slot state for (re)admitted sequences: the penalties of what they generated so far."""
        for seq in admitted:
            if seq.penalized:
                self.penalties.reset(seq.slot, seq.generated_token_ids, seq.sampling.frequency_penalty,
                                     seq.sampling.presence_penalty)

    @torch.inference_mode()  # the runner's logits are inference tensors: only there can they be worked in place
    def _sample(self, sampled: list[Sequence], out: StepOutput, masks=None) -> tuple[list[int], list]:
        """One token per row of out.logits [S, V], and per row its logprobs (None where not asked): the tokens a
        decode graph drew unless a row's logits are processed (penalties, a bias, a grammar), else the
        engine's own draw (_sample_processed). Logprobs come from the raw logits, before either. `masks`: the
        constrained rows' masks being filled (GrammarSupport.fill_async)."""
        if not sampled:
            return [], []
        logprobs = self.logprobs.start(out.logits, sampled)  # before the draw changes the logits in place
        if out.tokens is not None and not any(s.processed for s in sampled):
            tokens = self._finish_graph_draw(sampled, out)
        else:
            tokens = self._sample_processed(sampled, out.logits, masks)
        done = logprobs()
        return tokens, done.entries(tokens) if done else [None] * len(tokens)

    def _sample_processed(self, sampled: list[Sequence], logits: torch.Tensor, masks=None) -> list[int]:
        """Penalties, logit biases and grammar masks in place in logits [S, V] (this step's own tensor), then
        argmax for greedy rows and one batched draw (sampling.py) for the others."""
        penalized = [i for i, s in enumerate(sampled) if s.penalized]
        penalized_slots = [sampled[i].slot for i in penalized]
        if penalized:
            self.penalties.apply_(logits, penalized, penalized_slots)
        apply_logit_bias_(logits, sampled)
        constrained = [i for i, s in enumerate(sampled) if s.matcher is not None]
        if constrained:
            if masks is None:  # (not started with the step)
                masks = self.grammars.fill_async([sampled[i].matcher for i in constrained])
            self.grammars.apply_(logits, constrained, masks)
        random = [i for i, s in enumerate(sampled) if not s.greedy]
        if len(random) == len(sampled):
            tokens = sample(logits, *self._draw_inputs(sampled))
        else:
            tokens = argmax_rows(logits)                                   # [S]
            if random:
                rows = torch.tensor(random, device=self.device)
                tokens[rows] = sample(logits[rows], *self._draw_inputs([sampled[i] for i in random]))
        if penalized:
            self.penalties.record(penalized_slots, tokens[torch.tensor(penalized, device=self.device)])
        return self._to_host(tokens)

    def _finish_graph_draw(self, sampled: list[Sequence], out: StepOutput) -> list[int]:
        """The graph's tokens, with the rare rows it left EXACT drawn here (as sample() would have drawn them)."""
        tokens = self._to_host(out.tokens)
        exact = [i for i, token in enumerate(tokens) if token == EXACT]
        if exact:
            rows = torch.tensor(exact, device=self.device)
            drawn = finish_exact(out.logits[rows], *self._draw_inputs([sampled[i] for i in exact])).tolist()
            for i, token in zip(exact, drawn):
                tokens[i] = token
        return tokens

    def _to_host(self, tokens: torch.Tensor) -> list[int]:
        """The step's tokens [S] as a list: on CUDA one non-blocking copy into pinned memory and one wait for
        the stream (the step's only synchronisation; it also orders the next step's input copies after this
        one's reads)."""
        if self.device.type != "cuda":
            return tokens.tolist()
        host = self._host_tokens[:tokens.shape[0]]
        host.copy_(tokens, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return host.tolist()

    def _draw_inputs(self, seqs: list[Sequence]) -> tuple[torch.Tensor, ...]:
        """sample()'s per-row inputs: temperature, top_p, seed key, output position."""
        def column(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)
        return (column([s.sampling.temperature for s in seqs], torch.float32),
                column([s.sampling.top_p for s in seqs], torch.float32),
                column([s.seed_key for s in seqs], torch.long),
                column([s.sample_position for s in seqs], torch.long))

    def _postprocess(self, batch: ScheduledBatch, sampled: list[Sequence], tokens: list[int],
                     logprobs: list) -> None:
        for seq in batch.decode:
            seq.num_computed_tokens += 1
        for seq, n in zip(batch.prefill, batch.prefill_lens):
            seq.num_computed_tokens += n
        self.scheduler.cache_computed(batch.decode + batch.prefill)  # before any of them finishes below
        max_len = self.config.max_model_len
        for seq, token, token_logprobs in zip(sampled, tokens, logprobs):
            seq.token_ids.append(token)
            grammar = GrammarSupport.consume(seq.matcher, token) if seq.matcher is not None else None
            error = None
            if token == self.eos_token_id or grammar == "stop":  # a complete grammar: nothing may follow
                reason = "stop"
            elif grammar == "error":
                reason, error = "error", f"the grammar refused token {token}: {seq.matcher.get_error()}"
            elif seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= max_len:
                reason = "length"
            else:
                reason = None
            if reason is not None:
                self.scheduler.finish(seq)
            seq.stream.put(EngineOutput([token], reason, error,
                                        None if token_logprobs is None else [token_logprobs]))

    def _end(self, ended: list[tuple[Sequence, str, Optional[str]]]) -> None:
        for seq, reason, error in ended:
            if reason == "length":
                log.warning("%s alone fills the KV cache (%d tokens): ended with 'length'", seq.request_id,
                            seq.num_tokens)
            seq.stream.put(EngineOutput([], reason, error=error))

    def _fail(self, seqs: list[Sequence], exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}"
        for seq in seqs:
            self.scheduler.finish(seq)
            seq.stream.put(EngineOutput([], "error", error=message))

    def _reset(self, exc: BaseException) -> None:
        """After an unexpected error the bookkeeping cannot be trusted: fail every request, start with an empty
        scheduler and block manager."""
        seqs = list(self.scheduler.running) + list(self.scheduler.waiting)
        self.blocks.reset()  # its prefix cache too: no block's contents can be trusted
        self.scheduler = Scheduler(self.config, self.blocks)
        for seq in seqs:
            seq.stream.put(EngineOutput([], "error", error=f"{type(exc).__name__}: {exc}"))

    def _call_in_engine_thread(self, fn: Callable[[], None]) -> None:
        done: "queue.Queue[Optional[BaseException]]" = queue.Queue()
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine is shut down")
            self._calls.append((fn, done))
            self._cond.notify()
        error = done.get()
        if error is not None:
            raise error

    @staticmethod
    def _run_call(fn: Callable[[], None], done: "queue.Queue[Optional[BaseException]]") -> None:
        try:
            fn()
            done.put(None)
        except BaseException as exc:  # handed to the caller
            done.put(exc)

    def _close(self) -> None:
        """Shutting down: every request still here ends with an error, pending calls are released."""
        with self._cond:
            new, self._new = self._new, []
            calls, self._calls = self._calls, []
        error = RuntimeError("the engine is shut down")
        self._fail(list(self.scheduler.running) + list(self.scheduler.waiting) + new, error)
        for _, done in calls:
            done.put(error)
