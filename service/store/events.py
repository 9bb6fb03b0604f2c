"""A job's live events, kept in a Redis Stream per job for the API's Server-Sent Events.

Writing. Events leave a process only once the transaction that stored what they say has
committed (service.store.db.outbox): a state transition (service.store.db.states), a flush
of an attempt's metrics, log lines and progress (workers.reporter). The outbox hands each
committed batch to the process's publisher: `Publisher` (a sync client: dispatchers and
attempts) or `AsyncPublisher` (the API), which append it with XADD, one MULTI per batch,
in order. Publishing is best effort: the database is the record, events are a view of it.

Reading. An entry's id (`1712345678901-0`, time-ordered) is the event's SSE `id:`.
`position` says where a stream stands (its last id, and whether what followed an id is
still held), `read_after` returns what follows an id, and service.store.event_hub follows
many streams at once with one XREAD.

Bounds. A stream keeps about STREAM_LENGTH entries (XADD MAXLEN ~): enough to replay a
few minutes of a busy job to a client that reconnects; older ones are trimmed, and a
client that asks for them gets the job's state afresh instead. A stream expires
ENDED_TTL_S after its job's final state event (LIVE_TTL_S after its last event otherwise),
so finished jobs leave nothing behind. None of these are settings: attempts run in Ray
workers that do not read the API's environment.

An event is a JSON object with at least ``type`` (see ``EventType``), ``job_id`` and ``ts``
(seconds since the epoch). Non-finite floats become null, as in the stored metrics (SPEC
§3), so any JSON parser reads every event.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from service.store.keys import DEFAULT_PREFIX, Keys
from service.store.lifecycle import TERMINAL_STATE_NAMES

log = logging.getLogger("unroll.events")

STREAM_LENGTH = 1000
LIVE_TTL_S = 7 * 24 * 3600
ENDED_TTL_S = 3600
# The one field of a stream entry: the event's JSON.
FIELD = "event"
# The id before every entry: "from the start".
START = "0-0"
# After a failed append, a sync publisher drops events this long instead of making every
# transition wait for Redis's connect timeout.
QUIET_AFTER_FAILURE_S = 5.0


class EventType(str, enum.Enum):
    # The job changed state: `state`, `attempt`, `transition` (claim | lost | hand_back |
    # finish | unplaceable | cancel | cancel_requested | retry), and `worker`, `error`,
    # `reason`, `cancel_requested` when they matter. The API's first event on a fresh
    # stream is one too, with `snapshot: true` and the whole job.
    STATE = "state"
    # Training advanced: `attempt`, `step`, `max_steps`, `progress` (0..1), `loss`.
    PROGRESS = "progress"
    # The latest value of each series since the previous metrics event (at most a few per
    # second): `attempt`, `step` (the newest), `values` ({name: value}), `steps` ({name: step}).
    METRICS = "metrics"
    # Log lines as stored: `attempt`, `lines` ([{ts, level, line}]).
    LOG = "log"
    # Only on the wire, never stored: the API ended the stream before the job ended
    # (`reason`: max_duration | slow_consumer); reconnect with Last-Event-ID.
    END = "end"
    # Only on the wire: the stream broke (Redis is away); reconnect with Last-Event-ID.
    ERROR = "error"


_TYPES = frozenset(t.value for t in EventType)


def state_event(state: str, attempt: int, transition: str, **fields: Any) -> dict[str, Any]:
    """The event of one state transition (None fields left out)."""
    event = {"type": EventType.STATE.value, "state": getattr(state, "value", state), "attempt": attempt, "transition": transition}
    event.update({k: v for k, v in fields.items() if v is not None})
    return event


def ends_stream(event: Mapping[str, Any]) -> bool:
    """A job's stream ends after the event that says it reached a terminal state."""
    return event.get("type") == EventType.STATE.value and event.get("state") in TERMINAL_STATE_NAMES


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


def decode(fields: Mapping[Any, Any] | None) -> dict[str, Any] | None:
    """The event of a stream entry's fields; None for anything that is not one of ours."""
    raw = (fields or {}).get(FIELD, (fields or {}).get(FIELD.encode()))
    try:
        event = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    return event if isinstance(event, dict) and isinstance(event.get("type"), str) else None


# --- event ids ----------------------------------------------------------------------------------

_ID = re.compile(r"(\d{1,20})-(\d{1,20})")


def parse_id(text: str | bytes) -> tuple[int, int]:
    """(milliseconds, sequence) of an entry id, for ordering; ValueError if it is not one."""
    text = text.decode() if isinstance(text, bytes) else text
    match = _ID.fullmatch(text)
    if match is None or max(int(match[1]), int(match[2])) >= 2**64:
        raise ValueError(f"not an event id: {text[:40]!r}")
    return int(match[1]), int(match[2])


def is_id(text: str) -> bool:
    try:
        parse_id(text)
    except ValueError:
        return False
    return True


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --- writing ------------------------------------------------------------------------------------

Batch = Sequence[tuple[str, Mapping[str, Any]]]


def _queue_appends(pipe: Any, keys: Keys, batch: Batch) -> None:
    for job_id, event in batch:
        key = keys.job_events(job_id)
        pipe.xadd(key, {FIELD: encode(job_id, event)}, maxlen=STREAM_LENGTH, approximate=True)
        pipe.expire(key, ENDED_TTL_S if ends_stream(event) else LIVE_TTL_S)


def append_sync(client: redis.Redis, keys: Keys, batch: Batch) -> list[str]:
    """Append `batch` in order (one MULTI); returns the entries' ids."""
    if not batch:
        return []
    pipe = client.pipeline(transaction=True)
    _queue_appends(pipe, keys, batch)
    return [_text(entry_id) for entry_id in pipe.execute()[::2]]


async def append(client: aioredis.Redis, keys: Keys, batch: Batch) -> list[str]:
    """append_sync with an async client."""
    if not batch:
        return []
    pipe = client.pipeline(transaction=True)
    _queue_appends(pipe, keys, batch)
    return [_text(entry_id) for entry_id in (await pipe.execute())[::2]]


class Publisher:
    """An outbox publisher with a sync client (dispatchers, attempts): appends each
    committed batch before the committing call returns. Never raises; after a failure it
    drops events for QUIET_AFTER_FAILURE_S (each would wait for Redis's timeout)."""

    def __init__(self, client: redis.Redis, prefix: str = DEFAULT_PREFIX) -> None:
        self.client, self.keys = client, Keys(prefix)
        self._quiet_until = 0.0

    def __call__(self, batch: Batch) -> None:
        if time.monotonic() < self._quiet_until:
            return
        try:
            append_sync(self.client, self.keys, batch)
        except (redis.RedisError, OSError) as exc:
            self._quiet_until = time.monotonic() + QUIET_AFTER_FAILURE_S
            log.warning("%d job event(s) not published: %s", len(batch), exc)


class AsyncPublisher:
    """The API's outbox publisher. A commit (in the event loop's thread) queues its batch at
    once; one task appends the batches in commit order. `flush()` waits until everything
    queued so far is appended: a route calls it before it lets another process act on what
    it committed (a retried job is published before it is enqueued)."""

    def __init__(self, client: aioredis.Redis, prefix: str = DEFAULT_PREFIX) -> None:
        self.client, self.keys = client, Keys(prefix)
        self._queue: asyncio.Queue[list[tuple[str, Mapping[str, Any]]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def __call__(self, batch: Batch) -> None:
        self._queue.put_nowait(list(batch))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            batch = await self._queue.get()
            try:
                await append(self.client, self.keys, batch)
            except (aioredis.RedisError, OSError) as exc:
                log.warning("%d job event(s) not published: %s", len(batch), exc)
            finally:
                self._queue.task_done()

    async def flush(self, timeout: float = 5.0) -> None:
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except TimeoutError:
            log.warning("job events still unpublished after %.0fs", timeout)

    async def aclose(self) -> None:
        await self.flush()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


# --- reading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Position:
    """Where a job's stream stands: its last entry's id (START when it has none), and what
    tells whether entries were trimmed from its start."""

    last: str
    exists: bool = False
    length: int = 0
    first: str | None = None
    added: int | None = None  # entries ever appended (Redis 7; trimmed ones included)

    def holds_after(self, cursor: str) -> bool:
        """Whether every entry after `cursor` is still in the stream, so a client that saw
        `cursor` can be given exactly what followed it. Trimming takes the oldest entries:
        all is there if the first one left is not after `cursor`, or nothing was trimmed."""
        at = parse_id(cursor)
        if at > parse_id(self.last):
            return False  # an id from the future: not this stream's
        if not self.exists:
            return cursor == START
        if self.first is not None and parse_id(self.first) <= at:
            return True
        return self.added == self.length if self.added is not None else self.length < STREAM_LENGTH


async def position(client: aioredis.Redis, key: str) -> Position:
    try:
        info = await client.xinfo_stream(key)
    except aioredis.ResponseError as exc:
        if "no such key" in str(exc).lower():
            return Position(START)
        raise
    info = {_text(k): v for k, v in info.items()}
    first = info.get("first-entry")
    added = info.get("entries-added")
    return Position(
        last=_text(info["last-generated-id"]),
        exists=True,
        length=int(info.get("length", 0)),
        first=_text(first[0]) if first else None,
        added=int(added) if added is not None else None,
    )


async def read_after(
    client: aioredis.Redis, key: str, cursor: str, *, limit: int = 2 * STREAM_LENGTH, page: int = 500
) -> list[tuple[str, dict[str, Any]]]:
    """The events after `cursor`, oldest first (at most `limit`), with their ids."""
    found: list[tuple[str, dict[str, Any]]] = []
    while len(found) < limit:
        entries = await client.xrange(key, min=f"({cursor}", max="+", count=min(page, limit - len(found)))
        for entry_id, fields in entries:
            cursor = _text(entry_id)
            event = decode(fields)
            if event is not None:
                found.append((cursor, event))
        if len(entries) < page:
            break
    return found
