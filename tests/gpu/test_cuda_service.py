"""Jobs through the whole service on a GPU node (issue 18): database → Redis queue →
`unroll worker` → Ray (a head that shows its GPU) → trainer → database. Two jobs of half a
GPU share it, each on the GPU Ray assigned and saying which in its log; a job that
reserves no GPU trains on the CPU of the same node."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.store.db import repo
from service.store.db.models import JobState
from tests.gpu.common import DEVICE, ON_CUDA
from tests.processes import start_ray_head
from tests.workers.conftest import Stack

pytestmark = [pytest.mark.cuda, pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TERMINAL = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}


@pytest.fixture(scope="module")
def gpu_ray_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Ray head of the module's own that offers one GPU (the real one on a GPU machine;
    a resource of that name only, where the tests check their own code on a CPU)."""
    head = start_ray_head(tmp_path_factory.mktemp("ray"), cpus=4, gpus=1, cwd=ROOT)
    try:
        yield head.address
    finally:
        head.stop()


@pytest.fixture
def stack(gpu_ray_address: str, database_url: str, redis_url: str, tmp_path: Path, redis_prefix: str) -> Iterator[Stack]:
    s = Stack(database_url, redis_url, lambda: gpu_ray_address, tmp_path / "artifacts", redis_prefix)
    try:
        yield s
    finally:
        s.stop()


def job(gpus: float, device: str) -> dict:
    return {
        "model": {"cell": "lstm", "hidden_size": 32},
        "data": {"kind": "recall", "vocab": 4, "lag": 2, "length": 4000, "batch_size": 8, "valid_length": 64},
        "tbptt": {"k1": 8, "k2": 12},
        "clip": {"mode": "agc"},
        "train": {"max_steps": 60, "eval_every": 30, "checkpoint_every": 30, "device": device, "precision": "bf16"},
        "resources": {"cpus": 1, "gpus": gpus},
    }


def logs_of(stack: Stack, job_id: str) -> list[str]:
    with stack.sessions.begin() as session:
        return [entry.line for entry in repo.read_logs(session, job_id)]


def test_jobs_share_the_gpu_and_a_cpu_job_stays_off_it(stack):
    stack.start_worker()
    on_gpu = [stack.submit(job(0.5, DEVICE.type)) for _ in range(2)]
    on_cpu = stack.submit(job(0, "auto"))
    done = {job_id: stack.wait(job_id, TERMINAL, timeout=240) for job_id in (*on_gpu, on_cpu)}
    for job_id, finished in done.items():
        assert finished.state == JobState.SUCCEEDED, (finished.error, stack.worker_logs())
        assert finished.summary["steps"] == 60

    assert done[on_cpu].summary["device"] == "cpu"
    started = [next(line for line in logs_of(stack, job_id) if line.startswith("attempt 1 on")) for job_id in on_gpu]
    if ON_CUDA:
        for job_id, line in zip(on_gpu, started):
            assert done[job_id].summary["device"] == "cuda:0", line  # the one GPU Ray assigned
            assert "GPU-" in line and "cuda:0 (" in line  # which GPU, by name and UUID
        assert started[0].split("GPU-")[1].split(")")[0] == started[1].split("GPU-")[1].split(")")[0]
        assert done[on_gpu[0]].summary["peak_memory_bytes"] > 0
    cpu_line = next(line for line in logs_of(stack, on_cpu) if line.startswith("attempt 1 on"))
    assert " on cpu, pid" in cpu_line
