"""What tests and benchmarks that start real things share, each written once: a free port,
whether something listens on one, a throwaway PostgreSQL database, and a local Ray head of
their own (its command, and a started one). bench/ imports this module too."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from service.cli.machine import free_port  # the one free-port helper (unroll up uses it too)

__all__ = ["POSTGRES_ADMIN_URL", "RayHead", "create_postgres_database", "drop_postgres_database", "free_port",
           "listening", "postgres_database", "ray_head", "start_ray_head"]

# The server's maintenance database, where throwaway databases are created and dropped.
POSTGRES_ADMIN_URL = os.environ.get("UNROLL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def create_postgres_database(prefix: str = "unroll_test", admin_url: str = POSTGRES_ADMIN_URL) -> str:
    """A new, empty database on the server; its URL. Raises psycopg.Error when the server
    does not answer (within 3 s), so callers can fall back to SQLite or skip."""
    import psycopg
    import sqlalchemy as sa

    name = f"{prefix}_{secrets.token_hex(5)}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_postgres_database(url: str, admin_url: str = POSTGRES_ADMIN_URL) -> None:
    """Drop a database made by create_postgres_database, closing its connections."""
    import psycopg
    import sqlalchemy as sa

    name = sa.make_url(url).database
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def postgres_database(prefix: str = "unroll_test", admin_url: str = POSTGRES_ADMIN_URL) -> Iterator[str]:
    """create_postgres_database, dropped on exit."""
    url = create_postgres_database(prefix, admin_url)
    try:
        yield url
    finally:
        drop_postgres_database(url, admin_url)


def ray_head(port: int, temp_dir: str, *, cpus: int = 2, gpus: int = 0,
             dashboard_port: int | None = None) -> tuple[list[str], dict[str, str]]:
    """`ray start --head` in the foreground for a cluster of one's own (`cpus` CPUs, `gpus`
    GPUs as a resource Ray schedules against, files under `temp_dir`; the dashboard only
    with `dashboard_port`, which Ray's job API needs), and its environment (token auth, the default for new clusters, made explicit;
    tests/conftest.py and bench/dispatch.py provide the token)."""
    dashboard = ["--include-dashboard=true", f"--dashboard-port={dashboard_port}"] if dashboard_port else ["--include-dashboard=false"]
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
        f"--num-cpus={cpus}", f"--num-gpus={gpus}", *dashboard, "--disable-usage-stats",
        "--min-worker-port=0", "--max-worker-port=0", f"--temp-dir={temp_dir}",
    ]
    return command, {**os.environ, "RAY_AUTH_MODE": "token"}


@dataclass
class RayHead:
    """A started head: `ray start --head --block` in a process group of its own."""

    process: subprocess.Popen
    port: int
    temp_dir: str
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout: float = 5) -> None:
        """SIGTERM to the group, SIGKILL after `timeout` (a head takes half a minute to stop
        politely, and nothing of a test's head is kept); its temp dir removed."""
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_ray_head(log_dir: Path, *, cpus: int = 2, gpus: int = 0, dashboard_port: int | None = None,
                   tries: int = 3, timeout: float = 90, cwd: Path | None = None) -> RayHead:
    """A Ray head on a free port, listening when this returns. The port can be taken by
    another process (another Ray's workers bind ephemeral ports) between `free_port` and the
    head's GCS binding it; the head then exits, and it starts again on another port, up to
    `tries` times. Each try's output is `log_dir/ray-head-N.log`."""
    for attempt in range(tries):
        port = free_port()
        temp_dir = f"/tmp/ray-unroll-{secrets.token_hex(3)}"  # short: Ray's socket paths are bounded
        command, env = ray_head(port, temp_dir, cpus=cpus, gpus=gpus, dashboard_port=dashboard_port)
        log = log_dir / f"ray-head-{attempt}.log"
        with log.open("w") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                       cwd=cwd, env=env)
        head = RayHead(process, port, temp_dir, log)
        deadline = time.monotonic() + timeout
        while process.poll() is None and not listening(port):
            if time.monotonic() > deadline:
                head.stop()
                raise RuntimeError(f"the Ray head did not listen on {port} in {timeout}s; see {log}")
            time.sleep(0.2)
        if process.poll() is None:
            return head
        head.stop()
    raise RuntimeError(f"the Ray head exited before listening, {tries} times; see {log_dir}")
