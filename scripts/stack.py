"""Run the whole service as real processes (Celery worker(s) holding the model, the API under gunicorn),
for the integration tests, the benchmark and the fairness measurement. Each run gets its own Redis key
prefix and queue names, so runs never see each other's jobs.

One Redis (REDIS_URL), or several (job state sharded over them, jobs/shards.py): `start_redis_shards` starts N
private redis-servers and `stack_env(shard_urls=...)` names them (REDIS_URL the first, REDIS_SHARDS all); a
Stack then reads each job on its shard (`job`, `job_redis`) and cleans every node."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import redis
from openai.types.chat import ChatCompletionChunk

from jobs.redis_connection import redis_client
from jobs.shards import parse_redis_shards, shard_index

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
DEFAULT_REDIS_URL = os.environ.get("TEST_REDIS_URL", os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def terminate(*procs: subprocess.Popen, grace_s: float = 15) -> None:
    """SIGTERM to each, then SIGKILL to the whole process group (a worker's child too) of each that has not exited
    within `grace_s`: one deadline for all of them, so that stopping several takes as long as the slowest."""
    running = [proc for proc in procs if proc.poll() is None]
    for proc in running:
        proc.terminate()
    deadline = time.monotonic() + grace_s
    for proc in running:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # started with start_new_session: its group is its pid
            except ProcessLookupError:
                pass
            proc.kill()
            proc.wait()


def descendants(pid: int) -> list[int]:
    """Every process below pid (by /proc's parent links), children before their own children."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    return out


class Stack:
    """The processes of one running service, and how to reach them."""

    def __init__(self, env: dict, log_dir: Path):
        self.env = env
        self.log_dir = log_dir
        self.port = int(env["PORT"])
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.processes: dict[str, subprocess.Popen] = {}
        self.redis = redis_client(env["REDIS_URL"])  # a plain Redis, or a Sentinel set's master: the home node
        self.prefix = env["REDIS_PREFIX"]
        # The job store's shards in REDIS_SHARDS' order (a job's is `shard_index` of its id); none set: the one
        # Redis. The home node's client is `self.redis` wherever REDIS_SHARDS names REDIS_URL.
        self.shard_urls = parse_redis_shards(env.get("REDIS_SHARDS", "")) or [env["REDIS_URL"]]
        self.shards = [self.redis if url == env["REDIS_URL"] else redis_client(url) for url in self.shard_urls]
        # Every Redis node once, the home node first (what cleanup and key listings visit).
        self.nodes = [self.redis] + [c for c in self.shards if c is not self.redis]

    def start_worker(self, name: str = "worker", concurrency: int = 1, extra_env: dict | None = None):
        cmd = [sys.executable, "-m", "workers"]
        env = {"HONCHO_PROCESS_NAME": f"{name}-{uuid.uuid4().hex[:6]}", "WORKER_CONCURRENCY": str(concurrency),
               **(extra_env or {})}
        self._spawn(name, cmd, env)

    def start_api(self, name: str = "api", port: int | None = None, processes: int = 1,
                  extra_env: dict | None = None):
        """An API server (gunicorn, gevent) on `port` (default: the stack's port)."""
        # The interpreter's own gunicorn script; where it has none (gunicorn installed with pip --target, as
        # scripts/gpu_check.sh does on a GPU machine), the same gunicorn as a module.
        script = VENV_BIN / "gunicorn"
        launcher = [str(script)] if script.exists() else [sys.executable, "-m", "gunicorn"]
        # --graceful-timeout 1: on SIGTERM gunicorn waits that long for every open connection, an idle keep-alive
        # one (any SDK client's) included; a stack is stopped to be gone, not to drain (the Procfile gives 30 s).
        cmd = [*launcher, "-c", str(ROOT / "config" / "gunicorn.py"), "--worker-class", "gevent",
               "--workers", str(processes), "--no-control-socket", "--keep-alive", "30",
               "--bind", f"127.0.0.1:{port or self.port}", "--graceful-timeout", "1", "app:create_app()"]
        self._spawn(name, cmd, extra_env)

    def _spawn(self, name, cmd, extra_env=None):
        log = open(self.log_dir / f"{name}.log", "ab")
        env = {**self.env, **(extra_env or {})}
        # Its own process group, so that kill() reaches gunicorn's workers too.
        self.processes[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill a process (and its children) without warning, as a crash would."""
        proc = self.processes.pop(name)
        os.killpg(proc.pid, sig)
        proc.wait()

    @contextmanager
    def frozen(self, name: str):
        """SIGSTOP a process and its children (a stalled machine) for the `with` block, then SIGCONT: what
        it holds (a job's lease, its connections) stays, but nothing it does happens meanwhile."""
        group = self.processes[name].pid  # started with start_new_session: its group is its pid
        os.killpg(group, signal.SIGSTOP)
        try:
            yield
        finally:
            os.killpg(group, signal.SIGCONT)

    def worker_pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.processes.items() if name.startswith("worker")}

    def worker_of(self, job_id: str) -> str:
        """The name (as started here) of the worker running the job now."""
        node = self.job(job_id)["worker"].split("@")[0]  # Celery's node name, e.g. worker-a-1f2e3d@host
        return next(name for name in self.worker_pids() if node.startswith(name + "-"))

    def wait_workers(self, count: int, timeout: float = 90) -> None:
        """Until `count` workers send heartbeats (their model is loaded)."""
        pattern = f"{self.prefix}:worker:*"
        wait_until(lambda: len(list(self.redis.scan_iter(match=pattern))) >= count, timeout,
                   f"{count} worker heartbeats")

    def wait_ready(self, timeout: float = 90):
        def ready():
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.log_dir}/{name}.log")
            try:
                return httpx.get(self.base_url + "/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
        wait_until(ready, timeout, "the stack to be ready")

    def wait_api(self, base_url: str | None = None, timeout: float = 60):
        """Until an API process answers /health (it may have no worker yet: /ready would wait for one)."""
        def up():
            try:
                return httpx.get((base_url or self.base_url) + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
        wait_until(up, timeout, f"the API at {base_url or self.base_url}", interval=0.05)

    @contextmanager
    def serving(self, timeout: float = 90):
        """For a fixture (or a measurement): wait until the stack is ready, then, however the test ends, stop every
        process and remove this stack's keys."""
        try:
            self.wait_ready(timeout)
            yield self
        finally:
            self.stop_all()
            self.cleanup_redis()

    def stop(self, name: str):
        proc = self.processes.pop(name, None)
        if proc:
            terminate(proc)

    def stop_all(self, grace_s: float = 5):
        """Every process at once. A worker still running jobs after `grace_s` (Celery's warm shutdown waits for
        them; a hung one never ends) is killed: what follows (a test's teardown, the next measurement) needs the
        processes gone, not their jobs done."""
        procs = list(self.processes.values())
        self.processes.clear()
        terminate(*procs, grace_s=grace_s)

    def cleanup_redis(self):
        """Remove this stack's keys from every node (a node that is not answering is skipped)."""
        for node in self.nodes:
            try:
                for key in node.scan_iter(match=f"{self.prefix}:*", count=1000):
                    node.delete(key)
            except redis.RedisError:
                if node is self.redis:
                    raise

    def owned_keys(self) -> list[str]:
        """The Redis keys of this stack: its prefix's (on every node: the same name may be on several, e.g. a
        worker's heartbeat), and its queues' lists (Celery's and kombu's, on the home node)."""
        queues = [q for q in (self.env["INTERACTIVE_QUEUE"], self.env["BATCH_QUEUE"]) if self.redis.exists(q)]
        return [key for node in self.nodes for key in node.scan_iter(match=f"{self.prefix}:*", count=1000)] + queues

    def shard_of(self, job_id: str) -> int:
        """The index (in REDIS_SHARDS) of the shard that holds the job (or batch, or file) with this id."""
        return shard_index(job_id, len(self.shards))

    def job_redis(self, job_id: str) -> redis.Redis:
        """The client of the Redis that holds everything about this job (record, log, lease, cancel flag)."""
        return self.shards[self.shard_of(job_id)]

    def job(self, job_id: str) -> dict:
        return self.job_redis(job_id).hgetall(f"{self.prefix}:job:{job_id}")

    def sdk(self, api_key: str, asynchronous: bool = False, base_url: str | None = None,
            **options) -> openai.OpenAI | openai.AsyncOpenAI:
        """The official SDK's client (sync or async) on this stack's API (or another API process at `base_url`).
        No retries unless asked: a test sees every failure."""
        client_class = openai.AsyncOpenAI if asynchronous else openai.OpenAI
        options = {"max_retries": 0, "timeout": 120, **options}
        return client_class(base_url=(base_url or self.base_url) + "/v1", api_key=api_key, **options)


class RedisServer:
    """A private redis-server with the project's config (AOF, noeviction), for tests that restart Redis.
    `start` again after `stop`: the same port and data directory (what the AOF kept)."""

    def __init__(self, data_dir: Path, port: int | None = None):
        self.port = port or free_port()
        self.data_dir = data_dir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", str(ROOT / "config" / "redis.conf"), "--port", str(self.port), "--dir",
             str(self.data_dir), "--daemonize", "no", "--logfile", str(self.data_dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        wait_until(lambda: _pings(client), 10, f"redis-server on port {self.port}")

    def stop(self, graceful: bool = True) -> None:
        """Graceful: SIGTERM (Redis fsyncs its AOF and exits). Else SIGKILL: what a crash loses."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
            self.proc.wait(timeout=20)
        self.proc = None


def start_redis_shards(base_dir: Path, count: int) -> list[RedisServer]:
    """`count` private redis-servers, each with its own port and data directory (base_dir/shard{i}), started.
    Their URLs, in order, are a deployment's REDIS_SHARDS (`stack_env(shard_urls=...)`); the first is its home
    node. Stop them with `stop_redis_servers` (however the test ends)."""
    servers: list[RedisServer] = []
    try:
        for i in range(count):
            server = RedisServer(base_dir / f"shard{i}")
            servers.append(server)
            server.start()
    except BaseException:
        stop_redis_servers(servers)
        raise
    return servers


def stop_redis_servers(servers: list[RedisServer]) -> None:
    """Stop each (SIGTERM); one that does not go is SIGKILLed, so that none is left behind."""
    for server in servers:
        try:
            server.stop(graceful=True)
        except subprocess.TimeoutExpired:
            server.stop(graceful=False)


def _pings(client) -> bool:
    try:
        return client.ping()
    except redis.RedisError:
        return False


def iter_sse(lines):
    """The events of a server-sent event stream, from its lines: (event id or None, data), where data is the
    parsed JSON payload, or the text "[DONE]"."""
    event_id = None
    for line in lines:
        if line.startswith("id: "):
            event_id = int(line[4:])
        elif line.startswith("data: "):
            data = line[6:]
            yield event_id, (data if data == "[DONE]" else json.loads(data))
            event_id = None


def job_events_stream(client: openai.OpenAI | openai.AsyncOpenAI, job_id: str, last_event_id: int | None = None):
    """GET /v1/chat/completions/{id}/events through the official SDK's low-level client: a stream of
    chat.completion.chunk, as `chat.completions.create(stream=True)` gives (an awaitable of one, from an
    async client). From the start, or after `last_event_id` (the Last-Event-ID header)."""
    stream_class = openai.AsyncStream if isinstance(client, openai.AsyncOpenAI) else openai.Stream
    headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
    return client.get(f"/chat/completions/{job_id}/events", cast_to=ChatCompletionChunk, stream=True,
                      stream_cls=stream_class[ChatCompletionChunk], options={"headers": headers})


def chunk_text(chunk: ChatCompletionChunk) -> str:
    """The text one chunk (the SDK's object) adds: none in the role, finish and usage chunks."""
    return "".join(choice.delta.content or "" for choice in chunk.choices)


def same_server_shards(redis_url: str, count: int) -> list[str]:
    """`count` shard URLs on the Redis of `redis_url`: its database, then the ones below it (redis://h:p/15 ->
    /15, /14, /13). Pub/sub ignores the database, so each job's channel is still its own (its id is in it).
    A URL that names no database number (a Sentinel set's, a socket's) is left alone: one shard."""
    base, _, db = redis_url.rpartition("/")
    if count <= 1 or not db.isdigit() or not base.startswith(("redis://", "rediss://")) or int(db) < count - 1:
        return [redis_url]
    return [f"{base}/{int(db) - i}" for i in range(count)]


def stack_env(redis_url: str = DEFAULT_REDIS_URL, api_keys: tuple = (), max_model_len: int = 4096,
              shard_urls: list[str] | tuple = (), **overrides) -> dict:
    """A stack's environment on one Redis (`redis_url`), or with its job state sharded over `shard_urls`
    (REDIS_SHARDS: every URL, in order; REDIS_URL, the home node: the first). TEST_REDIS_SHARDS=N in the
    environment shards a one-Redis stack over N databases of that Redis (`same_server_shards`): the whole
    suite run on the sharded code paths (`TEST_REDIS_SHARDS=3 make test`)."""
    if not shard_urls and os.environ.get("TEST_REDIS_SHARDS"):
        shard_urls = same_server_shards(redis_url, int(os.environ["TEST_REDIS_SHARDS"]))
    if shard_urls:
        redis_url = shard_urls[0]
    run_id = uuid.uuid4().hex[:8]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("API_KEYS", "MODEL_", "REDIS_"))}
    env.update(REDIS_URL=redis_url, REDIS_PREFIX=f"test-{run_id}", INTERACTIVE_QUEUE=f"interactive-{run_id}",
               BATCH_QUEUE=f"batch-{run_id}",
               MODEL_SOURCE="tiny-random", MAX_MODEL_LEN=str(max_model_len), API_KEYS=",".join(api_keys),
               PORT=str(free_port()), SSE_KEEPALIVE_S="0.5", PYTHONUNBUFFERED="1")
    if shard_urls:
        env["REDIS_SHARDS"] = ",".join(shard_urls)
    env.update(overrides)
    return env


