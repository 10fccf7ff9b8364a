"""Per-key queues in front of each pool's Celery queue, so that one API key's backlog does not hold up the rest.

Interactive and background jobs are recorded *parked*: waiting in their key's own queue, per pool (the
Celery queue they go to). A dispatcher (jobs/fair_dispatch.py) moves them to the Celery queue round-robin
across keys, and only as far as that queue has room (a small margin beyond what the pool's workers hold: a
worker reserves only the jobs it runs), so a key that sends 2,000 jobs at once has only a few in Celery's
list, and a newly arriving key's job is next after one job of each other waiting key.

Round-robin alone would still leave a key arriving behind a flood waiting for one of the flood's running jobs
to end (a pool's slots all held by one key). So while other keys have been active on the pool lately (parked
or sent a job within `active_s`), a key's jobs in flight (taken until they end: in Celery's list or running) are
capped at a share of the pool (`key_cap`: the dispatcher gives its live slots minus a small reserve): the
flood leaves a slot or so free, and the other key's next job starts at once. A key at its cap keeps its turn,
and is skipped until one of its jobs ends. A key alone on a pool is not capped: it may use every slot.

A job that arrives while nobody waits on its pool (no key has a job parked) and Celery's list has room does not
stop in its key's queue: the script that records it takes it at once, by the same rules as `take` (no key's
turn is passed over: none is waiting), and the API sends it without a second call (the common case of a pool
that keeps up: one round trip per job fewer).

Redis layout, per Celery queue `{queue}` (under the configured prefix; keys are owner fingerprints, as
app/auth.py's `owner_of` files jobs under, never a raw API key):
  {prefix}:fair:{queue}:owner:{owner}  zset  the key's parked job ids, by park time (oldest leaves first)
  {prefix}:fair:{queue}:ring           zset  keys with parked jobs -> their turn: the lowest goes next, and a
                                             key served (or arriving) takes a new turn behind all others
  {prefix}:fair:{queue}:turn           string the turn counter
  {prefix}:fair:{queue}:parked         zset  every parked job of the queue, by park time (the caps count it)
  {prefix}:fair:{queue}:flight:{owner} zset  the key's jobs taken and not ended (sent, or running), by take time
  {prefix}:fair:{queue}:active         zset  key -> when it last parked or sent a job here (who else uses it)
  and in the job record, field `fair`: `parked` while waiting here, `sending` once a dispatcher took it and
  until it confirms the send (then the field is gone).

Why nothing is lost or sent twice: every move is one Lua script. A parked job is not in `{prefix}:queued`
(what the lost-delivery reaper watches: it has no message to lose); `take` moves it there, marked
`sending`, in the same step as it leaves its key's queue, so two dispatchers never take one job, and one that
dies before it confirms the send leaves a job the reaper sends again (JobStore.reap_lost). A second message
for one job is harmless: only one attempt starts it (jobs/transition.py). A job that starts or ends (a
cancel) leaves its key's queue in its transition, and a job that ends leaves its key's flight (`UNPARK`,
part of that script).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Optional

from jobs.scripts import ScriptSet

# Lua, part of the job transition script (jobs/transition.py): a parked job that starts or ends leaves its
# key's queue (and a key left with nothing parked, the rotation): `unpark`; a job that ends no longer counts
# against its key's share of the pool: `land`; `pool_parked`: whether any job waits parked on the pool (the
# worker that starts or ends a job pumps its pool only then: nothing to take otherwise). Reads `job`, `id` and
# `prefix` from there, and takes the record's `fair`, `queue` and `owner` fields (false where absent), which the
# transition has read already.
UNPARK = """
local function fair_base(queue, owner)
  return prefix .. ':fair:' .. (queue or 'interactive'), owner or 'anonymous'
end
local function unpark(fair, queue, owner)
  if fair == 'parked' then
    local base, key = fair_base(queue, owner)
    local mine = base .. ':owner:' .. key
    redis.call('ZREM', base .. ':parked', id)
    redis.call('ZREM', mine, id)
    if redis.call('EXISTS', mine) == 0 then redis.call('ZREM', base .. ':ring', key) end
  end
  if fair then redis.call('HDEL', job, 'fair') end
end
local function land(queue, owner)
  local base, key = fair_base(queue, owner)
  redis.call('ZREM', base .. ':flight:' .. key, id)
end
local function pool_parked(queue)  -- whether any key has a job parked on the pool (1/0)
  return redis.call('EXISTS', fair_base(queue) .. ':ring')
end
"""

# Lua, shared by park-or-take and take: `has_share(owner)`, whether a key may have one more job in flight. Yes
# with no cap (0), or while no other key parked or sent a job on the pool since `active_since` (alone lately:
# every slot is its); else while its jobs in flight (entries taken before `stale` dropped) are fewer than `cap`.
# `flying`: key -> its jobs in flight (read once per call, then counted by the caller); false: not capped.
SHARE_RULE = """
local function share_rule(active, base, cap, stale, active_since)
  redis.call('ZREMRANGEBYSCORE', active, '-inf', '(' .. active_since)
  local n_active = redis.call('ZCARD', active)
  local flying = {}
  local function has_share(owner)
    if cap <= 0 then return true end
    if flying[owner] == nil then
      local own = redis.call('ZSCORE', active, owner)
      if n_active - ((own and tonumber(own) >= active_since) and 1 or 0) == 0 then
        flying[owner] = false
      else
        local flight = base .. ':flight:' .. owner
        redis.call('ZREMRANGEBYSCORE', flight, '-inf', '(' .. stale)
        flying[owner] = redis.call('ZCARD', flight)
      end
    end
    return flying[owner] == false or flying[owner] < cap
  end
  return has_share, flying
end
"""

# KEYS: job, queued, parked, the owner's queue, ring, turn, active, the Celery queue (its Redis list), the owner's
# flight. ARGV: id, owner, now s, ttl s, then what `take` gets (TakeOffer): room (0: park, whatever the pool),
# key cap, in-flight entries taken before this are stale, keys that parked or sent a job since this are active,
# fair base. Runs in the MULTI that writes the record: the job is never recorded without being parked or sent.
# Returns 1 if the job was taken at once (the caller sends it and confirms, as after `take`), 0 if parked.
_PARK = SHARE_RULE + """
local job, queued, parked, mine, ring, turn, active = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local id, owner, now, ttl, room = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
-- Nobody waits on this pool (no key has a job parked) and Celery's list has room: the job goes at once, marked,
-- watched and in flight as `take` leaves what it takes, without a stay in its key's queue or a second call.
if room > 0 and redis.call('EXISTS', ring) == 0 and redis.call('LLEN', KEYS[8]) < room then
  local has_share = share_rule(active, ARGV[9], tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[8]))
  if has_share(owner) then
    redis.call('HSET', job, 'fair', 'sending')
    redis.call('ZADD', queued, now, id)  -- sent from now: watched until an attempt starts it
    redis.call('ZADD', KEYS[9], now, id)
    redis.call('ZADD', active, now, owner)
    for _, key in ipairs({KEYS[9], active}) do redis.call('EXPIRE', key, ttl) end
    return 1
  end
end
-- Parked: not in `queued` (JobStore.create records it unwatched): it has no message yet, its key's queue holds it
redis.call('HSET', job, 'fair', 'parked')
redis.call('ZADD', parked, now, id)
redis.call('ZADD', mine, now, id)
if not redis.call('ZSCORE', ring, owner) then  -- a key arriving: its turn comes after every other's
  redis.call('ZADD', ring, redis.call('INCR', turn), owner)
end
redis.call('ZADD', active, now, owner)
for i = 3, 7 do redis.call('EXPIRE', KEYS[i], ttl) end
return 0
"""

# KEYS: ring, turn, parked, queued, the Celery queue (its Redis list), active. ARGV: prefix, fair base, room
# (most messages the Celery list may hold), now s, key cap (most jobs in flight per key while others are
# active; 0: none), in-flight entries taken before this are stale (dropped), ttl s, keys that parked or sent
# a job since this are active. Returns the ids taken, in order; each is `sending`, watched (in queued), in flight.
_TAKE = SHARE_RULE + """
local ring, turn, parked, queued, active = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[6]
local prefix, base, now = ARGV[1], ARGV[2], ARGV[4]
local room = tonumber(ARGV[3]) - redis.call('LLEN', KEYS[5])
-- Most pumps (every job's end, every message received, every tick) find nothing to do: cheaply.
if room <= 0 or redis.call('EXISTS', ring) == 0 then return {} end
local ttl = ARGV[7]
local has_share, flying = share_rule(active, base, tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[8]))
local capped = {}  -- keys at their share of the pool: skipped this time, their turn kept
local out = {}
local steps = 0
while room > 0 and steps < 1000 do  -- bounded: stale ids (ended, expired) are skipped, not counted as room
  steps = steps + 1
  local owner
  for _, candidate in ipairs(redis.call('ZRANGE', ring, 0, -1)) do  -- in turn order
    if not capped[candidate] then
      if has_share(candidate) then owner = candidate break end
      capped[candidate] = true
    end
  end
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
    local status, fair = unpack(redis.call('HMGET', job, 'status', 'fair'))
    if status == 'queued' and fair == 'parked' then
      redis.call('HSET', job, 'fair', 'sending')
      redis.call('ZADD', queued, now, id)  -- sent from now: watched until an attempt starts it
      local flight = base .. ':flight:' .. owner
      redis.call('ZADD', flight, now, id)  -- counts against its key's share until it ends
      redis.call('EXPIRE', flight, ttl)
      if flying[owner] then flying[owner] = flying[owner] + 1 end
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


@dataclass(frozen=True)
class TakeOffer:
    """What a new job needs to skip its key's queue when nobody waits on its pool (FairDispatcher.offer): what
    `take` gets. room: most messages Celery's list may hold (0: always park)."""
    room: int
    key_cap: int
    active_since: float
    stale_before: Optional[float] = None  # default: a job TTL ago, as `take`'s


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
    def park(self, pipe, record, offer: Optional[TakeOffer] = None) -> None:
        """Part of the pipeline that writes the job's record (JobStore.create): the job waits in its key's
        queue of its pool; or, with an `offer` (FairDispatcher.offer) and nobody waiting on the pool, it is taken
        at once, as `take` would take it: the script's reply is 1, and the caller sends it and confirms."""
        base = self.base(record.queue)
        offer = offer or TakeOffer(room=0, key_cap=0, active_since=0.0)
        stale_before = record.created_at - self.ttl_s if offer.stale_before is None else offer.stale_before
        self._park(keys=[f"{self.prefix}:job:{record.id}", f"{self.prefix}:queued", self.parked(record.queue),
                         self.owner_queue(record.queue, record.owner), self.ring(record.queue), f"{base}:turn",
                         f"{base}:active", record.queue, f"{base}:flight:{record.owner}"],
                   args=[record.id, record.owner, repr(record.created_at), self.ttl_s, int(offer.room),
                         int(offer.key_cap), repr(stale_before), repr(offer.active_since), base], client=pipe)

    def take(self, queue: str, room: int, key_cap: int = 0, stale_before: Optional[float] = None,
             active_s: float = 60.0) -> list[str]:
        """Up to `room` minus the messages already in the Celery queue, round-robin across keys, oldest first
        within a key, skipping keys with `key_cap` jobs in flight (0: no cap) while another key parked a job
        within `active_s`: each marked `sending`, to be sent now and then confirmed (`confirm_sent`). In-flight
        entries taken before `stale_before` (default: a job TTL ago) are dropped: a job that never ended must
        not hold its key's share for ever."""
        base, now = self.base(queue), time.time()
        stale_before = now - self.ttl_s if stale_before is None else stale_before
        return self._take(keys=[self.ring(queue), f"{base}:turn", self.parked(queue), f"{self.prefix}:queued",
                                queue, f"{base}:active"],
                          args=[self.prefix, base, int(room), repr(now), int(key_cap), repr(stale_before),
                                self.ttl_s, repr(now - active_s)])

    def confirm_sent(self, job_ids: Iterable[str]) -> None:
        """Their messages are in the Celery queue: the lost-delivery reaper treats them as any sent job."""
        keys = [f"{self.prefix}:job:{job_id}" for job_id in job_ids]
        if keys:
            self._confirm(keys=keys, args=[])

    # --- reads
    def in_flight(self, queue: str, owner: str) -> int:
        """The key's jobs taken from its queue and not ended yet."""
        return int(self.redis.zcard(f"{self.base(queue)}:flight:{owner}"))

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
