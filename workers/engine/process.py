"""The engine in a process of its own, behind the interface of `Engine` (submit, cancel, stats, shutdown).

Why a process: the engine thread is Python driving many small kernels, and it holds the GIL for much of
every step. Inside the worker it shared that GIL with the publisher (detokenizing, Redis writes) and
Celery's threads, and waited for it a quarter of the time (README, "Benchmark"). vLLM runs its engine core
in a separate process for the same reason. Here the engine process only steps the batch; the worker process
keeps the jobs, the text and Redis.

The model is built in the engine process (spawned, never forked: CUDA cannot live in a forked child), by a
picklable `build` callable that returns a warmed-up Engine and a dict describing it.

Wire protocol, one duplex pipe:
  worker -> engine: ("submit", key, EngineRequest) | ("cancel", request_id) | ("stop",)
  engine -> worker: ("ready", info, stats) once, after the build (or ("failed", message) and exit);
                    ("outputs", [(key, token_ids, finish_reason, error, logprobs), ...], stats) after each step
`key` numbers one submit: two submits of the same request id (a job run again) never mix outputs.
"""
from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Callable, Optional

from workers.engine.interface import EngineOutput, EngineRequest, RequestStream

if TYPE_CHECKING:  # the worker process never imports torch: the engine lives in the engine process
    from workers.engine.engine import Engine

log = logging.getLogger(__name__)

# What `build` returns in the engine process: the engine (warmed up), and facts for the worker's logs.
EngineBuild = Callable[[], "tuple[Engine, dict]"]


class EngineProcessError(RuntimeError):
    """The engine process could not start."""


class EngineProcess:
    def __init__(self, build: EngineBuild, start_timeout_s: float = 1800.0,
                 on_exit: Optional[Callable[[], None]] = None):
        """Start the engine process and wait until it is ready (its model loaded and warmed up).
        `on_exit` is called (from a background thread) if the engine process ends without `shutdown`."""
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=serve, args=(child_conn, build), name="engine", daemon=True)
        self._process.start()
        child_conn.close()  # ours is closed, so the pipe reports EOF when the engine process dies
        self.info, self._stats = self._wait_ready(start_timeout_s)
        self._streams: dict[int, RequestStream] = {}  # open submits by key (outputs go there)
        self._keys = itertools.count()
        self._send_lock = threading.Lock()
        self._closed = False     # no more submits: the process is gone or being stopped
        self._stopping = False
        self._on_exit = on_exit
        self._last_progress = time.monotonic()  # when the engine last reported a step (or got work when idle)
        self._receiver = threading.Thread(target=self._receive, name="engine-outputs", daemon=True)
        self._receiver.start()

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid

    # --- the Engine interface (any thread)
    def submit(self, request: EngineRequest) -> RequestStream:
        stream = RequestStream(request)
        with self._send_lock:
            if not self._closed:
                key = next(self._keys)
                if not self._streams:  # idle until now: its stall clock starts here
                    self._last_progress = time.monotonic()
                self._streams[key] = stream  # before the send: its outputs cannot come first
                if self._send(("submit", key, request)):
                    return stream
                self._streams.pop(key, None)
        stream.put(EngineOutput([], "error", error="the engine process is not running"))
        return stream

    def cancel(self, request_id: str) -> None:
        with self._send_lock:
            if not self._closed:
                self._send(("cancel", request_id))

    def warmup(self) -> None:
        """Nothing to do: the engine process warmed up before it said it was ready."""

    def stats(self) -> dict:
        """The engine's stats as of its last step (see Engine.stats)."""
        return dict(self._stats)

    def stalled_for(self) -> float:
        """Seconds the engine has had requests without reporting a step (it reports at least every
        PROGRESS_EVERY_S while it steps); 0 while it has none. A hung engine (a stuck kernel, a stopped
        process) grows this without bound."""
        with self._send_lock:
            busy = bool(self._streams)
        return time.monotonic() - self._last_progress if busy else 0.0

    def kill(self) -> None:
        """End the engine process at once (SIGKILL also ends a stopped or hung one)."""
        self._process.kill()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        with self._send_lock:
            self._stopping = True
            if not self._closed:
                self._closed = True
                self._send(("stop",))
        self._process.join(timeout_s)
        if self._process.is_alive():
            log.warning("the engine process did not stop within %.0f s; killing it", timeout_s)
            self._process.kill()
            self._process.join(5)
        self._receiver.join(5)

    # --- the worker side's threads
    def _send(self, message) -> bool:
        """Under _send_lock. False if the pipe is broken (the process is gone: the receiver cleans up)."""
        try:
            self._conn.send(message)
            return True
        except (BrokenPipeError, EOFError, OSError):
            return False

    def _wait_ready(self, timeout_s: float) -> tuple[dict, dict]:
        if not self._conn.poll(timeout_s):
            self._process.kill()
            raise EngineProcessError(f"the engine process was not ready within {timeout_s:.0f} s")
        try:
            kind, *detail = self._conn.recv()
        except EOFError:
            self._process.join(5)
            raise EngineProcessError(f"the engine process exited while starting (code {self._process.exitcode})")
        if kind != "ready":
            self._process.join(5)
            raise EngineProcessError(f"the engine process failed to start: {detail[0]}")
        info, stats = detail
        return info, stats

    def _receive(self) -> None:
        try:
            while True:
                kind, outputs, stats = self._conn.recv()
                self._stats = stats
                self._last_progress = time.monotonic()
                for key, token_ids, finish_reason, error, logprobs in outputs:
                    stream = self._streams.get(key)
                    if stream is None:
                        continue
                    if finish_reason is not None:
                        del self._streams[key]
                    stream.put(EngineOutput(token_ids, finish_reason, error, logprobs))
        except (EOFError, OSError):
            pass  # the engine process ended
        with self._send_lock:
            self._closed = True
            open_streams, self._streams = self._streams, {}
            expected = self._stopping
        if not expected:
            log.error("the engine process exited (code %s) with %d requests running", self._process.exitcode,
                      len(open_streams))
            if self._on_exit is not None:  # first: a worker exits here, so its jobs resume elsewhere, unfailed
                self._on_exit()
        for stream in open_streams.values():
            stream.put(EngineOutput([], "error", error="the engine process exited"))


# --- the engine process

PROGRESS_EVERY_S = 1.0  # a stepping engine with nothing to send still reports this often (it is not hung)


class _Outbox:
    """Outputs of the engine's streams, sent to the worker in one message per engine step (and at least one
    per PROGRESS_EVERY_S while it steps: the worker's evidence that the engine makes progress)."""

    def __init__(self, conn, engine_stats: Callable[[], dict]):
        self.conn = conn
        self.engine_stats = engine_stats
        self._items: list[tuple] = []
        self._lock = threading.Lock()
        self._last_sent = time.monotonic()

    def add(self, key: int, output: EngineOutput) -> None:
        with self._lock:
            self._items.append((key, output.token_ids, output.finish_reason, output.error, output.logprobs))

    def flush(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            if items or time.monotonic() - self._last_sent >= PROGRESS_EVERY_S:
                self._last_sent = time.monotonic()
                try:
                    self.conn.send(("outputs", items, self.engine_stats()))
                except (BrokenPipeError, OSError):
                    pass  # the worker is gone; the main thread sees the pipe closed and stops


class _ForwardedStream(RequestStream):
    """The engine process's stand-in for a worker's stream: its outputs go to the outbox."""

    def __init__(self, request: EngineRequest, key: int, outbox: _Outbox):
        super().__init__(request)
        self.key = key
        self.outbox = outbox

    def put(self, output: EngineOutput) -> None:
        self.outbox.add(self.key, output)


def serve(conn, build: EngineBuild) -> None:
    """The engine process's main: build the engine, then take commands until told to stop or the worker
    is gone (its end of the pipe closed)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the worker stops us
    try:
        engine, info = build()
    except BaseException as exc:
        log.exception("building the engine failed")
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    outbox = _Outbox(conn, engine.stats)
    engine.on_step = outbox.flush  # one message per step, sent from the engine thread
    engine.on_fatal = _exit_on_fatal
    conn.send(("ready", info, engine.stats()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break  # the worker process is gone
        if message[0] == "submit":
            _, key, request = message
            engine.submit(request, stream=_ForwardedStream(request, key, outbox))
        elif message[0] == "cancel":
            engine.cancel(message[1])
        elif message[0] == "stop":
            break
    engine.shutdown()  # fails whatever is still running (sent by its last on_step)


def _exit_on_fatal(exc: BaseException) -> None:
    """The device is broken: end this process now, without failing the requests (the worker sees the pipe
    close and exits too, so its jobs resume on a healthy worker)."""
    log.critical("the engine cannot go on (%s: %s); the engine process exits", type(exc).__name__, exc)
    logging.shutdown()
    os._exit(75)
