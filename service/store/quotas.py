"""Per-project quotas and fair share: the rules, named once, that the API (at submission),
the dispatcher (at placement) and the admin routes share.

A project's quota (set by an admin: ``unroll project set``, ``PATCH /v1/admin/projects/{name}``)
bounds what it holds at once: running jobs, CPUs, GPUs; what it may ask for: the highest
priority; and how many jobs it may keep queued. An unset bound is the deployment's default
(for ``max_queued`` and ``max_priority``, settings) or no bound at all.

Fair share is dominant resource fairness (Ghodsi et al., "Dominant Resource Fairness: Fair
Allocation of Multiple Resource Types", NSDI 2011, §4): a project's share is the largest,
over CPUs and GPUs, of the fraction of the cluster its running jobs hold, and the next free
slot goes to the project with the smallest share. Priority comes first: fair share orders
projects only within one priority (service.store.queue's dequeue does the choosing).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

# Bounds on the quotas themselves (an admin's input is bounded too).
MAX_RUNNING_BOUND = 1_000_000
MAX_RESOURCE_BOUND = 1_000_000.0
MAX_QUEUED_BOUND = 10_000_000


@dataclass(frozen=True)
class Quota:
    """None: the deployment's default (max_queued, max_priority) or no bound."""

    max_running: int | None = None
    max_cpus: float | None = None
    max_gpus: float | None = None
    max_priority: int | None = None
    max_queued: int | None = None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def is_default(self) -> bool:
        return all(getattr(self, name) is None for name in self.names())


NO_QUOTA = Quota()


@dataclass(frozen=True)
class Usage:
    """What a project's running jobs hold (every dispatcher's, from the database)."""

    running: int = 0
    cpus: float = 0.0
    gpus: float = 0.0

    def plus(self, cpus: float, gpus: float) -> "Usage":
        return Usage(self.running + 1, self.cpus + cpus, self.gpus + gpus)


NOTHING = Usage()
_EPS = 1e-9


def priority_ceiling(quota: Quota, default: int) -> int:
    """The highest priority the project's jobs may have."""
    return quota.max_priority if quota.max_priority is not None else default


def queued_limit(quota: Quota, default: int) -> int:
    """How many queued jobs the project may have."""
    return quota.max_queued if quota.max_queued is not None else default


def dominant_share(usage: Usage, totals: Mapping[str, float]) -> float:
    """The largest fraction of the cluster's CPUs or GPUs the project holds (0 on an empty
    cluster)."""
    shares = [held / total for held, total in ((usage.cpus, totals.get("CPU", 0.0)), (usage.gpus, totals.get("GPU", 0.0))) if total > 0]
    return max(shares, default=0.0)


def at_quota(name: str, quota: Quota, usage: Usage) -> str | None:
    """Why nothing more of the project may start now (it holds all its quota allows), or
    None."""
    if quota.max_running is not None and usage.running >= quota.max_running:
        return f"project {name} is at its quota: {usage.running} running, max_running={quota.max_running}"
    if quota.max_cpus is not None and usage.cpus >= quota.max_cpus - _EPS:
        return f"project {name} is at its quota: {usage.cpus:g} CPUs held, max_cpus={quota.max_cpus:g}"
    if quota.max_gpus is not None and quota.max_gpus > 0 and usage.gpus >= quota.max_gpus - _EPS:
        return f"project {name} is at its quota: {usage.gpus:g} GPUs held, max_gpus={quota.max_gpus:g}"
    return None


def over_quota(name: str, quota: Quota, usage: Usage, cpus: float, gpus: float) -> str | None:
    """Why a job holding `cpus` and `gpus` (all its workers together) may not start now,
    with the project holding `usage`; None if it may."""
    after = usage.plus(cpus, gpus)
    if quota.max_running is not None and after.running > quota.max_running:
        return f"project {name} is at its quota: {usage.running} running, max_running={quota.max_running}"
    if quota.max_cpus is not None and after.cpus > quota.max_cpus + _EPS:
        return f"project {name} holds {usage.cpus:g} CPUs; {cpus:g} more would pass max_cpus={quota.max_cpus:g}"
    if quota.max_gpus is not None and after.gpus > quota.max_gpus + _EPS:
        return f"project {name} holds {usage.gpus:g} GPUs; {gpus:g} more would pass max_gpus={quota.max_gpus:g}"
    return None


def never_fits(quota: Quota, cpus: float, gpus: float) -> tuple[str, str] | None:
    """(field, message) when a job could never start under the quota, even alone: it is
    refused at submission rather than left waiting forever. (max_running=0 pauses a
    project: its jobs queue and wait.)"""
    if quota.max_cpus is not None and cpus > quota.max_cpus + _EPS:
        return "resources.cpus", f"the job holds {cpus:g} CPUs (cpus x workers); the project's quota is max_cpus={quota.max_cpus:g}"
    if quota.max_gpus is not None and gpus > quota.max_gpus + _EPS:
        return "resources.gpus", f"the job holds {gpus:g} GPUs (gpus x workers); the project's quota is max_gpus={quota.max_gpus:g}"
    return None
