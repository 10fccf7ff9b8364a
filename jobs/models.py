"""Which models are served, by which queues: a directory kept in Redis by the workers themselves.

Each worker pool serves one model (settings: SERVED_MODEL_NAME, INTERACTIVE_QUEUE, BATCH_QUEUE). Its
workers' heartbeats say so, and also refresh the model's entry in `{prefix}:models`. The API routes a
request to the queues of the model it names. `GET /v1/models` lists the configured model and the models
with live workers.

- The model the API's own settings name (`configured`: in a deployment, the same settings as its workers) is
  always known, from the first request on: before its first worker has loaded (a fresh start can take a
  minute on a GPU), its requests wait in its queue. Its workers' entry, while remembered, says where they
  listen.
- A pool seen recently but with no live worker right now (a restart) still takes jobs: they wait in its
  queue.
- A model neither configured nor seen within `model_remember_s` is unknown: 404.
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
    slots: int = 0  # jobs its live workers hold at once (their concurrency, added up)

    def answers_to(self, name: str) -> bool:
        return name.lower() in (self.id.lower(), *(a.lower() for a in self.aliases))


def model_entry(settings) -> dict:
    """What a worker advertises about the model it serves; the API's own (its `configured` route) alike."""
    return {"id": settings.served_model_name, "queue": settings.interactive_queue,
            "batch_queue": settings.batch_queue, "aliases": settings.served_model_aliases}


def _route(entry: dict, workers: list[dict]) -> ModelRoute:
    """A model's route from its entry (what its workers advertise), with those of `workers` serving it."""
    serving = [w for w in workers if w.get("model_id") == entry["id"]]
    return ModelRoute(entry["id"], entry["queue"], entry["batch_queue"], tuple(entry.get("aliases", ())),
                      live_workers=len(serving), slots=sum(w.get("concurrency", 1) for w in serving))


class ModelDirectory:
    def __init__(self, store: JobStore, remember_s: float, configured: Optional[dict] = None,
                 cache_s: float = 1.0):
        """`configured`: the model entry (`model_entry(settings)`) of the model this deployment serves."""
        self.store = store
        self.remember_s = remember_s
        self.configured = configured
        self.cache_s = cache_s
        self._cached: Optional[tuple[float, dict[str, ModelRoute]]] = None
        self._refreshing = threading.Lock()

    def routes(self) -> dict[str, ModelRoute]:
        """Every model a request may name: the configured one, and every pool seen within `remember_s`, with
        their live workers (cached for a second).

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
        workers = self.store.live_workers()
        entries = {self.configured["id"]: self.configured} if self.configured else {}
        now = time.time()
        for model_id, raw in self.store.redis.hgetall(self.store.keys.models()).items():
            entry = json.loads(raw)
            if now - entry["last_seen"] <= self.remember_s:
                entries[model_id] = entry  # for the configured model too: its workers know their queues
        return {model_id: _route(entry, workers) for model_id, entry in entries.items()}

    def resolve(self, name: str) -> Optional[ModelRoute]:
        return next((route for route in self.routes().values() if route.answers_to(name)), None)

    def listed(self) -> list[ModelRoute]:
        """What `GET /v1/models` shows: the configured model, even before its first worker (clients list
        models before their first request), and the other pools that have live workers now."""
        configured = self.configured["id"] if self.configured else None
        return [route for route in self.routes().values() if route.live_workers or route.id == configured]
