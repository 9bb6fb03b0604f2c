"""The per-project cap on queued jobs (``UNROLL_MAX_QUEUED_PER_PROJECT``), without a COUNT
on every submission.

Each API process keeps, per project, the last counted number of queued jobs plus what it
has submitted since. Far from the limit that estimate is trusted for ``ttl_s``; near the
limit (or when stale) the database is counted again, so the cap is exact for one process
and at the edge. Jobs leaving `queued` only make the estimate too high, which triggers a
recount, never a wrong acceptance. Other API processes' submissions within ``ttl_s`` and
requests racing in the same instant can overshoot the cap slightly: it is a guard
against runaway clients, not an accounting boundary.
"""

from __future__ import annotations

import time

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


class QueuedCounter:
    def __init__(self, ttl_s: float = 2.0) -> None:
        self.ttl_s = ttl_s
        # project id -> [estimated queued jobs, monotonic time of the last count]
        self._estimates: dict[str, list[float]] = {}

    async def check(self, session: AsyncSession, project_id: str, adding: int, limit: int) -> None:
        """Raise OverQuota if `adding` more queued jobs would pass `limit`."""
        estimate = self._estimates.get(project_id)
        slack = limit // 10
        now = time.monotonic()
        if estimate is None or now - estimate[1] > self.ttl_s or estimate[0] + adding > limit - slack:
            counted = await session.run_sync(repo.count_queued, project_id)
            estimate = self._estimates[project_id] = [counted, now]
        if estimate[0] + adding > limit:
            raise OverQuota(int(estimate[0]), adding, limit)

    def added(self, project_id: str, n: int) -> None:
        """`n` jobs were committed for the project."""
        estimate = self._estimates.get(project_id)
        if estimate is not None:
            estimate[0] += n

    def forget(self, project_id: str) -> None:
        self._estimates.pop(project_id, None)
