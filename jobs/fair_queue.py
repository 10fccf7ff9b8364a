"""Per-key queues in front of each pool's Celery queue, so that one API key's backlog does not hold up the rest.

Interactive and background jobs are recorded *parked*: waiting in their key's own queue, per pool (the
Celery queue they go to). A dispatcher (jobs/fair_dispatch.py) moves them to the Celery queue round-robin
across keys, and only as far as that queue has room (a small margin beyond what the pool's workers hold: a
worker reserves only the jobs it runs), so a key that sends 2,000 jobs at once has only a few in Celery's
list, and a newly arriving key's job is next after one job of each other waiting key.

Redis layout, per Celery queue `{queue}` (under the configured prefix; keys are owner fingerprints, as
app/auth.py's `owner_of` files jobs under, never a raw API key):
  {prefix}:fair:{queue}:owner:{owner}  zset  the key's parked job ids, by park time (oldest leaves first)
  {prefix}:fair:{queue}:ring           zset  keys with parked jobs -> their turn: the lowest goes next, and a
                                             key served (or arriving) takes a new turn behind all others
  {prefix}:fair:{queue}:turn           string the turn counter
  {prefix}:fair:{queue}:parked         zset  every parked job of the queue, by park time (the caps count it)
  and in the job record, field `fair`: `parked` while waiting here, `sending` once a dispatcher took it and
  until it confirms the send (then the field is gone).

Why nothing is lost or sent twice: every move is one Lua script. A parked job is not in `{prefix}:queued`
(what the lost-delivery reaper watches: it has no message to lose); `take` moves it there, marked
`sending`, in the same step as it leaves its key's queue, so two dispatchers never take one job, and one that
dies before it confirms the send leaves a job the reaper sends again (JobStore.reap_lost). A second message
for one job is harmless: only one attempt starts it (jobs/transition.py). A job that starts or ends (a
cancel) leaves its key's queue in its transition (`UNPARK`, part of that script).
"""
from __future__ import annotations

import time
from typing import Iterable

from jobs.scripts import ScriptSet

# Lua, part of the job transition script (jobs/transition.py): a parked job that starts or ends leaves its
# key's queue (and a key left with nothing parked, the rotation). Reads `job`, `id` and `prefix` from there.
UNPARK = """
local function unpark()
  if redis.call('HGET', job, 'fair') == 'parked' then
    local base = prefix .. ':fair:' .. (redis.call('HGET', job, 'queue') or 'interactive')
    local owner = redis.call('HGET', job, 'owner') or 'anonymous'
    local mine = base .. ':owner:' .. owner
    redis.call('ZREM', base .. ':parked', id)
    redis.call('ZREM', mine, id)
    if redis.call('EXISTS', mine) == 0 then redis.call('ZREM', base .. ':ring', owner) end
  end
  redis.call('HDEL', job, 'fair')
end
"""

# KEYS: job, queued, parked, the owner's queue, ring, turn. ARGV: id, owner, now s, ttl s.
# Runs in the MULTI that writes the record: the job is never recorded without being parked or sent.
_PARK = """
redis.call('ZREM', KEYS[2], ARGV[1])  -- no message yet: its key's queue watches it, not reap_lost
redis.call('HSET', KEYS[1], 'fair', 'parked')
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
if not redis.call('ZSCORE', KEYS[5], ARGV[2]) then  -- a key arriving: its turn comes after every other's
  redis.call('ZADD', KEYS[5], redis.call('INCR', KEYS[6]), ARGV[2])
end
for i = 3, 6 do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
return 1
"""

# KEYS: ring, turn, parked, queued, the Celery queue (its Redis list). ARGV: prefix, fair base, room (most
# messages the Celery list may hold), now s. Returns the ids taken, in order; each is `sending` and watched.
_TAKE = """
local ring, turn, parked, queued = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local prefix, base, now = ARGV[1], ARGV[2], ARGV[4]
local room = tonumber(ARGV[3]) - redis.call('LLEN', KEYS[5])
local out = {}
local steps = 0
while room > 0 and steps < 1000 do  -- bounded: stale ids (ended, expired) are skipped, not counted as room
  steps = steps + 1
  local owner = redis.call('ZRANGE', ring, 0, 0)[1]
  if not owner then break end
  local mine = base .. ':owner:' .. owner
  local popped = redis.call('ZPOPMIN', mine)
  if redis.call('EXISTS', mine) == 0 then
    redis.call('ZREM', ring, owner)
  else
    redis.call('ZADD', ring, redis.call('INCR', turn), owner)  -- served: to the back of the rotation
  end
  local id = popped[1]
  if id then
    redis.call('ZREM', parked, id)
    local job = prefix .. ':job:' .. id
    if redis.call('HGET', job, 'status') == 'queued' and redis.call('HGET', job, 'fair') == 'parked' then
      redis.call('HSET', job, 'fair', 'sending')
      redis.call('ZADD', queued, now, id)  -- sent from now: watched until an attempt starts it
      out[#out + 1] = id
      room = room - 1
    end
  end
end
return out
"""

# KEYS: jobs. Their sends went through: no longer `sending` (a job started meanwhile has no field left).
_CONFIRM = """
for _, job in ipairs(KEYS) do
  if redis.call('HGET', job, 'fair') == 'sending' then redis.call('HDEL', job, 'fair') end
end
return 0
"""


class FairQueue:
    """The per-key queues of every pool, in the job store's Redis (one per JobStore: `store.fair`)."""

    def __init__(self, client, prefix: str, ttl_s: int, scripts: ScriptSet):
        self.redis = client
        self.prefix = prefix
        self.ttl_s = int(ttl_s)
        self._park = scripts.register(_PARK)
        self._take = scripts.register(_TAKE)
        self._confirm = scripts.register(_CONFIRM)

    # --- key names
    def base(self, queue: str) -> str:
        return f"{self.prefix}:fair:{queue}"

    def owner_queue(self, queue: str, owner: str) -> str:
        return f"{self.base(queue)}:owner:{owner}"

    def ring(self, queue: str) -> str:
        return f"{self.base(queue)}:ring"

    def parked(self, queue: str) -> str:
        return f"{self.base(queue)}:parked"

    # --- moves
    def park(self, pipe, record) -> None:
        """Part of the pipeline that writes the job's record (JobStore.create): the job waits in its key's
        queue of its pool."""
        base = self.base(record.queue)
        self._park(keys=[f"{self.prefix}:job:{record.id}", f"{self.prefix}:queued", self.parked(record.queue),
                         self.owner_queue(record.queue, record.owner), self.ring(record.queue), f"{base}:turn"],
                   args=[record.id, record.owner, repr(record.created_at), self.ttl_s], client=pipe)

    def take(self, queue: str, room: int) -> list[str]:
        """Up to `room` minus the messages already in the Celery queue, round-robin across keys, oldest first
        within a key: each marked `sending`, to be sent now and then confirmed (`confirm_sent`)."""
        base = self.base(queue)
        return self._take(keys=[self.ring(queue), f"{base}:turn", self.parked(queue), f"{self.prefix}:queued",
                                queue],
                          args=[self.prefix, base, int(room), repr(time.time())])

    def confirm_sent(self, job_ids: Iterable[str]) -> None:
        """Their messages are in the Celery queue: the lost-delivery reaper treats them as any sent job."""
        keys = [f"{self.prefix}:job:{job_id}" for job_id in job_ids]
        if keys:
            self._confirm(keys=keys, args=[])

    # --- reads
    def parked_count(self, queue: str) -> int:
        return int(self.redis.zcard(self.parked(queue)))

    def parked_by_owner(self, queue: str) -> dict[str, int]:
        """Owner fingerprint -> its parked jobs, for the keys with any (two round trips)."""
        owners = self.redis.zrange(self.ring(queue), 0, -1)
        if not owners:
            return {}
        with self.redis.pipeline(transaction=False) as pipe:
            for owner in owners:
                pipe.zcard(self.owner_queue(queue, owner))
            counts = pipe.execute()
        return {owner: int(n) for owner, n in zip(owners, counts) if n}
