"""GET /v1/jobs/{id}/events: a job's events as Server-Sent Events, complete and bounded.

What a client gets (docs/operations.md, "Live event streams", says it for users):

- A fresh stream (no `Last-Event-ID`) starts with one `state` event holding the whole job as
  the database has it now (`snapshot: true`), then every event appended to the job's stream
  after that moment (service.store.events), each with its `id:`.
- With `Last-Event-ID` (the `id:` of the last event it saw) it gets exactly what followed,
  then live events. If those are no longer held (trimmed, expired, or an id that is not
  this stream's), it gets a fresh snapshot instead, as a new stream would.
- The stream ends (the response completes) right after the job's final `state` event; at
  once, after the final state, on a job that has already ended; with an `end` event after
  UNROLL_STREAM_MAX_SECONDS in any case (a queued job may never start), or when the client
  reads too slowly; with an `error` event if Redis breaks. A client reconnects with
  `Last-Event-ID` after `end` and `error`.
- Every UNROLL_STREAM_KEEPALIVE_SECONDS without an event: a comment (`: keep-alive`), and a
  look at the job's state in the database, so a job whose final event was lost (its writer
  died between commit and publish) still ends its stream.

What it costs the API process: one slot of its project's UNROLL_MAX_STREAMS_PER_PROJECT
(429 beyond, per API process), and nothing of the Redis connections that submission and
/readyz use: the streams have a connection pool of their own, of POOL_CONNECTIONS at most,
and all their live reads share one connection (service.store.event_hub), however many
streams are open.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import redis.asyncio as aioredis
from fastapi.responses import StreamingResponse
from redis.exceptions import RedisError
from starlette.types import Receive, Scope, Send

from service.api.errors import ApiError, Invalid
from service.store import events
from service.store.event_hub import EventHub, Follower, Overflow
from service.store.keys import Keys
from service.store.lifecycle import TERMINAL_STATE_NAMES
from service.store.settings import Settings

log = logging.getLogger("unroll.api")

# The streams' own Redis pool: short reads when a stream opens, and the hub's one XREAD.
# A stream that cannot get a connection within POOL_WAIT_S is a 503.
POOL_CONNECTIONS = 16
POOL_WAIT_S = 5.0
SOCKET_TIMEOUT_S = 10.0  # longer than the hub's XREAD BLOCK
# What an EventSource waits before it reconnects (the SSE `retry:` field).
RECONNECT_MS = 1000

Snapshot = Callable[[], Awaitable[dict[str, Any]]]
StateOf = Callable[[], Awaitable[str]]


def sse(kind: str, data: dict[str, Any], event_id: str | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n"


def _final(event: dict[str, Any]) -> bool:
    return event.get("state") in TERMINAL_STATE_NAMES


def resume_point(last_event_id: str | None) -> str | None:
    """The id a reconnecting client saw last (None: a fresh stream); 422 for anything that
    is not an event id of ours."""
    if last_event_id is None or last_event_id == "":
        return None
    if not events.is_id(last_event_id.strip()):
        raise Invalid("Last-Event-ID", "not an event id of this stream (the `id:` of an event, like 1712345678901-0)")
    return last_event_id.strip()


class JobStream:
    """One open stream (see the module's docstring); `body()` is the response."""

    def __init__(
        self, *, hub: EventHub, follower: Follower, job_id: str, snapshot: dict[str, Any], resumed: bool,
        read_snapshot: Snapshot, read_state: StateOf, max_seconds: float, keepalive_s: float,
    ) -> None:
        self.hub, self.follower, self.job_id = hub, follower, job_id
        self.snapshot, self.resumed = snapshot, resumed
        self.read_snapshot, self.read_state = read_snapshot, read_state
        self.max_seconds, self.keepalive_s = max_seconds, keepalive_s

    def close(self) -> None:
        self.hub.leave(self.follower)

    def _end(self, reason: str) -> str:
        data = {"type": events.EventType.END.value, "job_id": self.job_id, "reason": reason, "ts": time.time()}
        return sse(events.EventType.END.value, data, self.follower.cursor)

    async def body(self) -> AsyncIterator[str]:
        try:
            async for chunk in self._chunks():
                yield chunk
        finally:
            self.close()

    async def _chunks(self) -> AsyncIterator[str]:
        follower = self.follower
        yield f"retry: {RECONNECT_MS}\n\n"
        if self.resumed:
            for entry_id, event in follower.replayed():
                yield sse(event["type"], event, entry_id)
                if events.ends_stream(event):
                    return
        if not self.resumed or _final(self.snapshot):
            # A fresh stream starts with the job as it is; a resumed one whose job has
            # ended without its final event among those replayed ends with it too.
            yield sse(events.EventType.STATE.value, self.snapshot, follower.cursor)
            if _final(self.snapshot):
                return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_seconds
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    yield self._end("max_duration")
                    return
                entry = await follower.get(min(self.keepalive_s, remaining))
                if entry is not None:
                    entry_id, event = entry
                    yield sse(event["type"], event, entry_id)
                    if events.ends_stream(event):
                        return
                elif loop.time() < deadline:
                    if await self._ended_unseen():
                        yield sse(events.EventType.STATE.value, await self.read_snapshot(), follower.cursor)
                        return
                    yield ": keep-alive\n\n"
        except Overflow:
            yield self._end("slow_consumer")
        except (RedisError, OSError) as exc:
            log.warning("event stream of %s broke: %s", self.job_id, exc)
            message = {"type": events.EventType.ERROR.value, "job_id": self.job_id, "message": "event stream interrupted: Redis is unavailable"}
            yield sse(events.EventType.ERROR.value, message, follower.cursor)

    async def _ended_unseen(self) -> bool:
        """The database says the job ended though no final event came (an idle stream)."""
        try:
            return await self.read_state() in TERMINAL_STATE_NAMES
        except Exception as exc:  # noqa: BLE001 - the database is away: keep streaming
            log.warning("event stream of %s: state check failed: %s", self.job_id, exc)
            return False


class EventStreamResponse(StreamingResponse):
    """A StreamingResponse that notices a client going away at once (not at its next write)
    and always gives back what the stream holds: its follower and its project's slot."""

    def __init__(self, stream: JobStream, release: Callable[[], None]) -> None:
        super().__init__(
            stream.body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self._stream, self._release = stream, release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass  # the client went away while we wrote
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            self._stream.close()
            self._release()
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


class Streams:
    """What this API process holds for event streams: their Redis pool, the hub that reads
    for all of them, and how many each project has open."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = Keys(settings.redis_prefix)
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=POOL_CONNECTIONS, timeout=POOL_WAIT_S, decode_responses=True,
            socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=2.0, health_check_interval=30,
        )
        self.client = aioredis.Redis(connection_pool=pool)
        self.hub = EventHub(self.client)
        self._open: Counter[str] = Counter()

    def open_count(self, project_id: str) -> int:
        return self._open[project_id]

    def take(self, project_id: str) -> Callable[[], None]:
        """A slot of the project's streams, or 429. Returns its release (idempotent)."""
        limit = self.settings.max_streams_per_project
        if self._open[project_id] >= limit:
            raise ApiError(
                429, "too_many_streams",
                f"this project already has {self._open[project_id]} event streams open on this API server, the most it"
                f" may (UNROLL_MAX_STREAMS_PER_PROJECT={limit}); close one, or retry later",
                headers={"Retry-After": "5"},
            )
        self._open[project_id] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._open[project_id] -= 1
                if self._open[project_id] <= 0:
                    del self._open[project_id]

        return release

    async def open(self, job_id: str, after: str | None, read_snapshot: Snapshot, read_state: StateOf) -> JobStream:
        """Open a job's stream at `after` (None: fresh). The order matters: the stream's last
        id is read before the snapshot, so that nothing falls between the snapshot and the
        events that follow it (an event in both is harmless: each says the whole new value);
        the follower registers after both. Raises NotFound (from `read_snapshot`) or the
        Redis error before anything is streamed."""
        key = self.keys.job_events(job_id)
        position = await events.position(self.client, key)
        snapshot = await read_snapshot()
        resumed = after is not None and position.holds_after(after)
        follower = await self.hub.follow(key, after if resumed and after is not None else position.last)
        return JobStream(
            hub=self.hub, follower=follower, job_id=job_id, snapshot=snapshot, resumed=resumed,
            read_snapshot=read_snapshot, read_state=read_state,
            max_seconds=self.settings.stream_max_seconds, keepalive_s=self.settings.stream_keepalive_seconds,
        )

    async def respond(self, project_id: str, job_id: str, last_event_id: str | None, read_snapshot: Snapshot, read_state: StateOf) -> EventStreamResponse:
        after = resume_point(last_event_id)
        release = self.take(project_id)
        try:
            stream = await self.open(job_id, after, read_snapshot, read_state)
        except BaseException:
            release()
            raise
        return EventStreamResponse(stream, release)

    async def aclose(self) -> None:
        await self.hub.aclose()
        await self.client.aclose()
