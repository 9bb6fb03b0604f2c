"""A real local Ray cluster, a real database and real Redis for the worker tests; the
dispatchers run as separate `unroll worker` processes that tests may kill."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis as redis_sync
from sqlalchemy.orm import sessionmaker

from service.store.db import repo
from service.store.db.models import Job, JobState
from service.store.db.session import make_engine
from service.store.queue import JobQueue
from tests.processes import start_ray_head

ROOT = Path(__file__).resolve().parents[2]
LEASE_SECONDS = 3


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Ray head of the test session's own (2 CPUs), stopped at the end."""
    head = start_ray_head(tmp_path_factory.mktemp("ray"), cwd=ROOT)
    try:
        yield head.address
    finally:
        head.stop()


class Stack:
    """The parts a worker test drives: a database, a Redis prefix, a Ray cluster, and
    dispatcher processes."""

    def __init__(self, database_url: str, redis_url: str, ray_address: Callable[[], str], artifacts: Path, prefix: str):
        self.database_url, self.redis_url, self._ray_address = database_url, redis_url, ray_address
        self.artifacts, self.prefix = artifacts, prefix
        self.engine = make_engine(database_url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.workers: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        with self.sessions.begin() as session:
            self.project_id = repo.get_or_create_project(session, f"p-{prefix}").id

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("UNROLL_")}
        env.update({
            "UNROLL_DATABASE_URL": self.database_url,
            "UNROLL_REDIS_URL": self.redis_url,
            "UNROLL_REDIS_PREFIX": self.prefix,
            "UNROLL_RAY_ADDRESS": self._ray_address(),  # the Ray head starts on first use
            "UNROLL_ARTIFACTS": str(self.artifacts),
            "UNROLL_LEASE_SECONDS": str(LEASE_SECONDS),
            "UNROLL_RETRY_BACKOFF_SECONDS": "0.5",
            "UNROLL_CANCEL_GRACE_SECONDS": "20",
        })
        env.update(extra)
        return env

    def start_worker(self, **env: str) -> subprocess.Popen:
        """An `unroll worker` process; `env` adds settings (UNROLL_...) to the stack's."""
        log_path = self.artifacts.parent / f"worker-{len(self.workers)}.log"
        self.logs.append(log_path)
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker"], cwd=ROOT, env=self.env(**env),
            stdout=log_path.open("w"), stderr=subprocess.STDOUT,
        )
        self.workers.append(proc)
        return proc

    def submit(self, config: dict, priority: int = 0, enqueue: bool = True, project_id: str | None = None) -> str:
        project_id = project_id or self.project_id
        with self.sessions.begin() as session:
            job, _ = repo.create_job(
                session, project_id=project_id, config=config, name=config.get("name"), tags=[],
                priority=priority, max_attempts=config.get("max_attempts", 3),
                max_steps=config.get("train", {}).get("max_steps"), idempotency_key=None, sweep_id=None,
            )
            job_id = job.id
        if enqueue:
            self.enqueue(job_id, priority, project_id)
        return job_id

    def enqueue(self, job_id: str, priority: int = 0, project_id: str | None = None) -> None:
        async def go() -> None:
            import redis.asyncio as aioredis

            client = aioredis.Redis.from_url(self.redis_url)
            await JobQueue(client, self.prefix).enqueue(job_id, priority, project_id or self.project_id)
            await client.aclose()

        asyncio.run(go())

    def job(self, job_id: str) -> Job:
        with self.sessions.begin() as session:
            return repo.get_job(session, job_id)

    def wait(self, job_id: str, states: set[JobState], timeout: float = 120, step: int | None = None) -> Job:
        """Poll until the job is in one of `states` (and past `step`, if given)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job.state in states and (step is None or job.step >= step):
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} still {job.state.value} at step {job.step} after {timeout}s\n{self.worker_logs()}")

    def losses(self, job_id: str) -> dict[int, float | None]:
        with self.sessions.begin() as session:
            series = repo.read_series(session, job_id, names=["train/loss"])
        return {step: value for step, value in series.get("train/loss", [])}

    def worker_logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in self.logs if p.exists())

    def stop(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.engine.dispose()
        client = redis_sync.Redis.from_url(self.redis_url)
        try:
            keys = list(client.scan_iter(match=f"{self.prefix}:*"))
            if keys:
                client.delete(*keys)
        except redis_sync.ConnectionError:
            pass  # a test's private server, already gone
        finally:
            client.close()


@pytest.fixture
def stack(request, database_url: str, redis_url: str, tmp_path: Path, redis_prefix: str) -> Iterator[Stack]:
    s = Stack(database_url, redis_url, lambda: request.getfixturevalue("ray_address"), tmp_path / "artifacts", redis_prefix)
    try:
        yield s
    finally:
        s.stop()

