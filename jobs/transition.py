"""The one way a job's state changes: a single Lua script, run atomically by Redis.

Every change of a job's life goes through it: a worker starting an attempt, an attempt writing its events
and its end, the reaper putting a dead attempt's job back on the queue, and the API ending a job that no
attempt runs (a cancel while queued, a job it could not queue). So the rules are in one place:

  * who may act: an attempt only while it holds the job's lease (its token); a caller without an attempt
    only while none holds it (else the answer is `running`, and the caller asks the attempt to stop by
    setting the cancel flag); the reaper only once the lease has lapsed;
  * events are numbered by the log: the log's entries are its events, contiguous from seq 0, so its length
    (XLEN, O(1)) is the next seq. An attempt learns it when it starts and then knows the seq of every event
    it writes; a write says the seq of its first event, and the script skips those the log already has (a
    retry after Redis went away before its reply: nothing is repeated) and refuses a write that would leave
    a hole (`gap`: Redis lost events it had acknowledged, e.g. a crash between AOF syncs);
  * record, log and live channel change in the same step, and the answer says what happened.

The hot path, an attempt's events while it runs (no change of state), has its own lighter script, APPEND,
below: one call carries the events of every run in a publisher cycle whose keys live together.

Actions (ARGV[1]):
  start    queued (or in_progress with a lapsed lease) -> in_progress under a new lease; detail: attempt no.,
           the seq its first event will have, the record as it now is (its fields, flat), and whether any
           job waits parked on its pool (1/0: a worker pumps its pool only if one does, Transition.parked)
  write    the holder's end, with its last events (events alone go through APPEND); detail: whether any job
           waits parked on the job's pool (1/0), as `start`'s last
  end      a caller without an attempt ends the job (cancelled, failed) with one event
  requeue  in_progress whose lease lapsed -> queued; detail: the job's kind and queue (to send it again)
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

from jobs.fair_queue import UNPARK
from jobs.records import JobError, JobEvent, JobResult, JobStatus


class Outcome(str, enum.Enum):
    APPLIED = "applied"
    FENCED = "fenced"          # another attempt holds the lease (or none does, for `write`)
    RUNNING = "running"        # an attempt holds the lease: `end` is not for a running job
    TERMINAL = "terminal"      # the job is over already
    MISSING = "missing"        # no such job (expired)
    NOT_LAPSED = "not_lapsed"  # `requeue`: the lease was renewed since the reaper looked, or the job is queued
    GAP = "gap"                # the log lacks events this attempt was told were logged (Redis lost them)


# Shared by both scripts: log events from ARGV[from], ARGV[from + 2], ... up to ARGV[to] (each a (log json,
# live json) pair without its "seq") as seq `seq`, `seq` + 1, ..., and publish them. Returns how many.
LOG_EVENTS = """
local function log_events(log, channel, from, to, seq)
  for i = from, to, 2 do
    local head = '{"seq":' .. seq .. ','
    redis.call('XADD', log, '0-' .. (seq + 1), 'e', head .. string.sub(ARGV[i], 2))  -- entry ids: 0-(seq + 1)
    redis.call('PUBLISH', channel, head .. string.sub(ARGV[i + 1], 2))
    seq = seq + 1
  end
  return math.max(0, math.floor((to - from) / 2) + 1)
end
"""

# Part of the transition script: the job's entry in the metrics' state zsets (jobs/telemetry.py), moved in the
# same step as its state: from the state it leaves to the one it enters (counted in the totals once).
# A finished state's set only grows (its entries never leave for another state): each end also trims it of the
# entries older than the records, so that it stays bounded where nobody scrapes /metrics (job_counts trims too).
ENTER_STATE = """
local function enter_state(old, new)
  local base, totals = prefix .. ':metrics:jobs:', prefix .. ':metrics:jobs_total'
  local entered = base .. new
  if old ~= new then redis.call('ZREM', base .. old, id) end
  if redis.call('ZADD', entered, 'NX', now_s, id) == 1 then redis.call('HINCRBY', totals, new, 1) end
  if new ~= 'queued' and new ~= 'in_progress' then
    redis.call('ZREMRANGEBYSCORE', entered, '-inf', '(' .. (tonumber(now_s) - tonumber(log_ttl)))
  end
  redis.call('EXPIRE', entered, 2 * log_ttl)
  redis.call('EXPIRE', totals, 2 * log_ttl)
end
"""

# KEYS: job, lease, log, leases, queued, cancel.
# ARGV: action, job id, token, now ms, now s, lease ms, channel, log ttl s, key prefix, worker,
#       seq of the first event (`write`: the writer's; else ignored), ending status ('' = none), n record
#       fields, then n field/value pairs, then one (log json, live json) pair per event, each without "seq".
# Returns {outcome, cancel flag set (0/1), detail, detail}. A job leaving `queued` (started, or ended while
# it waits) also leaves its key's fair queue if it is parked there (`unpark`, jobs/fair_queue.py); a job that
# ends leaves its key's flight (`land`: its share of the pool); every change of state moves the job's entry
# in the metrics (`enter_state`).
SCRIPT = """
local job, lease, log, leases, queued, cancel = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local action, id, token = ARGV[1], ARGV[2], ARGV[3]
local now_ms, now_s, lease_ms = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local channel, log_ttl, prefix, worker = ARGV[7], ARGV[8], ARGV[9], ARGV[10]
""" + UNPARK + LOG_EVENTS + ENTER_STATE + """
local first_seq, ending, nfields = tonumber(ARGV[11]), ARGV[12], tonumber(ARGV[13])
local first_event = 14 + 2 * nfields

local cancel_flag = redis.call('EXISTS', cancel)
-- The record's fields this script reads, in one call.
local status, fair, queue, owner, kind, started_at, attempts, delivered_to =
  unpack(redis.call('HMGET', job, 'status', 'fair', 'queue', 'owner', 'kind', 'started_at', 'attempts', 'delivered_to'))
if not status then return {'missing', cancel_flag, '', ''} end
if status ~= 'queued' and status ~= 'in_progress' then
  if action == 'requeue' then redis.call('ZREM', leases, id) end
  return {'terminal', cancel_flag, status, ''}
end

-- 1. Who may make this change.
local holder = redis.call('GET', lease)
if action == 'start' then
  if holder then return {'fenced', cancel_flag, '', ''} end
elseif action == 'write' then
  if holder ~= token then return {'fenced', cancel_flag, '', ''} end
elseif action == 'end' then
  if holder then return {'running', cancel_flag, '', ''} end
elseif action == 'requeue' then
  if status ~= 'in_progress' then
    redis.call('ZREM', leases, id)
    return {'not_lapsed', cancel_flag, '', ''}
  end
  if holder then  -- renewed since the reaper read the index: look again when it may have lapsed
    redis.call('ZADD', leases, now_ms + redis.call('PTTL', lease), id)
    return {'not_lapsed', cancel_flag, '', ''}
  end
else
  return redis.error_reply('unknown job transition ' .. tostring(action))
end

-- 2. The events. The log's length is the next seq; a write skips the events the log already has.
if first_event <= #ARGV then
  local seq = redis.call('XLEN', log)
  local from = first_event
  if action == 'write' then
    if seq < first_seq then return {'gap', cancel_flag, seq, ''} end
    from = first_event + 2 * (seq - first_seq)
  end
  local logged = log_events(log, channel, from, #ARGV - 1, seq)
  if logged > 0 then redis.call('EXPIRE', log, log_ttl) end
  if seq == 0 and logged > 1 then  -- the job's first text came with its end (APPEND stamps it otherwise)
    redis.call('HSETNX', job, 'first_token_at', now_s)
  end
end

-- 3. The state.
if ending ~= '' then
  redis.call('HSET', job, 'status', ending, 'finished_at', now_s, unpack(ARGV, 14, first_event - 1))
  enter_state(status, ending)
  redis.call('DEL', lease)
  redis.call('ZREM', leases, id)
  if action ~= 'write' then redis.call('ZREM', queued, id) end  -- the holder's job left `queued` when it started
  unpark(fair, queue, owner)
  land(queue, owner)
  if owner then redis.call('ZREM', prefix .. ':owner:' .. owner .. ':unfinished', id) end
  return {'applied', cancel_flag, pool_parked(queue), ''}
elseif action == 'start' then
  redis.call('SET', lease, token, 'PX', lease_ms)
  redis.call('ZADD', leases, now_ms + lease_ms, id)
  redis.call('ZREM', queued, id)
  local attempt = (tonumber(attempts) or 0) + 1
  redis.call('HSET', job, 'status', 'in_progress', 'worker', worker, 'attempt_started_at', now_s, 'attempts', attempt,
             'started_at', started_at or now_s)
  enter_state(status, 'in_progress')
  if delivered_to then redis.call('HDEL', job, 'delivered_to') end
  unpark(fair, queue, owner)
  -- pcall: a log that is not a stream (a bug) fails this attempt's writes, which end the job, not its start
  local next_seq = redis.pcall('XLEN', log)
  -- The record comes back with the start: the worker reads it in this round trip, not one of its own.
  return {'applied', cancel_flag, attempt, type(next_seq) == 'number' and next_seq or 0, redis.call('HGETALL', job),
          pool_parked(queue)}
elseif action == 'requeue' then
  redis.call('HSET', job, 'status', 'queued', 'requeued_at', now_s)
  enter_state(status, 'queued')
  if delivered_to then redis.call('HDEL', job, 'delivered_to') end
  redis.call('ZREM', leases, id)
  redis.call('ZADD', queued, now_s, id)  -- sent again: watched until an attempt starts it
  return {'applied', cancel_flag, kind or 'interactive', queue or 'interactive'}
end
return {'applied', cancel_flag, '', ''}
"""

# The hot path: running attempts' events, nothing else. One call carries several runs (a publisher cycle's,
# whose keys live on one Redis) and does per run only what its events need: the lease check (fencing), the
# log's length (seq check and retry skip, as in `write`), one XADD and one PUBLISH per event; the log's
# expiry only on an attempt's first events (`refresh`), the cancel flag only when the caller asks (it polls
# it every few hundred ms, not per token). No read of the record, no fair-queue bookkeeping.
# A job's first event also stamps its record's `first_token_at` (the time-to-first-token metric).
# KEYS: per run: job, lease, log, cancel. ARGV: log ttl s, now s, then per run: token, channel, seq of its
#       first event, refresh expiry (0/1), check cancel (0/1), n events, then n (log json, live json) pairs
#       without "seq".
# Returns per run: outcome ('applied', 'fenced' or 'gap'), cancel flag (0/1).
APPEND = LOG_EVENTS + """
local log_ttl, now_s, a, replies = ARGV[1], ARGV[2], 3, {}
for k = 1, #KEYS, 4 do
  local job, lease, log, cancel = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local token, channel, first_seq = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  local refresh, check_cancel, n = ARGV[a + 3] == '1', ARGV[a + 4] == '1', tonumber(ARGV[a + 5])
  local from = a + 6
  a = from + 2 * n
  local outcome, cancel_flag = 'applied', 0
  if redis.call('GET', lease) ~= token then
    outcome = 'fenced'
  else
    local seq = redis.call('XLEN', log)
    if seq < first_seq then
      outcome = 'gap'
    else
      if log_events(log, channel, from + 2 * (seq - first_seq), a - 2, seq) > 0 and seq == 0 then
        redis.call('HSETNX', job, 'first_token_at', now_s)
      end
      if refresh then redis.call('EXPIRE', log, log_ttl) end
      if check_cancel then cancel_flag = redis.call('EXISTS', cancel) end
    end
  end
  replies[#replies + 1] = outcome
  replies[#replies + 1] = cancel_flag
end
return replies
"""


@dataclass(frozen=True)
class Attempt:
    """One attempt at a job: the job and the lease token it runs under. Two attempts of the same job (one
    of them stale) never share a name: not in a worker's tables, not in its engine. `first_seq`: the seq its
    first event gets (the events earlier attempts logged), from the store when it started."""
    job_id: str
    token: str
    first_seq: int = field(default=0, compare=False)

    @property
    def name(self) -> str:
        """Its id in the engine (and in logs)."""
        return f"{self.job_id}/{self.token[:12]}"


@dataclass(frozen=True)
class Ending:
    """How a job ends: its terminal status, its final event (no seq: the store numbers it), record fields."""
    status: JobStatus
    event: JobEvent
    result: Optional[JobResult] = None
    error: Optional[JobError] = None

    @classmethod
    def cancelled(cls) -> "Ending":
        return cls(JobStatus.CANCELLED, JobEvent(type="cancelled"))

    @classmethod
    def failed(cls, error: JobError) -> "Ending":
        return cls(JobStatus.FAILED, JobEvent(type="error", error=error), error=error)

    @classmethod
    def completed(cls, result: JobResult) -> "Ending":
        return cls(JobStatus.COMPLETED, JobEvent(type="done", finish_reason=result.finish_reason,
                                                 usage=result.usage), result=result)

    def fields(self) -> list[str]:
        """The record fields it sets besides status and finished_at."""
        fields = []
        if self.result is not None:
            fields += ["result", self.result.model_dump_json()]
        if self.error is not None:
            fields += ["error", self.error.model_dump_json()]
        return fields


@dataclass(frozen=True)
class Transition:
    """What the script did, and whether the client has asked to cancel the job. `parked` (a start's, an end's):
    whether any job waits parked on the job's pool; None where the store cannot tell (its Redis does not hold
    the whole pool: jobs/shards.py)."""
    outcome: Outcome
    cancel_requested: bool = False
    detail: tuple = ()
    parked: Optional[bool] = None

    @property
    def applied(self) -> bool:
        return self.outcome is Outcome.APPLIED

    @classmethod
    def from_reply(cls, reply) -> "Transition":
        outcome, cancel, *detail = reply
        return cls(Outcome(outcome), bool(int(cancel)), tuple(detail))


@dataclass(frozen=True)
class Write:
    """What one attempt writes in a publisher cycle: its new events (`acknowledged`: how many of its events
    earlier writes were answered for), its end if it came, and whether to report the cancel flag (an end
    always does)."""
    attempt: Attempt
    events: list[JobEvent]
    ending: Optional[Ending] = None
    acknowledged: int = 0
    check_cancel: bool = True


def event_args(events: list[JobEvent]) -> list[str]:
    """Each event twice, without its seq: for the log (with the token ids a resume needs) and for the live
    channel (listeners need only the text)."""
    args = []
    for event in events:
        args += [event.model_dump_json(exclude_none=True, exclude={"seq"}),
                 event.model_dump_json(exclude_none=True, exclude={"seq", "token_ids"})]
    return args
