"""The per-project cap on queued jobs (``UNROLL_MAX_QUEUED_PER_PROJECT``), without a COUNT
on every submission.

Each API process keeps, per project, the last counted number of queued jobs plus what it
has submitted since. Far from the limit that estimate is trusted (and refreshed every
``ttl_s``); near the limit every check counts the database again and decides on that
count, so the cap is exact for one process at the edge. Jobs leaving `queued` only make the estimate too high, which triggers a
recount, never a wrong acceptance. Other API processes' submissions within ``ttl_s`` and
requests racing in the same instant can overshoot the cap slightly: it is a guard
against runaway clients, not an accounting boundary.

A recount is single-flight per project: requests that need one while it runs wait for
its answer instead of each starting a COUNT. (Without that, at 500 submissions/s every
request that arrived during a 20 ms count of a large queue started its own, and the pile
of COUNTs pushed the API's p99 from 4 ms to 150 ms: bench/api.py.) Only a request that
needs the answer waits for it: one with no estimate yet, or near the limit. An estimate
that is merely stale is refreshed in the background while requests go on with it (every
ttl_s, the requests that arrived during a count of a 100k-job queue had waited for it:
the open-loop p99 tripled as the bench's queue grew).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from sqlalchemy.ext.asyncio import AsyncSession

from service.api.errors import ApiError
from service.store.db import repo

log = logging.getLogger("unroll.api")


class OverQuota(ApiError):
    def __init__(self, queued: int, adding: int, limit: int) -> None:
        super().__init__(
            429,
            "over_quota",
            f"the project has {queued} queued jobs; {adding} more would exceed the limit of {limit}"
            " (UNROLL_MAX_QUEUED_PER_PROJECT)",
            headers={"Retry-After": "10"},
        )


# Counts a project's queued jobs in the database.
Count = Callable[[str], Awaitable[int]]


def counter(session: AsyncSession) -> Count:
    """Count in `session` (inside the caller's transaction)."""
    return lambda project_id: session.run_sync(repo.count_queued, project_id)


class QueuedCounter:
    """`count` counts a project's queued jobs on a connection of its own: the recounts of
    plain submissions, and the background refreshes."""

    def __init__(self, count: Count, ttl_s: float = 2.0) -> None:
        self.count = count
        self.ttl_s = ttl_s
        # project id -> [estimated queued jobs, monotonic time of the last count]
        self._estimates: dict[str, list[float]] = {}
        # project id -> the recount in progress (its answer: the count itself)
        self._counting: dict[str, asyncio.Future[int]] = {}
        self._refreshes: set[asyncio.Task[None]] = set()
        self._closed = False
        # project id -> jobs added by this process, ever. The estimate a count leaves adds
        # what was added while it ran (the count may not have seen them; if it did, the
        # estimate is high, which only brings the next recount sooner). Refusals never
        # use it: they are decided on the count itself.
        self._added: dict[str, int] = {}

    async def check(self, project_id: str, adding: int, limit: int, count: Count | None = None) -> None:
        """Raise OverQuota if `adding` more queued jobs would pass `limit`. `count`, if
        given, counts inside the caller's transaction instead (sweeps, retries)."""
        estimate = self._estimates.get(project_id)
        if estimate is None or estimate[0] + adding > limit - limit // 10:
            queued = await self._recount(project_id, count or self.count)
            if queued + adding > limit:
                raise OverQuota(queued, adding, limit)
        elif time.monotonic() - estimate[1] > self.ttl_s and project_id not in self._counting and not self._closed:
            self._refresh(project_id)

    def _refresh(self, project_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._refreshed(project_id))
        self._refreshes.add(task)  # a reference until it ends
        task.add_done_callback(self._refreshes.discard)

    async def _refreshed(self, project_id: str) -> None:
        try:
            await self._recount(project_id, self.count)
        except Exception as exc:  # retried once ttl_s has passed again; near the limit, requests count
            estimate = self._estimates.get(project_id)
            if estimate is not None:
                estimate[1] = time.monotonic()
            log.warning("refreshing the queued-jobs count of project %s failed: %s", project_id, exc)

    async def _recount(self, project_id: str, count: Count) -> int:
        """The project's queued jobs, counted now (or by the count already running)."""
        while (running := self._counting.get(project_id)) is not None:
            try:
                return await asyncio.shield(running)  # another request's count answers for us too
            except asyncio.CancelledError:
                if not running.cancelled():
                    raise  # this request was cancelled
                # the request that was counting went away: count here instead
        done = self._counting[project_id] = asyncio.get_running_loop().create_future()
        try:
            started, added = time.monotonic(), self._added.get(project_id, 0)
            counted = await count(project_id)
            self._estimates[project_id] = [counted + self._added.get(project_id, 0) - added, started]
            done.set_result(counted)
            return counted
        except asyncio.CancelledError:
            done.cancel()
            raise
        except Exception as exc:
            done.set_exception(exc)
            done.exception()  # retrieved: no "never retrieved" warning when nobody waited
            raise
        finally:
            del self._counting[project_id]

    def added(self, project_id: str, n: int) -> None:
        """`n` jobs were committed for the project."""
        self._added[project_id] = self._added.get(project_id, 0) + n
        estimate = self._estimates.get(project_id)
        if estimate is not None:
            estimate[0] += n

    async def close(self) -> None:
        """Stop the background refreshes, and start none (before the engine they count on
        closes)."""
        self._closed = True
        for task in list(self._refreshes):
            task.cancel()
        await asyncio.gather(*self._refreshes, return_exceptions=True)
