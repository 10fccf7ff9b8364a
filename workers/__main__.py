"""`python -m workers [extra celery args]`: one worker, configured from settings, kept alive.

The process that runs this is a small supervisor: it loads no model and starts the real worker as a child
process (`--child`), whose engine process loads the model (spawned, never forked). If the child dies
(a crash, an out-of-memory kill, or Celery giving up after a broker outage), the supervisor starts it
again; its running jobs are picked up through their leases. SIGTERM/SIGINT stop both.

The child runs Celery's threads pool: every job of this worker runs in one process, which feeds the one
engine (itself in a process of its own, spawned by the child: workers/engine/process.py). `--concurrency`
is how many jobs it holds at once (the engine's batch), and with a prefetch multiplier of 1 it never
reserves more than it can start, so other workers get the rest.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time

from config.logging import setup_logging
from config.settings import get_settings

log = logging.getLogger("workers.supervisor")


def node_name() -> str:
    return os.environ.get("HONCHO_PROCESS_NAME") or f"worker-{os.getpid()}"


def worker_argv(settings, extra: list[str]) -> list[str]:
    concurrency = settings.worker_concurrency or settings.max_num_seqs
    return ["worker", "--pool", "threads", "--concurrency", str(concurrency), "--prefetch-multiplier", "1",
            "--queues", settings.interactive_queue, "--hostname", f"{node_name()}@{socket.gethostname()}",
            "--without-gossip", "--without-mingle", "--loglevel", "INFO", *extra]


def run_child(extra: list[str]) -> None:
    setup_logging("worker", take_over_celery=True)
    from jobs.celery_app import celery_app
    celery_app.worker_main(worker_argv(get_settings(), extra))


def supervise(extra: list[str]) -> int:
    setup_logging("worker")
    os.environ.setdefault("HONCHO_PROCESS_NAME", node_name())  # the child keeps our name
    stopping = False
    child: subprocess.Popen | None = None

    def stop(signum, _frame):
        nonlocal stopping
        stopping = True
        if child and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        started = time.monotonic()
        child = subprocess.Popen([sys.executable, "-m", "workers", "--child", *extra])
        code = child.wait()
        if stopping:
            return code
        pause = 1.0 if time.monotonic() - started > 30 else 5.0  # don't spin on a worker that cannot start
        log.error("worker exited with code %s; starting it again in %.0f s", code, pause)
        time.sleep(pause)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--child"]:
        run_child(args[1:])
    else:
        sys.exit(supervise(args))
