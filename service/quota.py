"""The per-project cap on queued jobs (``UNROLL_MAX_QUEUED_PER_PROJECT``), without a COUNT
on every submission.

Each API process keeps, per project, the last counted number of queued jobs plus what it
has submitted since. Far from the limit that estimate is trusted for ``ttl_s``; near the
limit (or when stale) the database is counted again, so the cap is exact for one process
and at the edge. Jobs leaving `queued` only make the estimate too high, which triggers a
recount, never a wrong acceptance. Other API processes' submissions within ``ttl_s`` and
requests racing in the same instant can overshoot the cap slightly: it is a guard
against runaway clients, not an accounting boundary.

A recount is single-flight per project: requests that need one while it runs wait for
its answer instead of each starting a COUNT. (Without that, at 500 submissions/s every
request that arrived during a 20 ms count of a large queue started its own, and the pile
of COUNTs pushed the API's p99 from 4 ms to 150 ms: bench/api.py.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from sqlalchemy.ext.asyncio import AsyncSession

from service.db import repo
from service.errors import ApiError


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
    def __init__(self, ttl_s: float = 2.0) -> None:
        self.ttl_s = ttl_s
        # project id -> [estimated queued jobs, monotonic time of the last count]
        self._estimates: dict[str, list[float]] = {}
        # project id -> the recount in progress
        self._counting: dict[str, asyncio.Future[None]] = {}

    async def check(self, project_id: str, adding: int, limit: int, count: Count) -> None:
        """Raise OverQuota if `adding` more queued jobs would pass `limit`. `count` counts
        the project's queued jobs in the database, when the estimate cannot be trusted."""
        estimate = self._estimates.get(project_id)
        slack = limit // 10
        if estimate is None or time.monotonic() - estimate[1] > self.ttl_s or estimate[0] + adding > limit - slack:
            await self._recount(project_id, count)
            estimate = self._estimates[project_id]
        if estimate[0] + adding > limit:
            raise OverQuota(int(estimate[0]), adding, limit)

    async def _recount(self, project_id: str, count: Count) -> None:
        while (running := self._counting.get(project_id)) is not None:
            try:
                await asyncio.shield(running)  # another request's count answers for us too
                return
            except asyncio.CancelledError:
                if not running.cancelled():
                    raise  # this request was cancelled
                # the request that was counting went away: count here instead
        done = self._counting[project_id] = asyncio.get_running_loop().create_future()
        try:
            started = time.monotonic()
            self._estimates[project_id] = [await count(project_id), started]
            done.set_result(None)
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
        estimate = self._estimates.get(project_id)
        if estimate is not None:
            estimate[0] += n

    def forget(self, project_id: str) -> None:
        self._estimates.pop(project_id, None)
