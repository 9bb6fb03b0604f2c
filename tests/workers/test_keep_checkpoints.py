"""train.keep_checkpoints in the service: after each checkpoint an attempt records, the
records and files past the newest N are deleted, across attempts, and the job still resumes
from the newest, on the trajectory of an undisturbed run. The attempts run through the
runner as a Ray worker would call it (without Ray), on the real database, Redis and store."""

from __future__ import annotations

import threading
from pathlib import Path

import sqlalchemy as sa

from service.store.db import repo, states
from service.store.db.models import Job, JobState
from workers.attempt import AttemptSpec
from workers.runner import run_attempt
from tests.workers.test_end_to_end import undisturbed_losses

CONFIG = {
    "model": {"hidden_size": 16},
    "data": {"kind": "recall", "vocab": 4, "lag": 2, "length": 4000, "batch_size": 4, "valid_length": 64},
    "tbptt": {"k1": 8},
    "train": {"max_steps": 1_000_000, "eval_every": 0, "checkpoint_every": 5, "keep_checkpoints": 2, "device": "cpu"},
}


def spec(stack, job_id: str, attempt: int) -> AttemptSpec:
    return AttemptSpec(job_id=job_id, attempt=attempt, worker=f"host-{attempt}", database_url=stack.database_url,
                       redis_url=stack.redis_url, artifacts=str(stack.artifacts), lease_seconds=60, prefix=stack.prefix)


def kept(stack, job_id: str) -> tuple[list[int], set[str], set[str]]:
    """(steps recorded, their files' URIs, the files in the job's folder)."""
    with stack.sessions.begin() as session:
        rows = repo.list_checkpoints(session, job_id)
    # the checkpoints' files (a completed run's model-a<N>.pt lies beside them)
    files = {str(p) for p in (Path(stack.artifacts) / "jobs" / job_id / "checkpoints").rglob("*") if p.is_file()}
    return [r.step for r in rows], {r.uri for r in rows}, files


def test_only_the_newest_checkpoints_are_kept_and_the_job_resumes_from_them(stack):
    job_id = stack.submit(CONFIG, enqueue=False)
    with stack.sessions.begin() as session:
        assert states.claim(session, job_id, "host-1", lease_seconds=60) == 1
    outcome: dict[str, str] = {}
    first = threading.Thread(target=lambda: outcome.update(first=run_attempt(spec(stack, job_id, 1))))
    first.start()
    stack.wait(job_id, {JobState.RUNNING}, step=40)  # eight checkpoints or more by now
    with stack.sessions.begin() as session:
        states.request_cancel(session, job_id)
    first.join(timeout=60)
    assert outcome["first"] == "cancelled"
    stopped = stack.job(job_id).step  # a final checkpoint at the step it stopped

    steps, uris, files = kept(stack, job_id)
    assert len(steps) == 2 and steps[-1] == stopped
    assert files == uris  # exactly the two recorded files: the others' records and files are gone

    # Resume: the job, given a budget that ends soon, is retried as attempt 2.
    budget = stopped + 12
    with stack.sessions.begin() as session:
        config = {**CONFIG, "train": {**CONFIG["train"], "max_steps": budget}}
        session.execute(sa.update(Job).where(Job.id == job_id).values(config=config, max_steps=budget))
        states.retry(session, job_id)
        assert states.claim(session, job_id, "host-2", lease_seconds=60) == 2
    assert run_attempt(spec(stack, job_id, 2)) == "succeeded"

    steps, uris, files = kept(stack, job_id)
    assert len(steps) == 2 and steps[-1] == budget and files == uris  # attempt 1's files pruned too
    assert stack.losses(job_id) == undisturbed_losses(config)  # resumed on the same trajectory
