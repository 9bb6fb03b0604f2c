"""The whole service as a user runs it, for sweep tests: a Ray head (2 CPUs), a throwaway
PostgreSQL database (SQLite without a server), the Redis of tests/conftest.py under a
prefix of this module's own, and `unroll api` + `unroll worker` as subprocesses. One
stack per test module (starting Ray costs seconds); everything is stopped after it."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis as redis_sync
import sqlalchemy as sa

from service.store.db import repo
from service.store.db.session import make_engine
from sqlalchemy.orm import Session
from tests.processes import RayHead, free_port, start_ray_head

ROOT = Path(__file__).resolve().parents[3]
UNROLL = [sys.executable, "-m", "service.cli"]


def _wait(ready, what: str, timeout: float, process: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if (process is not None and process.poll() is not None) or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"{what} did not start\n{tail}")
        time.sleep(0.2)


def _stop(process: subprocess.Popen, group: bool = False, timeout: float = 20) -> None:
    if process.poll() is not None:
        return
    if group:
        os.killpg(process.pid, signal.SIGTERM)
    else:
        process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        if group:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
        process.wait()


@dataclass
class Service:
    url: str
    token: str
    env: dict[str, str]
    engine: sa.Engine
    logs: list[Path]

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        env = {**self.env, "UNROLL_URL": self.url, "UNROLL_TOKEN": self.token}
        return subprocess.run(UNROLL + list(args), env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)

    def tails(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.logs if p.exists())


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, database_url: str, redis_url: str) -> Iterator[Service]:
    """`unroll api` and one `unroll worker` on a Ray head of the module's own."""
    tmp = tmp_path_factory.mktemp("sweep-stack")
    prefix = f"unroll-test-{secrets.token_hex(6)}"
    started: list[tuple[subprocess.Popen, bool]] = []
    logs: list[Path] = []

    def spawn(args: list[str], name: str, env: dict[str, str], group: bool = False) -> subprocess.Popen:
        log = tmp / f"{name}.log"
        logs.append(log)
        proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=group)
        started.append((proc, group))
        return proc

    engine = make_engine(database_url)
    head: RayHead | None = None
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("UNROLL_")}
        env.update({
            "PYTHONPATH": str(ROOT),
            "UNROLL_DATABASE_URL": database_url,
            "UNROLL_REDIS_URL": redis_url,
            "UNROLL_REDIS_PREFIX": prefix,
            "UNROLL_ARTIFACTS": str(tmp / "artifacts"),
            "UNROLL_DATA_ROOTS": str(ROOT / "examples"),
            "UNROLL_LEASE_SECONDS": "10",
            "UNROLL_CANCEL_GRACE_SECONDS": "20",
            "UNROLL_CLIENT_CONFIG": str(tmp / "client.json"),
        })
        api_port = free_port()
        api = spawn(UNROLL + ["api", "--port", str(api_port), "--log-level", "warning"], "api", env)
        url = f"http://127.0.0.1:{api_port}"

        def api_up() -> bool:
            try:
                return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        head = start_ray_head(tmp, cwd=ROOT)  # while the API starts
        env["UNROLL_RAY_ADDRESS"] = head.address
        spawn(UNROLL + ["worker"], "worker", env)
        _wait(api_up, "unroll api", 60, api, logs[0])
        with Session(engine) as session, session.begin():
            project = repo.get_or_create_project(session, f"sweeps-{prefix}")
            token, _ = repo.create_token(session, project.id)
        yield Service(url=url, token=token, env=env, engine=engine, logs=logs)
    finally:
        for proc, group in reversed(started):
            _stop(proc, group)
        if head is not None:
            head.stop()
        engine.dispose()
        client = redis_sync.Redis.from_url(redis_url)
        try:
            keys = list(client.scan_iter(match=f"{prefix}:*"))
            if keys:
                client.delete(*keys)
        finally:
            client.close()
