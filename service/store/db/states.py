"""The one module that changes a job's state (DESIGN.md, "Reliability model").

    queued ──claim──▶ running ──finish──▶ succeeded | failed | cancelled
      ▲                  │                                  │
      └──requeue_lost────┘            failed | cancelled ──retry──▶ queued
         (or hand_back)

Every transition is one conditional UPDATE whose WHERE clause holds the from-state (and,
for anything an attempt does, the attempt number), so it is safe with any number of
dispatchers and workers racing: it either happens exactly once or is refused and changes
nothing. Functions report what happened; they never commit (the caller owns the
transaction) — a transition is decided when its UPDATE runs, and durable when the caller
commits.

Attempts: `jobs.attempt` counts claims. A claim turns queued into running with
attempt + 1, so a job that lost its worker at attempt n goes back to queued still showing
n, and its next claim runs as n + 1 (SPEC §4). The number only grows (a retry keeps it), so
an old attempt can never pass the fence again. Only tries after the last retry count
against max_attempts (`retry_base`), and not those a dispatcher handed back on a clean
stop (hand_back moves `retry_base` up by one).

Each transition also adds its `state` event (the new state, the attempt number, which
transition, and the error or reason) to the session's outbox (service.store.db.outbox):
it is published when the caller commits, and dropped if it does not. Publishing follows
from the transition; no caller publishes one itself.

Timestamps come from the caller's clock (`now`, default: this machine's UTC time);
dispatchers and workers are assumed NTP-synchronised, well within a lease.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.store import events
from service.store.db import outbox
from service.store.db.base import utcnow
from service.store.db.errors import IllegalTransition, NotFound, StaleAttempt
from service.store.db.models import (
    TERMINAL_STATES,
    Attempt,
    AttemptOutcome,
    Job,
    JobState,
    Sweep,
)
from service.store.db.rules import claimable, runs_attempt, unfinished
from service.store.settings import get_settings

# An ORM-enabled UPDATE refreshes the Job objects already loaded in the session.
_SYNC = {"synchronize_session": "fetch"}
_STATE = Job.__table__.c.state.type


@dataclass(frozen=True)
class Claim:
    job_id: str
    attempt: int


@dataclass(frozen=True)
class ExpiredLease:
    job_id: str
    attempt: int
    worker: str | None
    lease_expires_at: datetime


def _state(value: JobState) -> sa.BindParameter[JobState]:
    return sa.literal(value, _STATE)


def _lease(lease_seconds: float | None) -> timedelta:
    return timedelta(seconds=lease_seconds if lease_seconds is not None else get_settings().lease_seconds)


def _current_state(session: Session, job_id: str) -> JobState | None:
    return session.execute(sa.select(Job.state).where(Job.id == job_id)).scalar_one_or_none()


def _claim_values(worker: str, lease: timedelta, now: datetime) -> dict[str, object]:
    return {
        "state": JobState.RUNNING,
        "attempt": Job.attempt + 1,
        "lease_owner": worker,
        "lease_expires_at": now + lease,
        "started_at": now,
        "finished_at": None,
        "pending_reason": None,
        "error": None,
        "not_before": None,
    }


def _announce(session: Session, job_id: str, transition: str, state: JobState, attempt: int, **fields: object) -> None:
    """The state event of a transition, published if the caller commits (see the docstring)."""
    outbox.add(session, job_id, events.state_event(JobState(state).value, attempt, transition, **fields))


def _open_attempt(session: Session, job_id: str, number: int, worker: str, now: datetime) -> None:
    session.execute(sa.insert(Attempt).values(job_id=job_id, number=number, worker=worker, started_at=now))


def _close_attempt(
    session: Session, job_id: str, number: int, outcome: AttemptOutcome, error: str | None, now: datetime
) -> None:
    session.execute(
        sa.update(Attempt)
        .where(Attempt.job_id == job_id, Attempt.number == number, Attempt.outcome.is_(None))
        .values(outcome=outcome, ended_at=now, error=error)
    )


def claim(
    session: Session, job_id: str, worker: str, lease_seconds: float | None = None, *, now: datetime | None = None
) -> int | None:
    """queued → running for this job. Returns the new attempt number, or None when the job
    is not claimable (not queued, backing off, cancelled, unknown, or claimed by another)."""
    now = now or utcnow()
    row = session.execute(
        sa.update(Job)
        .where(Job.id == job_id, claimable(now))
        .values(**_claim_values(worker, _lease(lease_seconds), now))
        .returning(Job.attempt)
        .execution_options(**_SYNC)
    ).first()
    if row is None:
        return None
    _open_attempt(session, job_id, row.attempt, worker, now)
    _announce(session, job_id, "claim", JobState.RUNNING, row.attempt, worker=worker)
    return row.attempt


def claim_next(
    session: Session, worker: str, lease_seconds: float | None = None, *, now: datetime | None = None
) -> Claim | None:
    """Claim the eligible queued job of highest priority, oldest first; None when there is none.

    PostgreSQL: the candidate row is locked with FOR UPDATE SKIP LOCKED, so concurrent
    claimers take different jobs instead of queueing behind one another. SQLite: the
    UPDATE holds the database's write lock, so the subquery and the update are atomic.
    Either way the UPDATE re-checks the from-state.
    """
    now = now or utcnow()
    lease = _lease(lease_seconds)
    for _ in range(5):
        candidate = (
            sa.select(Job.id)
            .where(claimable(now))
            .order_by(Job.priority.desc(), Job.created_at, Job.id)
            .limit(1)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        row = session.execute(
            sa.update(Job)
            .where(Job.id == candidate, claimable(now))
            .values(**_claim_values(worker, lease, now))
            .returning(Job.id, Job.attempt)
            .execution_options(**_SYNC)
        ).first()
        if row is not None:
            _open_attempt(session, row.id, row.attempt, worker, now)
            _announce(session, row.id, "claim", JobState.RUNNING, row.attempt, worker=worker)
            return Claim(row.id, row.attempt)
        # Nothing claimed: either nothing is eligible, or every candidate was taken by a
        # concurrent claimer between our snapshot and our lock. Only the latter retries.
        if not session.execute(sa.select(sa.exists().where(claimable(now)))).scalar():
            return None
    return None


def renew_lease(
    session: Session,
    job_id: str,
    attempt: int,
    worker: str,
    lease_seconds: float | None = None,
    *,
    now: datetime | None = None,
) -> bool:
    """Extend the running attempt's lease. False: the attempt is stale and must stop."""
    now = now or utcnow()
    result = session.execute(
        sa.update(Job)
        .where(runs_attempt(job_id, attempt), Job.lease_owner == worker)
        .values(lease_expires_at=now + _lease(lease_seconds))
        .execution_options(**_SYNC)
    )
    return result.rowcount == 1


def expired_leases(session: Session, now: datetime | None = None, *, limit: int = 1000) -> list[ExpiredLease]:
    """Running attempts whose lease has passed: their workers are presumed lost."""
    now = now or utcnow()
    rows = session.execute(
        sa.select(Job.id, Job.attempt, Job.lease_owner, Job.lease_expires_at)
        .where(Job.state == JobState.RUNNING, Job.lease_expires_at < now)
        .order_by(Job.lease_expires_at)
        .limit(limit)
    ).all()
    return [ExpiredLease(*row) for row in rows]


def hand_back(session: Session, job_id: str, attempt: int, *, now: datetime | None = None) -> JobState | None:
    """running → queued for an attempt its dispatcher stopped on purpose (a clean stop): it
    resumes from its last checkpoint at the next claim, at once, and the interrupted try
    does not count against max_attempts. A cancel requested meanwhile ends it cancelled.
    Returns the new state, or None when refused (the attempt is no longer running)."""
    return requeue_lost(session, job_id, attempt, now=now, reason="handed back: its dispatcher stopped", require_expired=False, counted=False)


def requeue_lost(
    session: Session,
    job_id: str,
    attempt: int,
    *,
    now: datetime | None = None,
    reason: str = "worker lost: lease expired",
    backoff_seconds: float = 0.0,
    require_expired: bool = True,
    counted: bool = True,
) -> JobState | None:
    """running → queued for an attempt whose worker is lost; it resumes from its last
    checkpoint at the next claim (as attempt + 1), not before `backoff_seconds`.

    If the job has used all its attempts it fails instead, and if a cancel was requested it
    ends cancelled. Returns the new state, or None when refused (the attempt is no longer
    running — or, with `require_expired`, its lease was renewed meanwhile: the worker is
    alive after all). `counted=False` (hand_back): the attempt is not held against
    max_attempts.
    """
    now = now or utcnow()
    exhausted = (Job.attempt - Job.retry_base >= Job.max_attempts) if counted else sa.false()
    cancelling = Job.cancel_requested_at.is_not(None)
    new_state = sa.case(
        (cancelling, _state(JobState.CANCELLED)),
        (exhausted, _state(JobState.FAILED)),
        else_=_state(JobState.QUEUED),
    )
    requeued = sa.and_(sa.not_(cancelling), sa.not_(exhausted))
    conditions = [runs_attempt(job_id, attempt)]
    if require_expired:
        conditions.append(Job.lease_expires_at <= now)
    row = session.execute(
        sa.update(Job)
        .where(*conditions)
        .values(
            state=new_state,
            lease_expires_at=None,
            error=sa.case(
                (sa.and_(sa.not_(cancelling), exhausted), sa.literal(f"{reason}; no attempts left")),
                else_=sa.null(),
            ),
            finished_at=sa.case((requeued, sa.null()), else_=sa.literal(now, Job.finished_at.type)),
            retry_base=Job.retry_base if counted else sa.case((requeued, Job.retry_base + 1), else_=Job.retry_base),
            not_before=(
                sa.case(
                    (requeued, sa.literal(now + timedelta(seconds=backoff_seconds), Job.not_before.type)),
                    else_=sa.null(),
                )
                if backoff_seconds > 0
                else None
            ),
        )
        .returning(Job.state, Job.error)
        .execution_options(**_SYNC)
    ).first()
    if row is None:
        return None
    _close_attempt(session, job_id, attempt, AttemptOutcome.LOST, reason, now)
    _announce(session, job_id, "lost" if counted else "hand_back", row.state, attempt, reason=reason, error=row.error)
    return row.state


_OUTCOMES = {
    JobState.SUCCEEDED: AttemptOutcome.SUCCEEDED,
    JobState.FAILED: AttemptOutcome.FAILED,
    JobState.CANCELLED: AttemptOutcome.CANCELLED,
}


def finish(
    session: Session,
    job_id: str,
    attempt: int,
    state: JobState,
    error: str | None = None,
    *,
    summary: dict[str, object] | None = None,
    now: datetime | None = None,
) -> bool:
    """running → succeeded | failed | cancelled, by the running attempt only.
    False: the attempt is stale (its result is discarded)."""
    state = JobState(state)
    if state not in TERMINAL_STATES:
        raise ValueError(f"finish needs a terminal state, not {state.value!r}")
    now = now or utcnow()
    values: dict[str, object] = {"state": state, "error": error, "finished_at": now, "lease_expires_at": None}
    if summary is not None:
        values["summary"] = summary
    if state is JobState.SUCCEEDED:
        values["progress"] = 1.0
    result = session.execute(
        sa.update(Job)
        .where(runs_attempt(job_id, attempt))
        .values(**values)
        .execution_options(**_SYNC)
    )
    if result.rowcount != 1:
        return False
    _close_attempt(session, job_id, attempt, _OUTCOMES[state], error, now)
    _announce(session, job_id, "finish", state, attempt, error=error)
    return True


def fail_unplaceable(session: Session, job_id: str, error: str, *, now: datetime | None = None) -> bool:
    """queued → failed, for a job that no dispatcher can place (placing it raised): it ends
    with its error instead of coming back to the queue and stalling the jobs behind it. No
    attempt ran, so none is closed. False if the job is no longer queued."""
    now = now or utcnow()
    row = session.execute(
        sa.update(Job)
        .where(Job.id == job_id, Job.state == JobState.QUEUED)
        .values(state=JobState.FAILED, error=error, finished_at=now, pending_reason=None)
        .returning(Job.attempt)
        .execution_options(**_SYNC)
    ).first()
    if row is None:
        return False
    _announce(session, job_id, "unplaceable", JobState.FAILED, row.attempt, error=error)
    return True


def _cancel_values(now: datetime) -> dict[str, object]:
    # queued jobs end at once; running ones get the request and end when their attempt
    # observes it (it then calls finish(..., CANCELLED)).
    was_queued = Job.state == JobState.QUEUED
    return {
        "state": sa.case((was_queued, _state(JobState.CANCELLED)), else_=Job.state),
        "cancel_requested_at": sa.func.coalesce(Job.cancel_requested_at, sa.literal(now, Job.cancel_requested_at.type)),
        "finished_at": sa.case((was_queued, sa.literal(now, Job.finished_at.type)), else_=Job.finished_at),
    }


def _not_yet_cancelled() -> sa.ColumnElement[bool]:
    # A running job asked once already is left alone (and announced once).
    return sa.or_(Job.cancel_requested_at.is_(None), Job.state == JobState.QUEUED)


def _announce_cancel(session: Session, job_id: str, state: JobState, attempt: int) -> None:
    if state == JobState.CANCELLED:
        _announce(session, job_id, "cancel", state, attempt)
    else:
        _announce(session, job_id, "cancel_requested", state, attempt, cancel_requested=True)


def request_cancel(session: Session, job_id: str, *, now: datetime | None = None) -> JobState:
    """Cancel a job; idempotent. queued → cancelled; running → cancel requested (the state
    stays running until the attempt finishes); a finished job is left alone. Returns the
    state after the call. Raises NotFound for an unknown job."""
    now = now or utcnow()
    row = session.execute(
        sa.update(Job)
        .where(Job.id == job_id, unfinished(), _not_yet_cancelled())
        .values(**_cancel_values(now))
        .returning(Job.state, Job.attempt)
        .execution_options(**_SYNC)
    ).first()
    if row is not None:
        _announce_cancel(session, job_id, row.state, row.attempt)
        return row.state
    state = _current_state(session, job_id)
    if state is None:
        raise NotFound("job", job_id)
    return state


def cancel_sweep(session: Session, sweep_id: str, *, now: datetime | None = None) -> int:
    """request_cancel for every unfinished job of a sweep; returns how many were affected."""
    now = now or utcnow()
    session.execute(
        sa.update(Sweep)
        .where(Sweep.id == sweep_id, Sweep.cancel_requested_at.is_(None))
        .values(cancel_requested_at=now)
        .execution_options(**_SYNC)
    )
    affected = session.execute(sa.select(sa.func.count()).where(Job.sweep_id == sweep_id, unfinished())).scalar_one()
    rows = session.execute(
        sa.update(Job)
        .where(Job.sweep_id == sweep_id, unfinished(), _not_yet_cancelled())
        .values(**_cancel_values(now))
        .returning(Job.id, Job.state, Job.attempt)
        .execution_options(**_SYNC)
    ).all()
    for row in rows:
        _announce_cancel(session, row.id, row.state, row.attempt)
    return affected


def is_cancel_requested(session: Session, job_id: str, attempt: int) -> bool:
    """What a running attempt polls between windows. Raises StaleAttempt when the attempt
    is no longer the running one (it must stop without writing anything)."""
    row = session.execute(
        sa.select(Job.cancel_requested_at).where(
            runs_attempt(job_id, attempt)
        )
    ).first()
    if row is None:
        raise StaleAttempt(job_id, attempt)
    return row.cancel_requested_at is not None


def retry(session: Session, job_id: str, *, now: datetime | None = None) -> int:
    """failed | cancelled → queued, resuming from the last checkpoint (checkpoints, metrics
    and the step count are kept; the error is cleared). The job gets a fresh budget of
    max_attempts tries. Returns the attempt number the next claim will exceed.
    Raises IllegalTransition from any other state, NotFound for an unknown job."""
    now = now or utcnow()
    row = session.execute(
        sa.update(Job)
        .where(Job.id == job_id, Job.state.in_([JobState.FAILED, JobState.CANCELLED]))
        .values(
            state=JobState.QUEUED,
            error=None,
            cancel_requested_at=None,
            finished_at=None,
            pending_reason=None,
            not_before=None,
            lease_expires_at=None,
            summary=None,
            retry_base=Job.attempt,
        )
        .returning(Job.attempt)
        .execution_options(**_SYNC)
    ).first()
    if row is not None:
        _announce(session, job_id, "retry", JobState.QUEUED, row.attempt)
        return row.attempt
    state = _current_state(session, job_id)
    if state is None:
        raise NotFound("job", job_id)
    raise IllegalTransition(job_id, state.value, "retry")


def update_progress(
    session: Session,
    job_id: str,
    attempt: int,
    step: int,
    progress: float | None = None,
    *,
    max_steps: int | None = None,
) -> bool:
    """Record the running attempt's step (progress defaults to step / max_steps, at most 1).
    `max_steps`, when given, is the attempt's own count of its budget (a job budgeted in
    epochs learns it only when its data is open) and replaces the stored one.
    False: the attempt is stale."""
    values: dict[str, object] = {"step": step}
    if progress is not None:
        values["progress"] = float(progress)
    elif max_steps:
        values["progress"] = min(1.0, step / max_steps)
    else:
        values["progress"] = sa.case((Job.max_steps > 0, sa.cast(step, sa.Double) / Job.max_steps), else_=Job.progress)
    if max_steps:
        values["max_steps"] = max_steps
    result = session.execute(
        sa.update(Job).where(runs_attempt(job_id, attempt)).values(**values).execution_options(**_SYNC)
    )
    return result.rowcount == 1


def list_attempts(session: Session, job_id: str) -> list[Attempt]:
    return list(session.execute(sa.select(Attempt).where(Attempt.job_id == job_id).order_by(Attempt.number)).scalars())
