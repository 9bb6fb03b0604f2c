"""The dispatch queue: job ids waiting for a worker, in priority order, delivered at least once.

Redis is for dispatch only. The database is the source of truth: a message here means
"job X may be runnable, go and try to claim it", and a consumer acks once it has claimed
the job in the database (or found it not runnable). Losing Redis loses no job: a reconciler
re-enqueues the database's ``queued`` jobs that ``contains`` says the queue lacks. So the
queue never needs to be durable, only correct while it lives.

Life of a message::

    enqueue ──▶ pending ──dequeue──▶ in flight ──ack──▶ (gone)
                   ▲                    │
                   ├──release───────────┤  (the consumer gives it back: no resources now)
                   └──lease expired─────┘  (the consumer died: reclaim_expired, or any dequeue)

Data structures (every key is named in ``service.store.keys``):

- pending: a ZSET scored by ``-priority`` whose members are ``"<sequence:016x>:<job id>"``.
  ZPOPMIN takes the highest priority, and among equal scores Redis orders members
  lexicographically, i.e. by the fixed-width sequence: FIFO within a priority. Any integer
  priority works (negative too) with no per-priority key or stream; it is compared exactly
  for |priority| <= 2**53 (a double's integer range), which is all we accept.
- in flight: a ZSET job id -> lease deadline (ms on the Redis server's clock, read with TIME
  inside the scripts, so consumers' clocks never matter), and a HASH job id -> owner. Finding
  expired leases is one ZRANGEBYSCORE; renewing is one ZADD XX.
- members and priorities: HASHes over every job the queue holds (pending or in flight).
  ``members`` makes ``contains`` and idempotent ``enqueue`` a single HEXISTS, and lets a
  reclaimed message return with its original sequence, i.e. its place in line; ``priorities``
  keeps the exact priority. ``depth`` counts pending messages per priority, so the
  Prometheus gauge is one HGETALL and not a scan of the queue.
- per project: a ZSET of that project's pending members (same members and scores), a SET of
  the projects with pending messages, and a HASH job id -> project. Dequeue compares the
  heads of the projects' ZSETs: the highest priority wins, and among equal priorities the
  project with the smallest share of the cluster that the consumer passes (dominant
  resource fairness, workers.dispatcher); projects the consumer holds back (at their
  quota) are skipped, their messages stay pending in place. One ZRANGE per project with
  pending messages per dequeue: cheap for the tens or hundreds of projects of a team.
- a wake-up LIST: every message made available pushes a token; a waiting consumer BLPOPs it
  and then pops the ZSET. The ZSET stays the only queue (a token carries no job, so a lost
  or extra token costs at most one short wait or one empty pop), and a waiting consumer
  wakes within a round trip of an enqueue.

Every state change is one Lua script, so each is atomic with respect to every other client
(two consumers can never pop the same message, an ack cannot race a reclaim).

Why not Redis Streams with a consumer group per priority? Arbitrary integer priorities would
mean an unbounded set of streams, and XREADGROUP over several streams gives no priority
order, so a consumer would poll them highest first without an atomic "highest available";
idempotent enqueue and "remove a cancelled job wherever it is" need an index by job id that
streams lack anyway (XDEL by entry id, plus XACK/XCLAIM bookkeeping per stream). The ZSET
design gives every requirement with plain atomic scripts.

Delivery is at least once: a consumer that dies after dequeue and before ack loses its lease,
and the message goes back to pending with its original priority and place. Consumers are
named (``consumer``, e.g. "host:pid:task"); ``renew``, ``ack`` and ``release`` succeed only
for the current owner, so a consumer whose lease expired and was reclaimed cannot ack or
release the new owner's delivery. Reclaiming is done by ``reclaim_expired`` (call it
periodically, like rq's ``StartedJobRegistry.cleanup``) and, opportunistically, by every
``dequeue``.

The Redis client may decode responses or not; job ids come back as ``str`` either way.
``dequeue`` blocks in chunks of at most a second, and shorter than the client's
``socket_timeout``, so any client configuration works.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable, Mapping, Sequence

import redis.asyncio as aioredis

from service.store.keys import DEFAULT_PREFIX, Keys

# Priorities are ZSET scores (doubles): exact integers only within +-2**53.
MAX_ABS_PRIORITY = 2**53
# Pairs of (job id, priority) per enqueue script call: bounds the time one script blocks Redis.
ENQUEUE_CHUNK = 1000
# Expired leases moved back per script call (dequeue reclaims a few; reclaim_expired loops).
RECLAIM_PER_DEQUEUE = 100
RECLAIM_PER_CALL = 1000
# Shortest BLPOP worth issuing (Redis timeouts have about 10 ms resolution).
MIN_BLOCK_S = 0.01
# Longest single BLPOP: a long `block_s` is waited in such chunks, so that a read never
# outlasts the client's socket timeout (redis-py's default is 5 s) and a waiting consumer
# looks for expired leases at least this often.
MAX_BLOCK_S = 1.0

# Shared by every script: the keys in the order of Keys.queue_keys, and small helpers.
_PRELUDE = """
if redis.replicate_commands then redis.replicate_commands() end
local pending, in_flight, owners, members, priorities, depth, sequence, wakeup, projects, project_of, project_prefix =
    KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10], KEYS[11]
-- Tokens kept for waiting consumers: more than the consumers that can wait at once is waste.
local WAKE_CAP = 256

local function now_ms()
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The score of a priority, negated as text so that it stays exact.
local function score(priority)
    if priority == '0' then return '0' end
    if string.sub(priority, 1, 1) == '-' then return string.sub(priority, 2) end
    return '-' .. priority
end

local function new_member(job)
    return string.format('%016x', redis.call('INCR', sequence)) .. ':' .. job
end

local function job_of(member)
    return string.sub(member, 18)
end

local function project_pending(job)
    return project_prefix .. (redis.call('HGET', project_of, job) or '')
end

-- Pending in both orders: the queue's (pending) and its project's.
local function make_pending(job, member, priority)
    local s = score(priority)
    redis.call('ZADD', pending, s, member)
    redis.call('ZADD', project_pending(job), s, member)
    redis.call('SADD', projects, redis.call('HGET', project_of, job) or '')
    redis.call('HINCRBY', depth, priority, 1)
end

-- Take `member` out of pending; true if it was there.
local function unpend(job, member, priority)
    if redis.call('ZREM', pending, member) == 0 then return false end
    redis.call('ZREM', project_pending(job), member)
    if redis.call('HINCRBY', depth, priority, -1) <= 0 then redis.call('HDEL', depth, priority) end
    return true
end

local function forget(job)
    redis.call('HDEL', owners, job)
    redis.call('HDEL', members, job)
    redis.call('HDEL', priorities, job)
    redis.call('HDEL', project_of, job)
end

local function wake(n)
    if n <= 0 then return end
    if n > WAKE_CAP then n = WAKE_CAP end
    local tokens = {}
    for i = 1, n do tokens[i] = '1' end
    redis.call('LPUSH', wakeup, unpack(tokens))
    redis.call('LTRIM', wakeup, 0, WAKE_CAP - 1)
end

-- Move up to `limit` messages whose lease ended before `now` back to pending, each with its
-- original priority and sequence.
local function reclaim(now, limit)
    local expired = redis.call('ZRANGEBYSCORE', in_flight, '-inf', string.format('(%d', now), 'LIMIT', 0, limit)
    for _, job in ipairs(expired) do
        redis.call('ZREM', in_flight, job)
        redis.call('HDEL', owners, job)
        local priority = redis.call('HGET', priorities, job) or '0'
        local member = redis.call('HGET', members, job)
        if not member then
            member = new_member(job)
            redis.call('HSET', members, job, member)
        end
        redis.call('HSET', priorities, job, priority)
        make_pending(job, member, priority)
    end
    wake(#expired)
    return expired
end
"""

# ARGV: job, priority, project, job, priority, project, ...  Returns one 1 (added) or 0
# (already held) per job.
_ENQUEUE = _PRELUDE + """
local added, n = {}, 0
for i = 1, #ARGV, 3 do
    local job, priority, project = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    if redis.call('HEXISTS', members, job) == 1 then
        added[#added + 1] = 0
    else
        local member = new_member(job)
        redis.call('HSET', members, job, member)
        redis.call('HSET', priorities, job, priority)
        redis.call('HSET', project_of, job, project)
        make_pending(job, member, priority)
        added[#added + 1] = 1
        n = n + 1
    end
end
wake(n)
return added
"""

# ARGV: consumer, lease_ms, reclaim limit, then pairs of (project, its share, or 'x' for a
# project whose messages must stay pending).  Returns the job id, or nil when nothing
# (of a project not held back) is pending.
#
# The message: the highest priority among the projects' heads; among equal priorities the
# project of the smallest share (a project not named has share 0); then the oldest.
_DEQUEUE = _PRELUDE + """
local now = now_ms()
reclaim(now, tonumber(ARGV[3]))
local shares, held = {}, {}
for i = 4, #ARGV, 2 do
    if ARGV[i + 1] == 'x' then held[ARGV[i]] = true else shares[ARGV[i]] = tonumber(ARGV[i + 1]) end
end
local best, best_score, best_share, best_project
for _, project in ipairs(redis.call('SMEMBERS', projects)) do
    if not held[project] then
        local head = redis.call('ZRANGE', project_prefix .. project, 0, 0, 'WITHSCORES')
        if #head == 0 then
            redis.call('SREM', projects, project)
        else
            local s, share = tonumber(head[2]), shares[project] or 0
            if best == nil or s < best_score
                or (s == best_score and (share < best_share or (share == best_share and head[1] < best))) then
                best, best_score, best_share, best_project = head[1], s, share, project
            end
        end
    end
end
if best == nil then return false end
local job = job_of(best)
local priority = redis.call('HGET', priorities, job) or '0'
unpend(job, best, priority)
redis.call('ZADD', in_flight, now + tonumber(ARGV[2]), job)
redis.call('HSET', owners, job, ARGV[1])
return job
"""

# ARGV: job, consumer, lease_ms.
_RENEW = _PRELUDE + """
if redis.call('HGET', owners, ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZADD', in_flight, 'XX', now_ms() + tonumber(ARGV[3]), ARGV[1])
return 1
"""

# ARGV: job, consumer.
_ACK = _PRELUDE + """
local job = ARGV[1]
if redis.call('HGET', owners, job) ~= ARGV[2] then return 0 end
redis.call('ZREM', in_flight, job)
forget(job)
return 1
"""

# ARGV: job, consumer, priority.  Back to pending, behind the messages of its priority.
_RELEASE = _PRELUDE + """
local job, priority = ARGV[1], ARGV[3]
if redis.call('HGET', owners, job) ~= ARGV[2] then return 0 end
redis.call('ZREM', in_flight, job)
redis.call('HDEL', owners, job)
local member = new_member(job)
redis.call('HSET', members, job, member)
redis.call('HSET', priorities, job, priority)
make_pending(job, member, priority)
wake(1)
return 1
"""

# ARGV: job.  Returns 1 if the queue held it.
_REMOVE = _PRELUDE + """
local job = ARGV[1]
local member = redis.call('HGET', members, job)
if member then
    unpend(job, member, redis.call('HGET', priorities, job) or '0')
end
redis.call('ZREM', in_flight, job)
forget(job)
if member then return 1 end
return 0
"""

# ARGV: limit.  Returns the reclaimed job ids.
_RECLAIM = _PRELUDE + """
return reclaim(now_ms(), tonumber(ARGV[1]))
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _check_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not job_id:
        raise ValueError(f"job id must be a non-empty string, got {job_id!r}")
    return job_id


def _check_priority(priority: int) -> str:
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise TypeError(f"priority must be an int, got {priority!r}")
    if abs(priority) > MAX_ABS_PRIORITY:
        raise ValueError(f"priority must be within +-2**53, got {priority}")
    return str(priority)


def _check_project(project: str) -> str:
    if not isinstance(project, str):
        raise TypeError(f"project must be a string, got {project!r}")
    return project


def _check_consumer(consumer: str) -> str:
    if not isinstance(consumer, str) or not consumer:
        raise ValueError(f"consumer must be a non-empty string, got {consumer!r}")
    return consumer


def _lease_ms(lease_s: float) -> int:
    if not lease_s > 0:
        raise ValueError(f"lease must be positive, got {lease_s!r}")
    return max(1, round(lease_s * 1000))


class JobQueue:
    """The dispatch queue over one Redis (see the module docstring). Safe to share between
    tasks; blocking dequeues hold one pooled connection each while they wait."""

    def __init__(self, redis: aioredis.Redis, prefix: str = DEFAULT_PREFIX) -> None:
        self.redis = redis
        self.keys = Keys(prefix)
        self._queue_keys = self.keys.queue_keys
        self._enqueue = redis.register_script(_ENQUEUE)
        self._dequeue = redis.register_script(_DEQUEUE)
        self._renew = redis.register_script(_RENEW)
        self._ack = redis.register_script(_ACK)
        self._release = redis.register_script(_RELEASE)
        self._remove = redis.register_script(_REMOVE)
        self._reclaim = redis.register_script(_RECLAIM)
        # A BLPOP must return before the client's own socket timeout fires.
        kwargs = redis.connection_pool.connection_kwargs
        socket_timeout = kwargs.get("socket_timeout") or kwargs.get("orig_socket_timeout")
        self._max_block_s = MAX_BLOCK_S
        if socket_timeout:
            # Half: Redis fires BLPOP timeouts from a 10 Hz timer, up to ~100 ms late.
            self._max_block_s = max(MIN_BLOCK_S, min(MAX_BLOCK_S, socket_timeout / 2))

    # --- producers ---------------------------------------------------------------------

    async def enqueue(self, job_id: str, priority: int = 0, project: str = "") -> bool:
        """Make `job_id` (of `project`) available to consumers. True if newly added; False
        (and nothing changes, not even the priority) if the queue already holds it,
        pending or in flight."""
        (added,) = await self.enqueue_many([(job_id, priority, project)])
        return added

    async def enqueue_many(self, jobs: Iterable[tuple[str, int] | tuple[str, int, str]]) -> list[bool]:
        """`enqueue` for many (job id, priority[, project]) tuples, in order, a thousand per
        round trip. Each is atomic; the whole batch is not (a reconciler may simply repeat it)."""
        args: list[str] = []
        for job in jobs:
            job_id, priority = job[0], job[1]
            project = job[2] if len(job) > 2 else ""
            args += (_check_job_id(job_id), _check_priority(priority), _check_project(project))
        added: list[bool] = []
        for start in range(0, len(args), 3 * ENQUEUE_CHUNK):
            chunk = args[start : start + 3 * ENQUEUE_CHUNK]
            added += [bool(a) for a in await self._enqueue(keys=self._queue_keys, args=chunk)]
        return added

    async def remove(self, job_id: str) -> bool:
        """Drop `job_id` wherever it is, pending or in flight (the job was cancelled or
        deleted). True if the queue held it."""
        return bool(await self._remove(keys=self._queue_keys, args=[_check_job_id(job_id)]))

    # --- consumers ---------------------------------------------------------------------

    async def dequeue(
        self,
        consumer: str,
        lease_s: float,
        block_s: float = 1.0,
        *,
        shares: Mapping[str, float] | None = None,
        held: Iterable[str] = (),
    ) -> str | None:
        """Take the next message for `consumer`, leased for `lease_s` seconds: the highest
        priority; among equal priorities, the project of the smallest share (`shares`, a
        project absent from it has 0), then the oldest. Messages of the `held` projects
        stay pending. Waits up to `block_s` for one (0: do not wait); None if none came.
        Expired leases are reclaimed on the way, so a lone consumer needs no sweeper."""
        _check_consumer(consumer)
        lease_ms = _lease_ms(lease_s)
        choice: list[str] = []
        for project, share in (shares or {}).items():
            if not math.isfinite(share):
                raise ValueError(f"share of {project!r} must be finite, got {share!r}")
            choice += (_check_project(project), repr(float(share)))
        for project in held:
            choice += (_check_project(project), "x")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, block_s)
        while True:
            job = await self._dequeue(keys=self._queue_keys, args=[consumer, lease_ms, RECLAIM_PER_DEQUEUE, *choice])
            if job is not None:
                return _text(job)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            # Wait for a token (an enqueue, release or reclaim happened) and try again. A token
            # another consumer's message used up only costs one empty pop.
            wait = min(max(MIN_BLOCK_S, remaining), self._max_block_s)
            await self.redis.blpop([self.keys.queue_wakeup], timeout=wait)

    async def renew(self, job_id: str, consumer: str, lease_s: float) -> bool:
        """Extend `consumer`'s lease on `job_id` to `lease_s` from now. False if `consumer`
        does not hold it (its lease expired and the message was reclaimed, or it was acked
        or removed): the consumer must then stop treating the message as its own."""
        args = [_check_job_id(job_id), consumer, _lease_ms(lease_s)]
        return bool(await self._renew(keys=self._queue_keys, args=args))

    async def ack(self, job_id: str, consumer: str) -> bool:
        """Done with the message (the job is claimed in the database, or not runnable): it
        leaves the queue. False if `consumer` did not hold it (nothing changes)."""
        return bool(await self._ack(keys=self._queue_keys, args=[_check_job_id(job_id), consumer]))

    async def release(self, job_id: str, consumer: str, priority: int) -> bool:
        """Give the message back now (e.g. no resources for it at the moment): pending again
        at `priority`, behind the messages already waiting at that priority, so one job that
        cannot run does not hold the head of its line. False if `consumer` did not hold it."""
        args = [_check_job_id(job_id), consumer, _check_priority(priority)]
        return bool(await self._release(keys=self._queue_keys, args=args))

    # --- housekeeping --------------------------------------------------------------------

    async def reclaim_expired(self) -> list[str]:
        """Move every in-flight message whose lease has expired back to pending, with its
        original priority and place in line; returns their job ids. Safe to run from any
        number of processes at once (each message is reclaimed once)."""
        reclaimed: list[str] = []
        while True:
            batch = await self._reclaim(keys=self._queue_keys, args=[RECLAIM_PER_CALL])
            reclaimed += [_text(job) for job in batch]
            if len(batch) < RECLAIM_PER_CALL:
                return reclaimed

    async def contains(self, job_id: str) -> bool:
        """True if the queue holds `job_id`, pending or in flight."""
        return bool(await self.redis.hexists(self.keys.queue_members, _check_job_id(job_id)))

    async def contains_many(self, job_ids: Sequence[str]) -> list[bool]:
        """`contains` for many ids at once (for the reconciler), in order."""
        result: list[bool] = []
        for start in range(0, len(job_ids), ENQUEUE_CHUNK):
            chunk = [_check_job_id(j) for j in job_ids[start : start + ENQUEUE_CHUNK]]
            result += [m is not None for m in await self.redis.hmget(self.keys.queue_members, chunk)]
        return result

    async def depth(self) -> dict[int, int]:
        """Pending messages per priority (priorities with none are absent)."""
        counts = await self.redis.hgetall(self.keys.queue_depth)
        return {int(_text(p)): int(n) for p, n in counts.items() if int(n) > 0}

    async def in_flight(self) -> int:
        """Messages delivered and not yet acked, released, removed or reclaimed."""
        return await self.redis.zcard(self.keys.queue_in_flight)

    async def owner(self, job_id: str) -> str | None:
        """The consumer holding `job_id`'s lease, or None if it is not in flight."""
        owner = await self.redis.hget(self.keys.queue_owners, _check_job_id(job_id))
        return None if owner is None else _text(owner)
