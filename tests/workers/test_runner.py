"""An attempt that lost its job (a zombie that wakes up after the lease moved on) stops
and writes nothing: no metric, checkpoint, log line or state. Run without Ray: the
runner is called directly, as a Ray worker would."""

from __future__ import annotations

import threading
import time

import sqlalchemy as sa

from service.store.db import repo, states
from service.store.db.models import Checkpoint, JobLog, JobState, Metric
from workers.attempt import AttemptSpec
from workers.runner import run_attempt

CONFIG = {
    "model": {"hidden_size": 16},
    "data": {"kind": "recall", "vocab": 4, "lag": 2, "length": 4000, "batch_size": 4, "valid_length": 64},
    "tbptt": {"k1": 8},
    "train": {"max_steps": 1_000_000, "eval_every": 0, "checkpoint_every": 10, "device": "cpu"},
}


def test_a_stale_attempt_stops_and_writes_nothing(stack):
    job_id = stack.submit(CONFIG, enqueue=False)
    with stack.sessions.begin() as session:
        assert states.claim(session, job_id, "zombie-host", lease_seconds=60) == 1
    spec = AttemptSpec(job_id=job_id, attempt=1, worker="zombie-host", database_url=stack.database_url,
                       redis_url=stack.redis_url, artifacts=str(stack.artifacts), lease_seconds=60, prefix=stack.prefix)
    result: dict[str, str] = {}
    thread = threading.Thread(target=lambda: result.update(outcome=run_attempt(spec)))
    thread.start()
    stack.wait(job_id, {JobState.RUNNING}, step=30)

    # The lease is declared lost and another worker takes the job as attempt 2.
    with stack.sessions.begin() as session:
        assert states.requeue_lost(session, job_id, 1, require_expired=False) == JobState.QUEUED
        assert states.claim(session, job_id, "new-host", lease_seconds=60) == 2
    taken_over = time.time()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert result["outcome"] == "stale"

    with stack.sessions.begin() as session:
        job = repo.get_job(session, job_id)
        assert job.state == JobState.RUNNING and job.attempt == 2 and job.worker == "new-host"
        late_metrics = session.execute(
            sa.select(sa.func.count()).select_from(Metric).where(Metric.job_id == job_id, Metric.wall_time > taken_over + 0.5)
        ).scalar_one()
        assert late_metrics == 0
        assert session.execute(sa.select(sa.func.count()).select_from(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.attempt == 2)).scalar_one() == 0
        assert session.execute(sa.select(sa.func.count()).select_from(JobLog).where(JobLog.job_id == job_id, JobLog.attempt == 2)).scalar_one() == 0
        assert states.finish(session, job_id, 1, JobState.SUCCEEDED) is False  # the fence holds


def test_an_epochs_budget_shows_progress_while_it_runs(stack):
    """The budget in epochs becomes a step count when the data is open (issue 19 part 3)."""
    config = {**CONFIG, "data": {**CONFIG["data"], "length": 800},
              "train": {**CONFIG["train"], "max_steps": None, "epochs": 3, "checkpoint_every": 0}}
    job_id = stack.submit(config, enqueue=False)
    assert stack.job(job_id).max_steps is None
    with stack.sessions.begin() as session:
        assert states.claim(session, job_id, "host", lease_seconds=60) == 1
    spec = AttemptSpec(job_id=job_id, attempt=1, worker="host", database_url=stack.database_url,
                       redis_url=stack.redis_url, artifacts=str(stack.artifacts), lease_seconds=60, prefix=stack.prefix)
    thread = threading.Thread(target=run_attempt, args=(spec,))
    thread.start()
    # Streams of 800 steps in windows of 8: 100 updates an epoch.
    job = stack.wait(job_id, {JobState.RUNNING, JobState.SUCCEEDED}, step=20)
    assert job.max_steps == 300
    if job.state == JobState.RUNNING:
        assert 0 < job.progress < 1 and job.progress == job.step / 300
    thread.join(timeout=120)
    job = stack.job(job_id)
    assert (job.state, job.step, job.progress) == (JobState.SUCCEEDED, 300, 1.0)
