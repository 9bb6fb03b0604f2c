"""What the API holds while it runs: the database engine and sessions (whose committed
transitions publish their job events), the Redis client, the dispatch queue, the artifact
store, the event streams (with a Redis pool of their own) and the small in-process caches.
Built by the app's lifespan (``open_runtime``), closed when it ends; nothing here connects
at import time."""

from __future__ import annotations

import asyncio
import functools
import logging
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.api.auth import TokenCache
from service.api.batching import Batcher
from service.api.metrics import Metrics
from service.api.models import ModelCache
from service.api.quota import QueuedCounter
from service.api.streams import Streams
from service.api.submit import JobInserts
from service.store import events, revocations
from service.store.artifacts import ArtifactStore
from service.store.db import outbox, repo
from service.store.db.session import (
    autocommit_session,
    make_async_engine,
    run_autocommit,
)
from service.store.keys import Keys
from service.store.model_sessions import SessionStore
from service.store.queue import JobQueue
from service.store.settings import Settings

log = logging.getLogger("unroll.api")

# Redis calls of a request give up after this long (then 503), so a hung Redis cannot
# hold requests forever.
REDIS_SOCKET_TIMEOUT_S = 5.0
REDIS_CONNECT_TIMEOUT_S = 2.0


@dataclass
class Runtime:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    redis: aioredis.Redis
    queue: JobQueue
    keys: Keys
    store: ArtifactStore
    tokens: TokenCache
    quota: QueuedCounter
    metrics: Metrics
    inserts: JobInserts  # submissions, group-committed
    enqueues: Batcher[tuple[str, int, str], bool]  # their queue writes, likewise
    # Job events of the transitions committed through `sessions` (service.store.db.outbox).
    publisher: events.AsyncPublisher
    # GET /v1/jobs/{id}/events: their own Redis pool, one reader for all, per-project slots.
    streams: Streams
    # Trained models loaded for inference (UNROLL_MODEL_CACHE_SIZE), and the inference
    # sessions' states in Redis (service.api.routes.inference).
    models: ModelCache
    model_sessions: SessionStore

    def autocommit(self) -> AbstractAsyncContextManager[AsyncSession]:
        """service.store.db.session.autocommit_session on this runtime's engine."""
        return autocommit_session(self.engine)

    async def enqueue_after_commit(self, jobs: list[tuple[str, int, str]]) -> None:
        """The queue write after the database commit. The job exists either way: if Redis is
        down now, the reconciler re-enqueues queued jobs the queue lacks, so this only logs."""
        if not jobs:
            return
        try:
            if len(jobs) == 1:  # a submission: batched with concurrent ones
                await self.enqueues.submit(jobs[0])
            else:
                await self.queue.enqueue_many(jobs)
        except (RedisError, OSError) as exc:
            log.warning("enqueue of %d job(s) failed after commit (the reconciler will retry): %s", len(jobs), exc)

    def listen_for_revocations(self) -> asyncio.Task[None]:
        """Forget revoked tokens as they are announced (service.store.revocations)."""
        return asyncio.create_task(revocations.listen(self.redis, self.keys, self.tokens.forget, self.tokens.clear, self.tokens.forget_project))

    async def close(self) -> None:
        await self.quota.close()
        await self.streams.aclose()
        await self.publisher.aclose()
        await self.redis.aclose()
        await self.engine.dispose()


def open_runtime(settings: Settings, metrics: Metrics) -> Runtime:
    overrides = {}
    if settings.database_url.startswith(("postgres://", "postgresql")):
        # No pre-ping: on asyncpg it costs three round trips (BEGIN, ping, ROLLBACK) per
        # checkout, more than a submission's own write. A pooled connection the server
        # dropped (a restart) is skipped at checkout all the same, without a round trip:
        # asyncpg has read the server's goodbye on the event loop (session._skip_closed).
        overrides = {
            "pool_size": settings.db_pool_size,
            "max_overflow": settings.db_max_overflow,
            "pool_pre_ping": False,
            "pool_recycle": 1800,
        }
    engine = make_async_engine(settings.database_url, **overrides)
    redis = aioredis.Redis.from_url(
        settings.redis_url,
        socket_timeout=REDIS_SOCKET_TIMEOUT_S,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
        health_check_interval=30,
    )
    queue = JobQueue(redis, settings.redis_prefix)
    keys = Keys(settings.redis_prefix)
    store = ArtifactStore(settings.artifacts)
    publisher = events.AsyncPublisher(redis, settings.redis_prefix)
    return Runtime(
        settings=settings,
        engine=engine,
        # Every transition committed through these is published to its job's event stream.
        sessions=async_sessionmaker(engine, expire_on_commit=False, info=outbox.publishing(publisher)),
        redis=redis,
        queue=queue,
        keys=keys,
        store=store,
        tokens=TokenCache(settings.token_cache_seconds),
        # the quota's own recounts, each on a connection of its own
        quota=QueuedCounter(functools.partial(run_autocommit, engine, repo.count_queued)),
        metrics=metrics,
        inserts=JobInserts(engine),
        enqueues=Batcher(queue.enqueue_many, shared=lambda exc: isinstance(exc, (RedisError, OSError))),
        publisher=publisher,
        streams=Streams(settings),
        models=ModelCache(settings.model_cache_size, store.read_bytes),
        model_sessions=SessionStore(redis, keys, settings.session_ttl_s, settings.max_sessions_per_project),
    )
