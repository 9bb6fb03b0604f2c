"""The rules on job rows that several queries share, each written once as a SQL condition.
The transitions (states.py), the repositories (repo/) and the fence of an attempt's writes
all build their WHERE clauses from these."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa

from service.store.db.models import Job
from service.store.lifecycle import JobState

# The states a job can still leave without a retry: what cancellation and sweeps act on.
UNFINISHED = tuple(state for state in JobState if not state.terminal)


def runs_attempt(job_id: Any, attempt: Any) -> sa.ColumnElement[bool]:
    """The job runs this attempt: only then may the attempt write state, metrics, logs or
    checkpoints (a stale attempt's writes are refused, SPEC §4)."""
    return sa.and_(Job.id == job_id, Job.attempt == attempt, Job.state == JobState.RUNNING)


def claimable(now: datetime) -> sa.ColumnElement[bool]:
    """A worker may claim the job now: queued, no cancel requested, and not backing off."""
    return sa.and_(
        Job.state == JobState.QUEUED,
        Job.cancel_requested_at.is_(None),
        sa.or_(Job.not_before.is_(None), Job.not_before <= now),
    )


def unfinished() -> sa.ColumnElement[bool]:
    return Job.state.in_(UNFINISHED)
