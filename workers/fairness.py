"""The dispatcher's view of who holds what: per-project usage, quotas and fair shares.

Read from the database (every dispatcher's running jobs count, service.store.db.repo
.project_usage) at most every ``TTL_S``, kept current between reads by what this
dispatcher itself starts, and forgotten when one of its jobs ends (the next pass reads
again). The queue's dequeue uses it: ``shares`` orders projects within a priority
(dominant resource fairness, service.store.quotas), and the ``held`` projects (at their
quota) have their messages left pending, with a ``pending_reason`` on their queued jobs
that says which bound holds them.

Two dispatchers deciding in the same instant may start one job each past a quota; the
next read corrects the view (the same tolerance as a sweep's ``max_parallel``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from service.store import quotas
from service.store.db import repo
from service.store.quotas import NOTHING, Quota, Usage

# How long a read of the projects' usage and quotas is trusted.
TTL_S = 0.5

Db = Callable[..., Awaitable[Any]]


def _read(session: Any) -> tuple[dict[str, Usage], dict[str, tuple[str, Quota]]]:
    return repo.project_usage(session), repo.project_quotas(session)


class FairShare:
    def __init__(self, db: Db) -> None:
        self.db = db
        self.usage: dict[str, Usage] = {}
        self.quotas: dict[str, tuple[str, Quota]] = {}
        self.shares: dict[str, float] = {}
        # project id -> why none of its jobs may start now (at its quota)
        self.held: dict[str, str] = {}
        # project id -> why its next job did not fit (until the next read)
        self.blocked: dict[str, str] = {}
        self._totals: Mapping[str, float] = {}
        self._at = float("-inf")
        # project id -> the reason last written on its queued jobs
        self._said: dict[str, str] = {}
        self._resay = False

    async def refresh(self, totals: Mapping[str, float], *, force: bool = False) -> bool:
        """Read usage and quotas again if the last read is older than TTL_S (or `force`);
        write the pending reasons that changed. True if it read."""
        if not force and time.monotonic() - self._at <= TTL_S:
            return False
        self.usage, self.quotas = await self.db(_read)
        self._totals = totals
        self._at = time.monotonic()
        self.blocked.clear()
        self.shares = {project: quotas.dominant_share(usage, totals) for project, usage in self.usage.items()}
        self.held = {}
        for project, (name, quota) in self.quotas.items():
            reason = quotas.at_quota(name, quota, self.usage.get(project, NOTHING))
            if reason is not None:
                self.held[project] = reason
        await self._say()
        return True

    def stale(self) -> None:
        """A job ended: read again before the next choice."""
        self._at = float("-inf")

    def resay(self) -> None:
        """Write every held project's reason again at the next read (jobs submitted since
        the last write do not show it yet)."""
        self._resay = True

    def holding(self) -> list[str]:
        return [*self.held, *self.blocked]

    def check(self, project: str, cpus: float, gpus: float) -> str | None:
        """Why a job of `project` holding `cpus` and `gpus` may not start now, or None.
        A refusal holds the project back until the next read."""
        entry = self.quotas.get(project)
        if entry is None:
            return None
        name, quota = entry
        reason = quotas.over_quota(name, quota, self.usage.get(project, NOTHING), cpus, gpus)
        if reason is not None:
            self.blocked[project] = reason
        return reason

    def started(self, project: str, cpus: float, gpus: float) -> None:
        """This dispatcher started a job of `project`: count it before the next read."""
        usage = self.usage[project] = self.usage.get(project, NOTHING).plus(cpus, gpus)
        self.shares[project] = quotas.dominant_share(usage, self._totals)
        entry = self.quotas.get(project)
        if entry is not None:
            reason = quotas.at_quota(entry[0], entry[1], usage)
            if reason is not None:
                self.held[project] = reason

    async def _say(self) -> None:
        """The reasons on the queued jobs of held projects, and their removal once a
        project is no longer held."""
        resay, self._resay = self._resay, False
        for project, reason in self.held.items():
            if resay or self._said.get(project) != reason:
                await self.db(repo.set_project_pending_reason, project, reason)
                self._said[project] = reason
        for project in [p for p in self._said if p not in self.held]:
            await self.db(repo.set_project_pending_reason, project, None, replacing=self._said.pop(project))
