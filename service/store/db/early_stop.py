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
from service.store.db.base import utcnow
from service.store.db.models import Job, JobState, Sweep
from service.store.early_stop import PAUSED, TARGET, ladders, reached

UNSETTLED_BATCH = 100  # sweeps decided per reconciler pass


def rule(session: Session, job: Job) -> tuple[tuple[int, ...], dict] | None:
    """The rungs of a sweep's trial and its sweep's early_stop (None: its sweep does not
    stop early)."""
    if job.sweep_id is None:
        return None
    sweep = session.get(Sweep, job.sweep_id)
    if sweep is None or sweep.early_stop is None:
        return None
    by_bracket = ladders(sweep.early_stop)
    order = [j.id for j in repo.list_sweep_jobs(session, sweep.id)].index(job.id)
    return by_bracket[asha.bracket_of(order, len(by_bracket))], dict(sweep.early_stop)


def paused(job: Job) -> bool:
    """Stopped at a rung, and not resumed since."""
    return job.state == JobState.SUCCEEDED and (job.summary or {}).get("stopped") == PAUSED


def _trial(session: Session, job: Job, order: int, es: dict, by_bracket: dict[int, tuple[int, ...]]) -> asha.Trial:
    bracket = asha.bracket_of(order, len(by_bracket))
    ladder, metric = by_bracket[bracket], es["metric"]
    series = repo.read_series(session, job.id, names=[metric])[metric] if job.started_at is not None else []
    results = {step: value for step, value in series if step in ladder}
    active = job.state in (JobState.QUEUED, JobState.RUNNING)
    return asha.Trial(key=job.id, order=order, bracket=bracket, results=results, active=active, resolved=_resolved(job, es, results.get(ladder[-1])))


def _resolved(job: Job, es: dict, top: float | None) -> bool:
    """It reached the sweep's target: stopped there, or at its very end (top rung)."""
    if es.get("target") is None or job.state != JobState.SUCCEEDED:
        return False
    return (job.summary or {}).get("stopped") == TARGET or reached(top, es["target"], es["goal"])


def deciding(sweep: Sweep) -> bool:
    """Its early stopping may still resume a paused trial: the sweep is not finished even
    when every trial is, for now (repo.sweep_state)."""
    return sweep.early_stop is not None and sweep.settled_at is None and sweep.cancel_requested_at is None


def advance(session: Session, job_id: str) -> list[tuple[str, int, str]]:
    """After an attempt of `job_id` ended, however it ended (paused at a rung, completed,
    failed, lost, cancelled): `decide` for its sweep, `job_id` being the arrival."""
    job = session.get(Job, job_id)
    if job is None or job.sweep_id is None:
        return []
    return decide(session, job.sweep_id, arrived=job_id)


def decide(session: Session, sweep_id: str, arrived: str | None = None) -> list[tuple[str, int, str]]:
    """Resume each paused trial the sweep's rule promotes now; when none is resumed and no
    trial is queued or running, the sweep is settled (nothing can go on any more).

    Every caller may repeat a decision (the worker in the transaction that ends an
    attempt, the dispatcher after it saw the attempt end, the reconciler for `unsettled`
    sweeps): the same results resume nothing twice. Returns (job id, priority, project)
    of every trial of the sweep now queued and due, resumed now or before, for the queue
    (which takes each once)."""
    # One decision at a time per sweep (PostgreSQL; SQLite serialises writers anyway).
    sweep = session.execute(sa.select(Sweep).where(Sweep.id == sweep_id).with_for_update()).scalar_one()
    es = sweep.early_stop
    if es is None:  # (a JSON null, not SQL NULL, reaches `unsettled`: settle it once)
        sweep.settled_at = sweep.settled_at or utcnow()
        return []
    jobs = repo.list_sweep_jobs(session, sweep.id)
    chosen = [] if sweep.cancel_requested_at is not None else _chosen(session, es, jobs, arrived)
    for trial in chosen:
        resume(session, trial.key, max(trial.results))
    active = any(j.state in (JobState.QUEUED, JobState.RUNNING) for j in jobs)  # `resume` updated them in place
    sweep.settled_at = None if active else (sweep.settled_at or utcnow())
    now = utcnow()
    return [(j.id, j.priority, j.project_id) for j in jobs if j.state == JobState.QUEUED and (j.not_before is None or j.not_before <= now)]


def _chosen(session: Session, es: dict, jobs: list[Job], arrived: str | None) -> list[asha.Trial]:
    """The paused trials the rule resumes now (see service.store.early_stop)."""
    by_bracket = ladders(es)
    trials = [_trial(session, j, i, es, by_bracket) for i, j in enumerate(jobs)]
    rows = {j.id: j for j in jobs}
    if es["resume"]:
        chosen = [t for t in asha.promotions(trials, by_bracket, es["reduction_factor"], es["goal"]) if paused(rows[t.key])]
        return chosen or [t for t in asha.idle_resumptions(trials, by_bracket, es["goal"]) if paused(rows[t.key])]
    if arrived is None or not paused(rows[arrived]):  # without pausing only an arrival goes on
        return []
    trial = next(t for t in trials if t.key == arrived)
    rung = max(trial.results, default=None)
    if rung is None or rung >= by_bracket[trial.bracket][-1]:
        return []
    return [trial] if asha.continues_on_arrival(trial, rung, trials, es["reduction_factor"], es["goal"]) else []


def unsettled(session: Session) -> list[str]:
    """Sweeps whose rule must decide again: stopping early, not settled, not cancelled, and
    no trial queued or running. A decision was missed: the last active trial failed out of
    attempts or was cancelled while queued, or the process that would have decided died
    after the attempt ended. The dispatchers' reconciler decides for them."""
    active = sa.select(Job.id).where(Job.sweep_id == Sweep.id, Job.state.in_((JobState.QUEUED, JobState.RUNNING)))
    return list(session.execute(
        sa.select(Sweep.id).where(
            Sweep.early_stop.is_not(None), Sweep.settled_at.is_(None), Sweep.cancel_requested_at.is_(None), ~active.exists(),
        ).limit(UNSETTLED_BATCH)
    ).scalars())


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
