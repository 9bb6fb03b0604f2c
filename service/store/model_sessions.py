"""Inference sessions in Redis (docs/guide.md, "Using a trained model over HTTP"): the
hidden state of a model that a caller feeds piece by piece, kept between requests.

A session is one HASH (keys.model_session): its project, job and checkpoint (step and
sha256), and its state as opaque bytes (the API serializes the tensors; nothing here
imports torch). It expires `ttl_s` after its last use. Each project has a ZSET of its
sessions scored by expiry, so the live ones can be counted and bounded atomically (a Lua
script: two concurrent creations cannot both take the last slot).

A step holds the session's lock (keys.model_session_lock: SET NX PX with a random token)
from reading the state to writing the new one, so two steps of one session never
interleave: the second waits for the first, then runs from its state. The write checks
that the lock is still its own and that the session still exists (a deleted session is
not brought back by a step that was running).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from service.store.keys import Keys

# A step holds the lock at most this long (steps are bounded: trainer.inference.MAX_STEPS).
LOCK_TTL_MS = 120_000
# A step waits this long at most for another step of the same session to finish.
LOCK_WAIT_S = 30.0

_CREATE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[5])
redis.call('HSET', KEYS[2], 'project', ARGV[6], 'job', ARGV[7], 'step', ARGV[8], 'sha256', ARGV[9], 'state', '')
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

# KEYS: lock, session, project zset. ARGV: token, state, ttl ms, expiry ms, session id.
_SAVE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
redis.call('HSET', KEYS[2], 'state', ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('ZADD', KEYS[3], 'XX', ARGV[4], ARGV[5])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class ModelSession:
    id: str
    project_id: str
    job_id: str
    step: int
    sha256: str
    state: bytes  # empty: a fresh state


class SessionBusy(Exception):
    """Another step of the session held it for longer than LOCK_WAIT_S."""


class LockLost(Exception):
    """The step outlived its lock (LOCK_TTL_MS): its state was not saved."""


class SessionStore:
    def __init__(self, redis: aioredis.Redis, keys: Keys, ttl_s: int, max_per_project: int) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_ms = ttl_s * 1000
        self.max_per_project = max_per_project
        self._create = redis.register_script(_CREATE)
        self._save = redis.register_script(_SAVE)
        self._release = redis.register_script(_RELEASE)

    def _expiry(self) -> int:
        return int(time.time() * 1000) + self.ttl_ms

    async def create(self, project_id: str, job_id: str, step: int, sha256: str) -> ModelSession | None:
        """A new session with a fresh state; None when the project has max_per_project live."""
        session_id = "ses_" + secrets.token_hex(12)
        created = await self._create(
            keys=[self.keys.project_model_sessions(project_id), self.keys.model_session(session_id)],
            args=[int(time.time() * 1000), self._expiry(), self.max_per_project, self.ttl_ms, session_id,
                  project_id, job_id, step, sha256],
        )
        if not created:
            return None
        return ModelSession(session_id, project_id, job_id, step, sha256, b"")

    async def get(self, session_id: str, project_id: str) -> ModelSession | None:
        """The session, if it is alive and the project's (None otherwise, alike)."""
        fields = await self.redis.hgetall(self.keys.model_session(session_id))
        if not fields or fields.get(b"project", b"").decode() != project_id:
            return None
        return ModelSession(
            session_id, project_id, fields[b"job"].decode(), int(fields[b"step"]), fields[b"sha256"].decode(),
            fields.get(b"state", b""),
        )

    async def delete(self, session_id: str, project_id: str) -> bool:
        if await self.get(session_id, project_id) is None:
            return False
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.model_session(session_id))
            pipe.zrem(self.keys.project_model_sessions(project_id), session_id)
            await pipe.execute()
        return True

    async def lock(self, session_id: str, wait_s: float = LOCK_WAIT_S) -> str:
        """Take the session's lock (waiting for a step in progress); its token."""
        token = secrets.token_hex(16)
        key = self.keys.model_session_lock(session_id)
        deadline = time.monotonic() + wait_s
        delay = 0.005
        while not await self.redis.set(key, token, nx=True, px=LOCK_TTL_MS):
            if time.monotonic() > deadline:
                raise SessionBusy(session_id)
            await asyncio.sleep(delay)
            delay = min(0.1, delay * 2)
        return token

    async def unlock(self, session_id: str, token: str) -> None:
        await self._release(keys=[self.keys.model_session_lock(session_id)], args=[token])

    async def save(self, session: ModelSession, token: str, state: bytes) -> bool:
        """Store the state after a step, under the lock `token`; False when the session was
        deleted (or expired) meanwhile. LockLost when the lock is no longer ours."""
        saved = await self._save(
            keys=[self.keys.model_session_lock(session.id), self.keys.model_session(session.id),
                  self.keys.project_model_sessions(session.project_id)],
            args=[token, state, self.ttl_ms, self._expiry(), session.id],
        )
        if saved == -1:
            raise LockLost(session.id)
        return bool(saved)
