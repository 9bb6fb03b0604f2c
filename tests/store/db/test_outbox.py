"""Every job state transition announces itself once, with its attempt, and only when its
transaction commits (service.store.db.outbox): on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy.orm import Session

from service.store.db import outbox, repo, states
from service.store.db.base import utcnow
from service.store.db.errors import IllegalTransition
from service.store.db.models import JobState

from .conftest import make_job, make_project


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[tuple[str, dict]]] = []

    def __call__(self, batch) -> None:
        self.batches.append(list(batch))

    @property
    def events(self) -> list[tuple[str, dict]]:
        return [item for batch in self.batches for item in batch]

    def states(self, job_id: str) -> list[tuple[str, int, str]]:
        return [(e["state"], e["attempt"], e["transition"]) for j, e in self.events if j == job_id and e["type"] == "state"]


@pytest.fixture
def published(session: Session) -> Recorder:
    recorder = Recorder()
    session.info.update(outbox.publishing(recorder))
    return recorder


def test_a_transition_is_published_at_commit_and_never_on_rollback(session: Session, published: Recorder) -> None:
    job = make_job(session)  # a creation is no transition
    assert published.events == []
    assert states.claim(session, job.id, "w1", 30) == 1
    assert published.events == []  # not before the commit
    assert [e["state"] for _, e in outbox.pending(session)] == ["running"]
    session.commit()
    assert published.states(job.id) == [("running", 1, "claim")]
    assert published.events[0][1]["worker"] == "w1"

    assert states.finish(session, job.id, 1, JobState.SUCCEEDED)
    session.rollback()  # it never happened: nothing is said
    assert states.finish(session, job.id, 1, JobState.FAILED, "boom")
    session.close()  # closed without a commit: nothing either
    assert published.states(job.id) == [("running", 1, "claim")]

    assert states.finish(session, job.id, 1, JobState.FAILED, "boom")
    session.commit()
    assert published.states(job.id) == [("running", 1, "claim"), ("failed", 1, "finish")]
    assert published.events[-1][1]["error"] == "boom"


def test_refused_transitions_say_nothing(session: Session, published: Recorder) -> None:
    job = make_job(session)
    assert states.finish(session, job.id, 1, JobState.SUCCEEDED) is False  # not running
    assert states.requeue_lost(session, job.id, 1, require_expired=False) is None
    with pytest.raises(IllegalTransition):
        states.retry(session, job.id)
    session.commit()
    assert published.events == []


def test_every_transition_in_order_with_its_attempt(session: Session, published: Recorder) -> None:
    job = make_job(session, max_attempts=2)
    now = utcnow()
    states.claim(session, job.id, "w1", 30, now=now)
    states.requeue_lost(session, job.id, 1, now=now + timedelta(seconds=31))  # its lease expired
    states.claim(session, job.id, "w2", 30, now=now + timedelta(seconds=32))
    states.hand_back(session, job.id, 2)  # a clean stop: not counted
    states.claim(session, job.id, "w3", 30, now=now + timedelta(seconds=33))
    states.requeue_lost(session, job.id, 3, require_expired=False, reason="worker lost: boom")  # out of attempts
    states.retry(session, job.id)
    states.request_cancel(session, job.id)  # queued: cancelled at once
    states.request_cancel(session, job.id)  # again: nothing new
    session.commit()
    assert published.states(job.id) == [
        ("running", 1, "claim"),
        ("queued", 1, "lost"),
        ("running", 2, "claim"),
        ("queued", 2, "hand_back"),
        ("running", 3, "claim"),
        ("failed", 3, "lost"),
        ("queued", 3, "retry"),
        ("cancelled", 3, "cancel"),
    ]
    failed = next(e for _, e in published.events if e["state"] == "failed")
    assert failed["reason"] == "worker lost: boom" and failed["error"].endswith("no attempts left")
    assert len(published.batches) == 1  # one commit, one batch


def test_cancels_of_running_jobs_and_unplaceable_jobs(session: Session, published: Recorder) -> None:
    running = make_job(session)
    states.claim(session, running.id, "w1", 30)
    session.commit()
    published.batches.clear()
    assert states.request_cancel(session, running.id) is JobState.RUNNING
    assert states.request_cancel(session, running.id) is JobState.RUNNING  # once only
    session.commit()
    assert published.states(running.id) == [("running", 1, "cancel_requested")]
    assert published.events[0][1]["cancel_requested"] is True
    # the attempt sees the request and stops
    assert states.finish(session, running.id, 1, JobState.CANCELLED)
    # a job placing raised for
    poison = make_job(session, commit=False)
    assert states.fail_unplaceable(session, poison.id, "could not be placed: ValueError: no")
    assert not states.fail_unplaceable(session, poison.id, "again")
    session.commit()
    assert published.states(running.id)[-1] == ("cancelled", 1, "finish")
    assert published.states(poison.id) == [("failed", 0, "unplaceable")]


def test_a_sweep_cancel_announces_each_job_once(session: Session, published: Recorder) -> None:
    project = make_project(session)
    sweep = repo.create_sweep(session, project_id=project.id, base={}, grid={}, seeds=1)
    jobs = [make_job(session, sweep_id=sweep.id) for _ in range(3)]
    states.claim(session, jobs[0].id, "w1", 30)
    states.finish(session, jobs[0].id, 1, JobState.SUCCEEDED)  # finished: left alone
    states.claim(session, jobs[1].id, "w1", 30)  # running: asked to stop
    session.commit()
    published.batches.clear()
    assert states.cancel_sweep(session, sweep.id) == 2
    assert states.cancel_sweep(session, sweep.id) == 1  # the running one, still stopping
    session.commit()
    assert published.states(jobs[0].id) == []
    assert published.states(jobs[1].id) == [("running", 1, "cancel_requested")]
    assert published.states(jobs[2].id) == [("cancelled", 0, "cancel")]


def test_a_failing_publisher_leaves_the_commit_standing(session: Session) -> None:
    def broken(batch) -> None:
        raise RuntimeError("redis is away")

    session.info.update(outbox.publishing(broken))
    job = make_job(session)
    states.claim(session, job.id, "w1", 30)
    session.commit()  # no error
    assert repo.get_job(session, job.id).state is JobState.RUNNING
