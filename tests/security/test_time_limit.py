"""A job that uses up train.max_wall_s ends failed with "time limit", after a final
checkpoint (issue 14). On c069bd3 there was no limit: a job ran until its steps were done."""

from __future__ import annotations

import pytest

from service.store.db import repo
from service.store.db.models import JobState
from tests.workers.test_end_to_end import tiny_config

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def test_a_job_out_of_time_fails_with_the_reason_after_a_final_checkpoint(stack):
    job_id = stack.submit(tiny_config(1_000_000, train={"max_wall_s": 2, "checkpoint_every": 0, "eval_every": 0}))
    stack.start_worker()
    job = stack.wait(job_id, {JobState.SUCCEEDED, JobState.FAILED}, timeout=120)
    assert job.state == JobState.FAILED and job.error == f"time limit: train.max_wall_s used up at step {job.step}"
    assert 0 < job.step < 1_000_000 and job.attempt == 1
    with stack.sessions.begin() as session:
        assert repo.latest_checkpoint(session, job_id).step == job.step  # a retry resumes from there
