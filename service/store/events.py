"""Live job events over Redis pub/sub, for the API's Server-Sent Events.

Workers ``publish`` what happens to a job (its state changes, progress, metrics, log lines);
the API ``subscribe``s to one job's channel and forwards the events as they come.

Pub/sub is fire-and-forget: an event reaches only the subscribers connected when it is
published, and nothing is stored or replayed. So events are a live view, never the record:
everything in them is also written to the database, and a subscriber that connects late
(or reconnects) first reads the job's current state from the database, then follows the
events. Subscribe *before* reading that state, so no event falls in between (an event seen
twice is harmless: each carries the whole new value, not a delta).

An event is a JSON object with at least ``type`` (``state``, ``progress``, ``metrics`` or
``log``, see ``EventType``), ``job_id`` and ``ts`` (seconds since the epoch, when published).
Non-finite floats become null, as in the stored metrics (SPEC §3), so any JSON parser reads
every event.
"""

from __future__ import annotations

import asyncio
import enum
import json
import math
import time
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis

from service.store.keys import DEFAULT_PREFIX, Keys
from service.store.lifecycle import TERMINAL_STATE_NAMES

# How long subscribing may take before we call Redis unresponsive.
SUBSCRIBE_TIMEOUT_S = 5.0


class EventType(str, enum.Enum):
    # The job changed state: `state` (and `attempt`, `error` when they matter).
    STATE = "state"
    # Training advanced: `step`, `max_steps`, `progress` (0..1).
    PROGRESS = "progress"
    # A batch of metric points: `step` and `values` ({name: value}).
    METRICS = "metrics"
    # Log lines of the job: `lines`.
    LOG = "log"


_TYPES = frozenset(t.value for t in EventType)


def _finite(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def encode(job_id: str, event: Mapping[str, Any]) -> str:
    """The JSON text of `event` for `job_id` (adds `job_id`, and `ts` if absent)."""
    if not isinstance(event.get("type"), str) or not event["type"]:
        raise ValueError(f"an event needs a 'type' (one of {[t.value for t in EventType]}), got {dict(event)!r}")
    payload = {**event, "type": EventType(event["type"]).value if event["type"] in _TYPES else event["type"]}
    payload["job_id"] = job_id
    payload.setdefault("ts", time.time())
    try:
        return json.dumps(payload, separators=(",", ":"), allow_nan=False, default=str)
    except ValueError:
        return json.dumps(_finite(payload), separators=(",", ":"), allow_nan=False, default=str)


async def publish(redis: aioredis.Redis, job_id: str, event: Mapping[str, Any], prefix: str = DEFAULT_PREFIX) -> int:
    """Send `event` to the subscribers of `job_id`'s channel, now. Returns how many received
    it (0 is normal: nobody is watching)."""
    return await redis.publish(Keys(prefix).job_events(job_id), encode(job_id, event))


class Subscription:
    """One job's live events: ``async with subscribe(redis, job_id) as events:`` then
    ``async for event in events`` (forever, until the caller stops) or
    ``await events.get(timeout)`` (None when nothing came in time, e.g. to send an SSE
    keep-alive). Once the ``async with`` is entered, every event published reaches it."""

    def __init__(self, redis: aioredis.Redis, job_id: str, prefix: str = DEFAULT_PREFIX) -> None:
        self.job_id = job_id
        self.channel = Keys(prefix).job_events(job_id)
        self._redis = redis
        self._pubsub: aioredis.client.PubSub | None = None

    async def __aenter__(self) -> Subscription:
        self._pubsub = self._redis.pubsub()
        try:
            await self._pubsub.subscribe(self.channel)
            # Wait for Redis to confirm: only then are later publishes sure to reach us.
            await asyncio.wait_for(self._confirmed(), SUBSCRIBE_TIMEOUT_S)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def _confirmed(self) -> None:
        while True:
            message = await self._pubsub.get_message(timeout=None)
            if message is not None and message["type"] == "subscribe":
                return

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Unsubscribe and give the connection back (idempotent)."""
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is None:
            return
        try:
            await pubsub.unsubscribe()
        except (aioredis.ConnectionError, aioredis.TimeoutError, OSError):
            pass  # the connection is gone: closing it below is all that is left to do
        finally:
            await pubsub.aclose()

    async def get(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next event, waiting at most `timeout` seconds (None: as long as it takes);
        None if none came in time."""
        if self._pubsub is None:
            raise RuntimeError("use the subscription inside `async with`")
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=remaining)
            if message is not None and message["type"] == "message":
                try:
                    return json.loads(message["data"])
                except ValueError:
                    pass  # not one of ours: skip it
            if deadline is not None and loop.time() >= deadline:
                return None

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> dict[str, Any]:
        event = await self.get()
        assert event is not None  # get() without a timeout only returns an event
        return event


def subscribe(redis: aioredis.Redis, job_id: str, prefix: str = DEFAULT_PREFIX) -> Subscription:
    """The live events of `job_id`, as an async context manager (see ``Subscription``)."""
    return Subscription(redis, job_id, prefix)


def ends_stream(event: Mapping[str, Any]) -> bool:
    """A job's stream ends after the event that says it reached a terminal state."""
    return event.get("type") == "state" and event.get("state") in TERMINAL_STATE_NAMES


async def follow(
    subscription: Subscription, snapshot: Mapping[str, Any], keepalive_s: float
) -> AsyncIterator[Mapping[str, Any] | None]:
    """A job's stream: its `snapshot` (a state event of the job as it is now, read after
    subscribing so no event falls between the two), then its live events until one ends the
    stream. None when nothing came within `keepalive_s` (a keep-alive is due)."""
    yield snapshot
    if ends_stream(snapshot):
        return
    while True:
        event = await subscription.get(timeout=keepalive_s)
        yield event
        if event is not None and ends_stream(event):
            return
