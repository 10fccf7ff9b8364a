"""`python -m workers [extra celery args]`: start one Celery worker process, configured from settings.

The threads pool keeps every job of this process in one process, beside the one model and its engine;
`--concurrency` is how many jobs it holds at once (the engine's batch), and with a prefetch multiplier
of 1 it never reserves more than it can start, so other workers get the rest.
"""
from __future__ import annotations

import os
import socket
import sys

from config.settings import get_settings
from workers.celery_app import celery_app


def worker_argv(settings, extra: list[str]) -> list[str]:
    name = os.environ.get("HONCHO_PROCESS_NAME") or f"worker-{os.getpid()}"
    concurrency = settings.worker_concurrency or settings.max_num_seqs
    return ["worker", "--pool", "threads", "--concurrency", str(concurrency), "--prefetch-multiplier", "1",
            "--queues", settings.interactive_queue, "--hostname", f"{name}@{socket.gethostname()}",
            "--without-gossip", "--without-mingle", "--loglevel", "INFO", *extra]


if __name__ == "__main__":
    celery_app.worker_main(worker_argv(get_settings(), sys.argv[1:]))
