"""Data-parallel jobs (`resources.workers: 2`) through the service: database → queue →
dispatcher (whole-group placement) → Ray Train group → rank 0's reporter → database."""

from __future__ import annotations

import os
import signal
import time

import pytest

from service.store.artifacts import ArtifactStore
from service.store.db import repo
from service.store.db.models import JobState
from trainer import checkpoint as ckpt
from workers.ddp import rank_pids

from tests.workers.test_end_to_end import TERMINAL, tiny_config, undisturbed_losses

pytestmark = pytest.mark.slow
pytest.importorskip("ray.train.torch", reason="needs ray[train] (pandas, pyarrow)")


def group_config(steps: int, workers: int = 2, **overrides) -> dict:
    return tiny_config(steps, resources={"cpus": 1, "workers": workers}, **overrides)


def latest_checkpoint(stack, job_id) -> dict:
    with stack.sessions.begin() as session:
        uri = repo.latest_checkpoint(session, job_id).uri
    return ckpt.from_bytes(ArtifactStore(str(stack.artifacts)).read_bytes(uri))


def metric(stack, job_id, name):
    with stack.sessions.begin() as session:
        return repo.read_series(session, job_id, names=[name]).get(name, [])


def last_rank_pids(stack, job_id) -> list[int]:
    """The PIDs of the job's ranks at the last start of its group, as rank 0 logs them."""
    with stack.sessions.begin() as session:
        return rank_pids([entry.line for entry in repo.read_logs(session, job_id)])[-1]


def test_group_job_matches_one_process_and_reports_from_rank_0(stack):
    stack.start_worker()
    job_id = stack.submit(group_config(40))
    job = stack.wait(job_id, TERMINAL, timeout=300)
    assert job.state == JobState.SUCCEEDED, (job.error, stack.worker_logs())
    assert job.attempt == 1
    single = undisturbed_losses(group_config(40, workers=1))
    group = stack.losses(job_id)
    assert group.keys() == single.keys()
    for step, value in single.items():
        assert abs(group[step] - value) <= 1e-5, (step, group[step], value)
    state = latest_checkpoint(stack, job_id)
    assert state["step"] == 40 and state["ranks"]["world"] == 2
    assert state["cursor"]["kept"][0].shape[1] == 4  # every stream's carried state
    assert metric(stack, job_id, "system/peak_memory_bytes")[0][1] > 0


def test_killed_rank_resumes_and_ends_as_undisturbed(stack):
    stack.start_worker()
    train = {"max_steps": 400, "checkpoint_every": 40, "eval_every": 0, "seed": 3, "device": "cpu"}
    config = group_config(400, train=train)
    job_id = stack.submit(config)
    stack.wait(job_id, {JobState.RUNNING}, step=60, timeout=300)
    pids = last_rank_pids(stack, job_id)
    assert len(pids) == 2, pids
    os.kill(pids[-1], signal.SIGKILL)  # one rank's process, as a lost node would
    job = stack.wait(job_id, TERMINAL, timeout=300)
    assert job.state == JobState.SUCCEEDED, (job.error, stack.worker_logs())
    # Ray Train restarted the group inside the same attempt, on new processes.
    assert job.attempt == 1
    with stack.sessions.begin() as session:
        starts = [e.line for e in repo.read_logs(session, job_id) if e.line.startswith("data-parallel ranks")]
    assert len(starts) == 2
    final = latest_checkpoint(stack, job_id)
    assert final["step"] == 400
    reference = undisturbed_losses(group_config(400, workers=1, train=train))
    got = stack.losses(job_id)
    assert got.keys() == reference.keys()
    assert max(abs(got[s] - v) for s, v in reference.items() if v is not None) <= 1e-5


def test_a_group_the_cluster_cannot_hold_stays_queued_and_says_why(stack):
    stack.start_worker()
    job_id = stack.submit(tiny_config(resources={"cpus": 1, "workers": 4}))  # 4 CPUs on a 2-CPU head
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not stack.job(job_id).pending_reason:
        time.sleep(0.2)
    job = stack.job(job_id)
    assert job.state == JobState.QUEUED and job.attempt == 0
    assert "4 workers of 1 CPU" in job.pending_reason
