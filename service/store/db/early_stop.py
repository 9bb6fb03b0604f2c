"""A sweep's early stopping in the database: the rungs of a trial, and the decisions
after each attempt (the rule: service.store.asha; the settings and the story:
service.store.early_stop).

`advance` reads every trial's evaluations at its rungs (its task metric's series) and
resumes each paused trial the rule promotes now; `resume` is that transition (succeeded,
stopped early → queued), announced like every other transition, at commit.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.store import asha, events
from service.store.db import outbox, repo
from service.store.db.models import Job, JobState, Sweep
from service.store.early_stop import PAUSED, ladders


def ladder(session: Session, job: Job) -> tuple[int, ...] | None:
    """The rungs of a sweep's trial (None: its sweep does not stop early)."""
    if job.sweep_id is None:
        return None
    sweep = session.get(Sweep, job.sweep_id)
    if sweep is None or sweep.early_stop is None:
        return None
    by_bracket = ladders(sweep.early_stop)
    order = [j.id for j in repo.list_sweep_jobs(session, sweep.id)].index(job.id)
    return by_bracket[asha.bracket_of(order, len(by_bracket))]


def paused(job: Job) -> bool:
    """Stopped at a rung, and not resumed since."""
    return job.state == JobState.SUCCEEDED and (job.summary or {}).get("stopped") == PAUSED


def _trial(session: Session, job: Job, order: int, metric: str, by_bracket: dict[int, tuple[int, ...]]) -> asha.Trial:
    bracket = asha.bracket_of(order, len(by_bracket))
    steps = set(by_bracket[bracket])
    series = repo.read_series(session, job.id, names=[metric])[metric] if job.started_at is not None else []
    results = {step: value for step, value in series if step in steps}
    active = job.state in (JobState.QUEUED, JobState.RUNNING)
    return asha.Trial(key=job.id, order=order, bracket=bracket, results=results, active=active)


def advance(session: Session, job_id: str) -> list[tuple[str, int, str]]:
    """After an attempt of `job_id` ended: resume what the sweep's rule promotes now.
    Returns (job id, priority, project) of each resumed trial, for the queue."""
    job = session.get(Job, job_id)
    if job is None or job.sweep_id is None:
        return []
    # One decision at a time per sweep (PostgreSQL; SQLite serialises writers anyway).
    sweep = session.execute(sa.select(Sweep).where(Sweep.id == job.sweep_id).with_for_update()).scalar_one()
    es = sweep.early_stop
    if es is None or sweep.cancel_requested_at is not None:
        return []
    by_bracket = ladders(es)
    jobs = repo.list_sweep_jobs(session, sweep.id)
    trials = [_trial(session, j, i, es["metric"], by_bracket) for i, j in enumerate(jobs)]
    rows = {j.id: j for j in jobs}
    if es["resume"]:
        chosen = [t for t in asha.promotions(trials, by_bracket, es["reduction_factor"], es["goal"]) if paused(rows[t.key])]
        if not chosen:
            chosen = [t for t in asha.idle_resumptions(trials, by_bracket, es["goal"]) if paused(rows[t.key])]
    else:
        arrived = next(t for t in trials if t.key == job_id)
        rung = max(arrived.results, default=None)
        go_on = paused(job) and rung is not None and rung < by_bracket[arrived.bracket][-1]
        chosen = [arrived] if go_on and asha.continues_on_arrival(arrived, rung, trials, es["reduction_factor"], es["goal"]) else []
    resumed = []
    for trial in chosen:
        row = resume(session, trial.key, max(trial.results))
        if row is not None:
            resumed.append(row)
    return resumed


def resume(session: Session, job_id: str, rung: int) -> tuple[str, int, str] | None:
    """succeeded (stopped early at `rung`) → queued: the trial continues from its checkpoint.
    Like a retry, its attempts are counted afresh. None when it is no longer paused."""
    row = session.execute(
        sa.update(Job)
        .where(Job.id == job_id, Job.state == JobState.SUCCEEDED, Job.cancel_requested_at.is_(None))
        .values(
            state=JobState.QUEUED, error=None, finished_at=None, pending_reason=None, not_before=None,
            lease_expires_at=None, summary=None, retry_base=Job.attempt,
        )
        .returning(Job.attempt, Job.priority, Job.project_id)
        .execution_options(synchronize_session="fetch")
    ).first()
    if row is None:
        return None
    reason = f"promoted at rung {rung} (early_stop)"
    outbox.add(session, job_id, events.state_event(JobState.QUEUED.value, row.attempt, "promote", reason=reason))
    return job_id, row.priority, row.project_id
