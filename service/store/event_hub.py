"""Many followers of job event streams, one XREAD: how one API process serves every open
event stream with a single Redis connection for live reads, however many are open.

``await hub.follow(key, cursor)`` registers a follower of one job's stream (see
service.store.events) and reads what the stream already holds after `cursor`; from then on
the hub's loop (one ``XREAD BLOCK`` over every followed stream, re-issued at least every
BLOCK_MS so newly followed streams join) hands each new entry to every follower of its
stream. A follower gives its events in id order, each once: the backlog it read, then what
the hub delivered, skipping what it has already given (the two overlap by design: it
registers before it reads, so nothing falls between).

A follower holds at most FOLLOWER_BUFFER undelivered events: one whose client reads too
slowly is failed with ``Overflow`` (its client reconnects and replays from the stream)
instead of holding memory. If Redis fails, every follower fails with the error, and the
hub tries again when followed next.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

import redis.asyncio as aioredis

from service.store.events import decode, parse_id, read_after

log = logging.getLogger("unroll.events")

BLOCK_MS = 500
READ_COUNT = 100
FOLLOWER_BUFFER = 1000
RETRY_S = 1.0

Entry = tuple[str, dict[str, Any]]


class Overflow(Exception):
    """The follower's client read too slowly: FOLLOWER_BUFFER events were waiting."""


class Follower:
    """One reader of one job's stream (see the module's docstring)."""

    def __init__(self, key: str, cursor: str) -> None:
        self.key = key
        self.cursor = cursor  # the id of the last event given out
        self._at = parse_id(cursor)
        self._backlog: deque[Entry] = deque()
        self._queue: asyncio.Queue[Entry | None] = asyncio.Queue()
        self._failure: BaseException | None = None

    def _accept(self, entry_id: str) -> bool:
        at = parse_id(entry_id)
        if at <= self._at:
            return False
        self._at, self.cursor = at, entry_id
        return True

    def _deliver(self, entry: Entry) -> None:
        if self._failure is not None:
            return
        if self._queue.qsize() >= FOLLOWER_BUFFER:
            self._fail(Overflow(f"{FOLLOWER_BUFFER} events were waiting for the client"))
            return
        self._queue.put_nowait(entry)

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
            self._queue.put_nowait(None)  # wakes a waiting get(), after what was delivered

    def replayed(self) -> list[Entry]:
        """What the stream held after the follower's first cursor when it registered."""
        entries = [entry for entry in self._backlog if self._accept(entry[0])]
        self._backlog.clear()
        return entries

    async def get(self, timeout: float) -> Entry | None:
        """The next event, waiting at most `timeout` seconds (None if none came). Raises
        Overflow or the Redis error once everything delivered before it was given out."""
        while self._backlog:
            entry = self._backlog.popleft()
            if self._accept(entry[0]):
                return entry
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self._failure is not None and self._queue.empty():
                raise self._failure
            try:
                entry = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                try:
                    entry = await asyncio.wait_for(self._queue.get(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    return None
            if entry is not None and self._accept(entry[0]):
                return entry


class EventHub:
    def __init__(self, client: aioredis.Redis, *, block_ms: int = BLOCK_MS) -> None:
        self.client = client  # decode_responses=True
        self.block_ms = block_ms
        self._followers: dict[str, set[Follower]] = {}
        self._cursors: dict[str, str] = {}  # per followed stream: the last id the hub read
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def followers(self) -> int:
        return sum(len(group) for group in self._followers.values())

    async def follow(self, key: str, cursor: str) -> Follower:
        """A follower of stream `key` that gives every event after `cursor`. Raises the
        Redis error if the stream cannot be read (the follower is then not registered)."""
        follower = Follower(key, cursor)
        self._followers.setdefault(key, set()).add(follower)
        self._cursors.setdefault(key, cursor)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._wake.set()
        try:
            follower._backlog.extend(await read_after(self.client, key, cursor))
        except BaseException:
            self.leave(follower)
            raise
        return follower

    def leave(self, follower: Follower) -> None:
        """Stop following (idempotent)."""
        group = self._followers.get(follower.key)
        if group is None:
            return
        group.discard(follower)
        if not group:
            del self._followers[follower.key]
            self._cursors.pop(follower.key, None)

    async def aclose(self) -> None:
        """Stop reading: the loop ends after its current XREAD (cancelling one in flight can
        leave redis-py waiting on its connection for good), then every follower fails."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), self.block_ms / 1000 + 2.0)
            except (TimeoutError, Exception):  # noqa: BLE001 - closing anyway
                self._task.cancel()
        self._fail_all(ConnectionError("the event hub closed"))

    def _fail_all(self, exc: BaseException) -> None:
        for group in self._followers.values():
            for follower in group:
                follower._fail(exc)
        self._followers.clear()
        self._cursors.clear()

    async def _run(self) -> None:
        while not self._closing:
            if not self._cursors:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                reply = await self.client.xread(dict(self._cursors), count=READ_COUNT, block=self.block_ms)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis is away: the clients reconnect
                log.warning("event hub: reading %d stream(s) failed: %s", len(self._cursors), exc)
                self._fail_all(exc)
                await asyncio.sleep(RETRY_S)
                continue
            if not self._closing:
                self._dispatch(reply)

    def _dispatch(self, reply: Any) -> None:
        # [[key, [(id, fields), ...]], ...] (RESP3 clients: the same as a dict)
        items = reply.items() if isinstance(reply, dict) else (reply or ())
        for key, entries in items:
            followers = self._followers.get(key)
            for entry_id, fields in entries:
                if key in self._cursors:
                    self._cursors[key] = entry_id
                event = decode(fields)
                if event is not None and followers:
                    for follower in tuple(followers):
                        follower._deliver((entry_id, event))
