"""Operational numbers kept in Redis, readable in O(1) at scrape time: helpers both the API and the workers
call. Like the rest of `jobs/`, this imports neither Flask nor torch (nor prometheus_client).

Redis layout (under the configured prefix, next to the keys listed in jobs/records.py):
  {prefix}:metrics:jobs:{state}   zset   job id -> when it entered `state` (one zset per JobStatus). A job is
                                         in exactly one of them: entering a state removes it from the others.
                                         Entries older than the job TTL are dropped at scrape time (their
                                         records are gone).
  {prefix}:metrics:jobs_total     hash   state -> how many jobs ever entered it (a Prometheus counter)
Both expire after 2 x job TTL without a write, so an abandoned prefix leaves nothing behind.

A new job enters `queued` here (`job_state`, in the pipeline that records it); every later change of state
moves its entry inside the job's transition script (jobs/transition.py: `enter_state`), in the same step as
the state itself, so no extra round trip per change and no entry out of step with its record. The time of a
job's first text is stamped on its record by the script that logs that text.

Why sorted sets rather than +1/-1 counters: entering a state is idempotent (a redelivered job entering
`in_progress` twice, or a caller that records a state twice, changes nothing), and nothing drifts if a
process dies between two writes. ZCOUNT is O(log n) at scrape.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Iterable, Optional

from jobs.records import Keys
from jobs.scripts import ScriptSet

log = logging.getLogger(__name__)

JOB_STATES = ("queued", "in_progress", "completed", "failed", "cancelled")

# The fields a worker's heartbeat carries about its engine (from Engine.stats()), summed over workers.
WORKER_LOAD_FIELDS = ("running", "waiting", "kv_blocks_used", "kv_blocks_total", "graph_steps", "eager_steps",
                      "kv_blocks_cached", "prefix_cache_queries", "prefix_cache_hits")

# Kombu's Redis transport keeps a queue's messages in the list named after it, and messages sent with a
# priority in sibling lists `{queue}\x06\x16{step}`; Celery and our batch queue send none, but count them.
_KOMBU_PRIORITY_SEP = "\x06\x16"
_KOMBU_PRIORITY_STEPS = (3, 6, 9)

# KEYS: the state zsets (JOB_STATES order), then the totals hash.
# ARGV: job id, index of the new state (1-based), its name, now, oldest score kept, key ttl (s), whether the job is
# new (1: in no other state's set yet, none to leave).
_ENTER_STATE = """
local target = tonumber(ARGV[2])
if ARGV[7] ~= '1' then
  for i = 1, #KEYS - 1 do
    if i ~= target then redis.call('ZREM', KEYS[i], ARGV[1]) end
  end
end
local added = redis.call('ZADD', KEYS[target], 'NX', ARGV[4], ARGV[1])
if added == 1 then redis.call('HINCRBY', KEYS[#KEYS], ARGV[3], 1) end
redis.call('ZREMRANGEBYSCORE', KEYS[target], '-inf', '(' .. ARGV[5])
redis.call('EXPIRE', KEYS[target], ARGV[6])
redis.call('EXPIRE', KEYS[#KEYS], ARGV[6])
return added
"""


def _state_name(state) -> str:
    name = getattr(state, "value", state)  # a JobStatus or its value
    if name not in JOB_STATES:
        raise ValueError(f"unknown job state {state!r}")
    return name


class JobTelemetry:
    """Job-state bookkeeping for metrics. One per JobStore (same client, prefix and TTL)."""

    def __init__(self, client, prefix: str, ttl_s: int, scripts: Optional[ScriptSet] = None):
        self.redis = client
        self.prefix = prefix
        self.ttl_s = int(ttl_s)
        self.scripts = scripts or ScriptSet(client)  # a caller's pipeline that records a state runs through it
        self._enter = self.scripts.register(_ENTER_STATE)

    def state_key(self, state) -> str:
        return f"{self.prefix}:metrics:jobs:{_state_name(state)}"

    @property
    def totals_key(self) -> str:
        return f"{self.prefix}:metrics:jobs_total"

    def job_key(self, job_id: str) -> str:
        return Keys(self.prefix).job(job_id)

    # --- writes. Call them after the state change succeeded. Without `pipe` they are best effort: a failure
    # is logged, never raised (metrics must not fail a job), and the next state a job enters repairs its entry.
    # With `pipe` the write joins the caller's pipeline, and its answer comes at the caller's execute().
    def job_state(self, job_id: str, state, pipe=None, now: Optional[float] = None, new: bool = False) -> None:
        """Record that `job_id` is now in `state` (a JobStatus or its value). Idempotent. `new`: a job just
        recorded, in no state before (nothing to take it out of: four calls fewer per job)."""
        if pipe is not None:
            self._job_state(pipe, job_id, state, now, new)
            return
        try:
            self.scripts.run(lambda p: self._job_state(p, job_id, state, now, new), transaction=False)
        except ValueError:
            raise  # an unknown state: a bug in the caller
        except Exception as exc:
            log.warning("telemetry: recording job %s's state failed: %s", job_id, exc)

    def _job_state(self, client, job_id: str, state, now: Optional[float], new: bool) -> None:
        name = _state_name(state)
        now = time.time() if now is None else now
        keys = [self.state_key(s) for s in JOB_STATES] + [self.totals_key]
        args = [job_id, JOB_STATES.index(name) + 1, name, repr(now), repr(now - self.ttl_s), 2 * self.ttl_s, int(new)]
        self._enter(keys=keys, args=args, client=client)

    # --- reads (scrape time)
    def job_counts(self, now: Optional[float] = None) -> tuple[dict[str, int], dict[str, int]]:
        """({state: jobs in it now}, {state: jobs that ever entered it}), in one round trip."""
        horizon = (time.time() if now is None else now) - self.ttl_s
        with self.redis.pipeline(transaction=False) as pipe:
            for state in JOB_STATES:
                pipe.zremrangebyscore(self.state_key(state), "-inf", f"({horizon!r}")  # records gone: drop
                pipe.zcount(self.state_key(state), f"({horizon!r}", "+inf")
            pipe.hgetall(self.totals_key)
            *counts, totals = pipe.execute()
        current = counts[1::2]
        return (dict(zip(JOB_STATES, (int(n) for n in current))),
                {state: int(_decode(totals.get(state) or totals.get(state.encode(), 0))) for state in JOB_STATES})


def queue_depths(client, queues: Iterable[str]) -> dict[str, int]:
    """Messages waiting in each kombu/Celery Redis queue (LLEN of its list(s)), in one round trip."""
    queues = [q for q in dict.fromkeys(queues) if q]
    with client.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.llen(queue)
            for step in _KOMBU_PRIORITY_STEPS:
                pipe.llen(f"{queue}{_KOMBU_PRIORITY_SEP}{step}")
        lengths = pipe.execute()
    per_queue = 1 + len(_KOMBU_PRIORITY_STEPS)
    return {queue: sum(int(n) for n in lengths[i * per_queue:(i + 1) * per_queue])
            for i, queue in enumerate(queues)}


def model_directory(client, models_key: str) -> dict[str, dict]:
    """The model directory the workers keep (jobs/models.py): model id -> {"queue", "batch_queue",
    "last_seen", ...}. Unreadable entries are skipped."""
    entries = {}
    for model_id, raw in client.hgetall(models_key).items():
        try:
            entry = json.loads(raw)
        except (TypeError, ValueError):
            continue
        if isinstance(entry, dict):
            entries[_decode(model_id)] = entry
    return entries


def worker_load(engine_stats: Optional[dict]) -> dict[str, int]:
    """The heartbeat fields a worker adds from `engine.stats()` (missing ones count as 0)."""
    stats = engine_stats or {}
    return {name: int(stats.get(name, 0) or 0) for name in WORKER_LOAD_FIELDS}


def aggregate_workers(heartbeats: Iterable[dict]) -> dict[str, int]:
    """Sum of the load fields over live workers' heartbeats, plus `workers`: how many there are."""
    total = {name: 0 for name in WORKER_LOAD_FIELDS}
    count = 0
    for beat in heartbeats:
        count += 1
        for name in WORKER_LOAD_FIELDS:
            try:
                total[name] += int(beat.get(name, 0) or 0)
            except (TypeError, ValueError):
                pass
    total["workers"] = count
    return total


def aggregate_workers_by_model(heartbeats: Iterable[dict]) -> dict[str, dict[str, int]]:
    """`aggregate_workers` per served model (the heartbeat's `model_id`; `model` or "unknown" without)."""
    groups: dict[str, list[dict]] = {}
    for beat in heartbeats:
        model = str(beat.get("model_id") or beat.get("model") or "unknown")
        groups.setdefault(model, []).append(beat)
    return {model: aggregate_workers(beats) for model, beats in groups.items()}


def _decode(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
