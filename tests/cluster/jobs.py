"""Driving the cluster as its users do, and reading what it did.

- ``Replicas``: an HTTP client that rotates between the API replicas, as a load balancer
  would; a request that finds its replica gone (refused, reset) goes to the next one with the
  same `Idempotency-Key`.
- ``Records``: the database's account of jobs: state, attempts, logs, per-step losses, and
  the checks every scenario makes (nothing lost, never two attempts at once, the losses of
  an undisturbed run).
- ``undisturbed_losses``: the trainer alone, in this process, on one thread (as a Ray task
  with 1 CPU runs), cached per config.
"""

from __future__ import annotations

import itertools
import json
import time
from functools import lru_cache

import httpx
from sqlalchemy.orm import sessionmaker

from service.store.db import repo, states
from service.store.db.models import Job, JobState
from service.store.db.session import make_engine

TERMINAL = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}


def tiny_config(steps: int, *, seed: int = 3, **overrides) -> dict:
    """A job of a few seconds on one CPU: a checkpoint every 10 updates, no evaluation."""
    config = {
        "model": {"cell": "lstm", "hidden_size": 16},
        "data": {"kind": "recall", "vocab": 4, "lag": 2, "length": 4000, "batch_size": 4, "valid_length": 64},
        "tbptt": {"k1": 8, "k2": 12},
        "optim": {"lr": 0.01},
        "train": {"max_steps": steps, "eval_every": 0, "checkpoint_every": 10, "seed": seed},
        "resources": {"cpus": 1},
        "max_attempts": 5,
    }
    for key, value in overrides.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return config


@lru_cache(maxsize=16)
def _losses_of(config_json: str) -> tuple[tuple[int, float], ...]:
    import torch

    from trainer.loop import Callback, fit

    class Losses(Callback):
        def __init__(self) -> None:
            self.losses: dict[int, float] = {}

        def on_update(self, step, metrics):
            self.losses[step] = metrics["train/loss"]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rec = Losses()
        fit(json.loads(config_json), [rec])
    finally:
        torch.set_num_threads(threads)
    return tuple(sorted(rec.losses.items()))


def undisturbed_losses(config: dict) -> dict[int, float]:
    """The per-step losses of `config` trained once, undisturbed (on CPU, as the cluster's
    jobs run: its `resources` do not change the trajectory)."""
    plain = {**config, "resources": {"cpus": 1}}
    plain["train"] = {**config["train"], "device": "cpu"}
    return dict(_losses_of(json.dumps(plain, sort_keys=True)))


class Replicas:
    def __init__(self, urls: list[str], token: str, timeout: float = 30):
        self.clients = [httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout) for url in urls]
        self._turn = itertools.cycle(range(len(self.clients)))
        self.failovers = 0  # requests that found a replica gone and went to the next

    def request(self, method: str, path: str, *, attempts: int = 6, **kwargs) -> httpx.Response:
        last: Exception | None = None
        for _ in range(attempts):
            client = self.clients[next(self._turn)]
            try:
                return client.request(method, path, **kwargs)
            except httpx.TransportError as exc:  # the replica is gone or went mid-request
                self.failovers += 1
                last = exc
                time.sleep(0.05)
        raise AssertionError(f"no API replica answered {method} {path}: {last!r}")

    def submit(self, config: dict, key: str | None = None) -> dict:
        headers = {"Idempotency-Key": key} if key else {}
        r = self.request("POST", "/v1/jobs", json=config, headers=headers)
        assert r.status_code in (200, 201), r.text
        return r.json()

    def close(self) -> None:
        for client in self.clients:
            client.close()


class Records:
    def __init__(self, database_url: str):
        self.engine = make_engine(database_url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def job(self, job_id: str) -> Job:
        with self.sessions.begin() as session:
            return repo.get_job(session, job_id)

    def wait(self, job_id: str, states_: set[JobState], *, timeout: float = 120, step: int = 0, logs=lambda: "") -> Job:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.state in states_ and job.step >= step:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} is {job.state.value} at step {job.step} after {timeout}s "
                                     f"(pending: {job.pending_reason})\n{logs()}")
            time.sleep(0.2)

    def attempts(self, job_id: str) -> list:
        with self.sessions.begin() as session:
            return states.list_attempts(session, job_id)

    def log_lines(self, job_id: str) -> list[str]:
        with self.sessions.begin() as session:
            return [entry.line for entry in repo.read_logs(session, job_id)]

    def losses(self, job_id: str) -> dict[int, float | None]:
        with self.sessions.begin() as session:
            series = repo.read_series(session, job_id, names=["train/loss"])
        return dict(series.get("train/loss", []))

    def checkpointed(self, job_id: str) -> bool:
        with self.sessions.begin() as session:
            return bool(repo.list_checkpoints(session, job_id))

    def wait_checkpointed(self, job_id: str, logs=lambda: "", timeout: float = 90) -> None:
        """Until the running job has stored a checkpoint: a later attempt resumes from it."""
        deadline = time.monotonic() + timeout
        while not self.checkpointed(job_id):
            assert time.monotonic() < deadline, f"job {job_id} stored no checkpoint in {timeout}s\n{logs()}"
            time.sleep(0.2)

    def resumed(self, job_id: str) -> bool:
        """The last run of the trainer started from a checkpoint, not from step 0."""
        runs = self.runs(job_id)
        return bool(runs) and ", resuming at step " in runs[-1]

    def runs(self, job_id: str) -> list[str]:
        """The attempt-start lines of the job's log: each run of the trainer writes one."""
        return [line for line in self.log_lines(job_id) if line.startswith("attempt ")]

    def assert_exactly_once(self, job_id: str, config: dict, logs=lambda: "") -> Job:
        """The job succeeded; its attempts never overlapped in time and each ran once; its
        per-step losses are those of an undisturbed run."""
        job = self.wait(job_id, TERMINAL, timeout=150, logs=logs)
        assert job.state == JobState.SUCCEEDED, (job.error, logs())
        attempts = self.attempts(job_id)
        assert [a.number for a in attempts] == list(range(1, job.attempt + 1))
        for earlier, later in itertools.pairwise(attempts):
            assert earlier.ended_at is not None and earlier.ended_at <= later.started_at, (job_id, earlier, later)
        starts = [line.split(" on ", 1)[0] for line in self.runs(job_id)]
        assert len(starts) == len(set(starts)), (job_id, starts)  # no attempt's trainer started twice
        assert self.losses(job_id) == undisturbed_losses(config), job_id
        return job

    def close(self) -> None:
        self.engine.dispose()
