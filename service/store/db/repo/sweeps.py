"""Sweeps: the row, its jobs, and the sweep's state derived from theirs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.store.db.base import new_id
from service.store.db.models import (
    Job,
    JobState,
    Sweep,
)
from service.store.db.repo.common import get_owned


def create_sweep(
    session: Session,
    *,
    project_id: str,
    base: Mapping[str, Any],
    grid: Mapping[str, Sequence[Any]],
    seeds: int = 1,
    max_parallel: int | None = None,
    name: str | None = None,
) -> Sweep:
    """The sweep row; its jobs are created with create_job(..., sweep_id=sweep.id)."""
    sweep = Sweep(
        id=new_id("sweep"),
        project_id=project_id,
        base=dict(base),
        grid={k: list(v) for k, v in grid.items()},
        seeds=seeds,
        max_parallel=max_parallel,
        name=name,
    )
    session.add(sweep)
    session.flush()
    return sweep


def get_sweep(session: Session, sweep_id: str, project_id: str | None = None) -> Sweep:
    return get_owned(session, Sweep, "sweep", sweep_id, project_id)


def list_sweep_jobs(session: Session, sweep_id: str) -> list[Job]:
    return list(
        session.execute(sa.select(Job).where(Job.sweep_id == sweep_id).order_by(Job.created_at, Job.id)).scalars()
    )


def sweep_state_counts(session: Session, sweep_id: str) -> dict[JobState, int]:
    rows = session.execute(
        sa.select(Job.state, sa.func.count()).where(Job.sweep_id == sweep_id).group_by(Job.state)
    ).all()
    return {state: count for state, count in rows}


def count_running_in_sweep(session: Session, sweep_id: str) -> int:
    """For max_parallel: how many of the sweep's jobs run now."""
    return session.execute(
        sa.select(sa.func.count()).where(Job.sweep_id == sweep_id, Job.state == JobState.RUNNING)
    ).scalar_one()


def sweep_state(counts: Mapping[JobState, int], *, deciding: bool = False) -> str:
    """A sweep's state, derived from its jobs' states: running while any job is unfinished
    and some started; queued when none started; when all finished, failed if any failed,
    else cancelled if any was cancelled, else succeeded. `deciding`: its early stopping may
    still resume a paused trial (service.store.db.early_stop.deciding): running, not
    finished, even when every trial is (for now)."""
    live = {state: n for state, n in counts.items() if n}
    if not live or set(live) == {JobState.QUEUED}:
        return JobState.QUEUED.value
    if JobState.QUEUED in live or JobState.RUNNING in live or deciding:
        return JobState.RUNNING.value
    for state in (JobState.FAILED, JobState.CANCELLED):
        if state in live:
            return state.value
    return JobState.SUCCEEDED.value


