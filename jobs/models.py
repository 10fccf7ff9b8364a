"""Which models are served, by which queues: a directory kept in Redis by the workers themselves.

Each worker pool serves one model (settings: SERVED_MODEL_NAME, INTERACTIVE_QUEUE, BATCH_QUEUE). Its
workers' heartbeats say so, and also refresh the model's entry in `{prefix}:models`. The API routes a
request to the queues of the model it names. `GET /v1/models` lists models with live workers. A model whose
pool was seen recently but has no live worker right now (a restart) still takes jobs: they wait in its queue.
A model never seen, or not seen for `model_remember_s`, is unknown: 404.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from jobs.store import JobStore


@dataclass(frozen=True)
class ModelRoute:
    id: str
    queue: str
    batch_queue: str
    aliases: tuple[str, ...] = field(default_factory=tuple)
    live_workers: int = 0

    def answers_to(self, name: str) -> bool:
        return name.lower() in (self.id.lower(), *(a.lower() for a in self.aliases))


def model_entry(settings) -> dict:
    """What a worker advertises about the model it serves."""
    return {"id": settings.served_model_name, "queue": settings.interactive_queue,
            "batch_queue": settings.batch_queue, "aliases": settings.served_model_aliases}


class ModelDirectory:
    def __init__(self, store: JobStore, remember_s: float, cache_s: float = 1.0):
        self.store = store
        self.remember_s = remember_s
        self.cache_s = cache_s
        self._cached: Optional[tuple[float, dict[str, ModelRoute]]] = None
        self._refreshing = threading.Lock()

    def routes(self) -> dict[str, ModelRoute]:
        """Every model seen within `remember_s`, with its count of live workers (cached for a second).

        One caller at a time refreshes an expired copy; the others meanwhile use the last copy rather than
        all reading Redis at once (under load, every request arriving in that moment used to)."""
        cached = self._cached
        if cached is not None and time.monotonic() - cached[0] < self.cache_s:
            return cached[1]
        if not self._refreshing.acquire(blocking=cached is None):  # only the very first read waits
            return cached[1]
        try:
            if self._cached is not cached:  # refreshed while we waited for the lock
                return self._cached[1]
            routes = self._read()
            self._cached = (time.monotonic(), routes)
            return routes
        finally:
            self._refreshing.release()

    def _read(self) -> dict[str, ModelRoute]:
        live: dict[str, int] = {}
        for worker in self.store.live_workers():
            model_id = worker.get("model_id")
            live[model_id] = live.get(model_id, 0) + 1
        routes = {}
        now = time.time()
        for model_id, raw in self.store.redis.hgetall(self.store.keys.models()).items():
            entry = json.loads(raw)
            if now - entry["last_seen"] <= self.remember_s:
                routes[model_id] = ModelRoute(model_id, entry["queue"], entry["batch_queue"],
                                              tuple(entry.get("aliases", ())), live.get(model_id, 0))
        return routes

    def resolve(self, name: str) -> Optional[ModelRoute]:
        return next((route for route in self.routes().values() if route.answers_to(name)), None)

    def live(self) -> list[ModelRoute]:
        return [route for route in self.routes().values() if route.live_workers > 0]
