"""Every job state transition: legal ones happen once, illegal and stale ones change nothing."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.store.db import repo, states
from service.store.db.base import utcnow
from service.store.db.errors import IllegalTransition, NotFound, StaleAttempt
from service.store.db.models import Attempt, AttemptOutcome, Job, JobState

from .conftest import make_job, make_running


def fresh(session: Session, job_id: str) -> Job:
    session.expire_all()
    return session.get(Job, job_id)


def test_claim_turns_queued_into_running_attempt_1(session: Session) -> None:
    job = make_job(session)
    assert job.state is JobState.QUEUED and job.attempt == 0
    now = utcnow()
    assert states.claim(session, job.id, "w1", 30, now=now) == 1
    session.commit()
    job = fresh(session, job.id)
    assert (job.state, job.attempt, job.lease_owner, job.worker) == (JobState.RUNNING, 1, "w1", "w1")
    assert job.lease_expires_at == now + timedelta(seconds=30)
    assert job.started_at == now
    (attempt,) = states.list_attempts(session, job.id)
    assert (attempt.number, attempt.worker, attempt.outcome) == (1, "w1", None)


def test_claim_is_refused_unless_queued(session: Session) -> None:
    job, _ = make_running(session)
    assert states.claim(session, job.id, "w2", 30) is None
    assert states.claim(session, "job_unknown", "w2", 30) is None
    assert fresh(session, job.id).lease_owner == "w1"


def test_claim_waits_for_not_before(session: Session) -> None:
    job, attempt = make_running(session)
    now = utcnow()
    assert states.requeue_lost(session, job.id, attempt, now=now + timedelta(seconds=60), backoff_seconds=10)
    assert states.claim(session, job.id, "w2", 30, now=now + timedelta(seconds=65)) is None
    assert states.claim_next(session, "w2", 30, now=now + timedelta(seconds=65)) is None
    assert states.claim(session, job.id, "w2", 30, now=now + timedelta(seconds=71)) == 2


def test_claim_next_takes_highest_priority_then_oldest(session: Session) -> None:
    low = make_job(session, priority=0)
    high_old = make_job(session, priority=5)
    high_new = make_job(session, priority=5)
    claims = [states.claim_next(session, "w", 30) for _ in range(4)]
    assert [c.job_id for c in claims[:3]] == [high_old.id, high_new.id, low.id]
    assert all(c.attempt == 1 for c in claims[:3])
    assert claims[3] is None


def test_renew_lease_only_for_the_running_attempt(session: Session) -> None:
    job, attempt = make_running(session)
    later = utcnow() + timedelta(seconds=20)
    assert states.renew_lease(session, job.id, attempt, "w1", 30, now=later)
    assert fresh(session, job.id).lease_expires_at == later + timedelta(seconds=30)
    assert not states.renew_lease(session, job.id, attempt + 1, "w1", 30)  # not this attempt
    assert not states.renew_lease(session, job.id, attempt, "w2", 30)  # not this worker
    assert states.finish(session, job.id, attempt, JobState.SUCCEEDED)
    assert not states.renew_lease(session, job.id, attempt, "w1", 30)  # no longer running


def test_expired_leases_and_requeue_with_next_attempt(session: Session) -> None:
    job, attempt = make_running(session)
    other, _ = make_running(session)
    now = utcnow()
    assert states.expired_leases(session, now) == []
    later = now + timedelta(seconds=31)
    states.renew_lease(session, other.id, 1, "w1", 60, now=now)
    expired = states.expired_leases(session, later)
    assert [(e.job_id, e.attempt, e.worker) for e in expired] == [(job.id, 1, "w1")]

    assert states.requeue_lost(session, job.id, attempt, now=later) is JobState.QUEUED
    session.commit()
    job = fresh(session, job.id)
    assert (job.state, job.attempt, job.lease_expires_at, job.error) == (JobState.QUEUED, 1, None, None)
    # the lost attempt is closed, and the next claim runs as attempt + 1
    assert states.list_attempts(session, job.id)[0].outcome is AttemptOutcome.LOST
    assert states.claim(session, job.id, "w2", 30) == 2
    # requeueing the old attempt again is refused (it is stale)
    assert states.requeue_lost(session, job.id, 1, now=later + timedelta(hours=1)) is None
    assert fresh(session, job.id).state is JobState.RUNNING


def test_requeue_refused_while_lease_is_live(session: Session) -> None:
    job, attempt = make_running(session)
    assert states.requeue_lost(session, job.id, attempt, now=utcnow()) is None  # renewed meanwhile
    assert fresh(session, job.id).state is JobState.RUNNING
    # a dispatcher that knows the actor died may skip the lease check
    assert states.requeue_lost(session, job.id, attempt, require_expired=False) is JobState.QUEUED


def test_requeue_fails_job_out_of_attempts(session: Session) -> None:
    job = make_job(session, max_attempts=2)
    far = utcnow() + timedelta(hours=1)
    assert states.claim(session, job.id, "w", 30) == 1
    assert states.requeue_lost(session, job.id, 1, now=far) is JobState.QUEUED
    assert states.claim(session, job.id, "w", 30) == 2
    assert states.requeue_lost(session, job.id, 2, now=far) is JobState.FAILED
    session.commit()
    job = fresh(session, job.id)
    assert job.state is JobState.FAILED and "no attempts left" in job.error
    assert job.finished_at is not None


def test_requeue_of_a_cancelling_job_ends_cancelled(session: Session) -> None:
    job, attempt = make_running(session)
    assert states.request_cancel(session, job.id) is JobState.RUNNING
    assert states.requeue_lost(session, job.id, attempt, require_expired=False) is JobState.CANCELLED


@pytest.mark.parametrize("final", [JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED])
def test_finish_by_the_running_attempt(session: Session, final: JobState) -> None:
    job, attempt = make_running(session)
    error = "boom at step 7" if final is JobState.FAILED else None
    assert states.finish(session, job.id, attempt, final, error, summary={"steps": 7})
    session.commit()
    job = fresh(session, job.id)
    assert (job.state, job.error, job.summary) == (final, error, {"steps": 7})
    assert job.finished_at is not None and job.lease_expires_at is None
    assert states.list_attempts(session, job.id)[0].outcome.value == final.value
    # finishing twice, or from another state, is refused and changes nothing
    assert not states.finish(session, job.id, attempt, JobState.SUCCEEDED)
    assert fresh(session, job.id).state is final


def test_finish_by_a_stale_attempt_is_refused(session: Session) -> None:
    job, attempt = make_running(session)
    states.requeue_lost(session, job.id, attempt, require_expired=False)
    assert states.claim(session, job.id, "w2", 30) == 2
    assert not states.finish(session, job.id, 1, JobState.FAILED, "zombie")
    assert not states.update_progress(session, job.id, 1, 50)
    assert fresh(session, job.id).state is JobState.RUNNING
    assert states.finish(session, job.id, 2, JobState.SUCCEEDED)


def test_finish_needs_a_terminal_state(session: Session) -> None:
    job, attempt = make_running(session)
    with pytest.raises(ValueError):
        states.finish(session, job.id, attempt, JobState.QUEUED)


def test_finish_of_a_queued_job_is_refused(session: Session) -> None:
    job = make_job(session)
    assert not states.finish(session, job.id, 0, JobState.SUCCEEDED)
    assert fresh(session, job.id).state is JobState.QUEUED


def test_cancel_queued_is_immediate_and_idempotent(session: Session) -> None:
    job = make_job(session)
    assert states.request_cancel(session, job.id) is JobState.CANCELLED
    assert states.request_cancel(session, job.id) is JobState.CANCELLED
    job = fresh(session, job.id)
    assert job.finished_at is not None and job.cancel_requested_at is not None
    assert states.claim(session, job.id, "w", 30) is None


def test_cancel_running_is_observed_by_the_attempt(session: Session) -> None:
    job, attempt = make_running(session)
    assert not states.is_cancel_requested(session, job.id, attempt)
    assert states.request_cancel(session, job.id) is JobState.RUNNING
    first = fresh(session, job.id).cancel_requested_at
    assert states.request_cancel(session, job.id) is JobState.RUNNING
    assert fresh(session, job.id).cancel_requested_at == first  # the first request stands
    assert states.is_cancel_requested(session, job.id, attempt)
    assert states.finish(session, job.id, attempt, JobState.CANCELLED)
    assert states.request_cancel(session, job.id) is JobState.CANCELLED
    with pytest.raises(StaleAttempt):
        states.is_cancel_requested(session, job.id, attempt)


def test_cancel_finished_job_is_a_noop(session: Session) -> None:
    job, attempt = make_running(session)
    states.finish(session, job.id, attempt, JobState.SUCCEEDED)
    assert states.request_cancel(session, job.id) is JobState.SUCCEEDED
    assert fresh(session, job.id).cancel_requested_at is None
    with pytest.raises(NotFound):
        states.request_cancel(session, "job_unknown")


@pytest.mark.parametrize("how", ["failed", "cancelled"])
def test_retry_requeues_with_a_fresh_budget(session: Session, how: str) -> None:
    job = make_job(session, max_attempts=1)
    attempt = states.claim(session, job.id, "w", 30)
    repo.add_checkpoint(session, job.id, attempt, step=50, uri="mem://c50", bytes=10, sha256="0" * 64)
    states.update_progress(session, job.id, attempt, 50)
    if how == "failed":
        states.finish(session, job.id, attempt, JobState.FAILED, "oom")
    else:
        states.request_cancel(session, job.id)
        states.finish(session, job.id, attempt, JobState.CANCELLED)
    assert states.retry(session, job.id) == 1
    session.commit()
    job = fresh(session, job.id)
    assert (job.state, job.error, job.cancel_requested_at, job.finished_at) == (JobState.QUEUED, None, None, None)
    assert job.step == 50 and repo.latest_checkpoint(session, job.id).step == 50  # resumes there
    assert states.claim(session, job.id, "w", 30) == 2
    # max_attempts=1 counts from the retry: losing attempt 2 fails it, as for a new job
    assert states.requeue_lost(session, job.id, 2, require_expired=False) is JobState.FAILED


@pytest.mark.parametrize("setup", ["queued", "running", "succeeded"])
def test_retry_refused_from_other_states(session: Session, setup: str) -> None:
    job = make_job(session)
    if setup != "queued":
        attempt = states.claim(session, job.id, "w", 30)
        if setup == "succeeded":
            states.finish(session, job.id, attempt, JobState.SUCCEEDED)
    before = fresh(session, job.id).state
    with pytest.raises(IllegalTransition) as info:
        states.retry(session, job.id)
    assert info.value.current == before.value
    assert fresh(session, job.id).state is before
    with pytest.raises(NotFound):
        states.retry(session, "job_unknown")


def test_update_progress(session: Session) -> None:
    job, attempt = make_running(session, max_steps=200)
    assert states.update_progress(session, job.id, attempt, 50)
    job = fresh(session, job.id)
    assert (job.step, job.progress) == (50, 0.25)
    assert states.update_progress(session, job.id, attempt, 60, progress=0.5)
    assert fresh(session, job.id).progress == 0.5
    assert not states.update_progress(session, job.id, attempt + 1, 70)


def test_progress_of_an_epochs_budget(session: Session) -> None:
    """A job budgeted in epochs has no max_steps until its attempt counts them."""
    job, attempt = make_running(session, max_steps=None)
    assert states.update_progress(session, job.id, attempt, 50, max_steps=400)
    job = fresh(session, job.id)
    assert (job.step, job.max_steps, job.progress) == (50, 400, 0.125)
    assert states.update_progress(session, job.id, attempt, 410, max_steps=400)
    assert fresh(session, job.id).progress == 1.0  # an estimate never shows past the end


def test_cancel_sweep(session: Session) -> None:
    project = repo.get_or_create_project(session, "demo")
    sweep = repo.create_sweep(session, project_id=project.id, base={}, grid={"tbptt.k1": [8, 16, 32]})
    queued = make_job(session, sweep_id=sweep.id)
    running, attempt = make_running(session, sweep_id=sweep.id)
    done, done_attempt = make_running(session, sweep_id=sweep.id)
    states.finish(session, done.id, done_attempt, JobState.SUCCEEDED)
    assert states.cancel_sweep(session, sweep.id) == 2
    session.commit()
    assert fresh(session, queued.id).state is JobState.CANCELLED
    assert fresh(session, running.id).cancel_requested_at is not None
    assert fresh(session, done.id).state is JobState.SUCCEEDED
    assert repo.sweep_state(repo.sweep_state_counts(session, sweep.id)) == "running"
    states.finish(session, running.id, attempt, JobState.CANCELLED)
    assert repo.sweep_state(repo.sweep_state_counts(session, sweep.id)) == "cancelled"


def test_loaded_objects_see_transitions(session: Session) -> None:
    job = make_job(session)
    states.claim(session, job.id, "w", 30)
    assert job.state is JobState.RUNNING and job.attempt == 1  # same object, refreshed


def test_transitions_leave_no_orphan_attempt_rows(session: Session) -> None:
    job = make_job(session)
    states.claim(session, job.id, "w", 30)
    states.claim(session, job.id, "w", 30)  # refused: no second attempt row
    count = session.execute(sa.select(sa.func.count()).select_from(Attempt)).scalar_one()
    assert count == 1


def test_a_handed_back_attempt_does_not_count_against_max_attempts(session: Session) -> None:
    job, attempt = make_running(session, max_attempts=1)
    assert states.hand_back(session, job.id, attempt) is JobState.QUEUED  # not failed: nothing did
    assert states.hand_back(session, job.id, attempt) is None  # no longer running
    second = states.claim(session, job.id, "w2", 30)
    assert second == attempt + 1 and fresh(session, job.id).not_before is None
    # A real loss of the one counted try fails the job.
    assert states.requeue_lost(session, job.id, second, require_expired=False) is JobState.FAILED
    assert "no attempts left" in fresh(session, job.id).error


def test_a_hand_back_with_a_cancel_requested_ends_cancelled(session: Session) -> None:
    job, attempt = make_running(session)
    states.request_cancel(session, job.id)
    assert states.hand_back(session, job.id, attempt) is JobState.CANCELLED
