"""What tests and benchmarks that start real things share, each written once: a free port,
whether something listens on one, a throwaway PostgreSQL database, and the command of a
local Ray head of their own. bench/ imports this module too."""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from service.cli.machine import free_port  # the one free-port helper (unroll up uses it too)

__all__ = ["POSTGRES_ADMIN_URL", "create_postgres_database", "drop_postgres_database", "free_port",
           "listening", "postgres_database", "ray_head"]

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


def ray_head(port: int, temp_dir: str, *, cpus: int = 2, dashboard_port: int | None = None) -> tuple[list[str], dict[str, str]]:
    """`ray start --head` in the foreground for a cluster of one's own (`cpus` CPUs, no GPU,
    files under `temp_dir`; the dashboard only with `dashboard_port`, which Ray's job API
    needs), and its environment (token auth, the default for new clusters, made explicit;
    tests/conftest.py and bench/dispatch.py provide the token)."""
    dashboard = ["--include-dashboard=true", f"--dashboard-port={dashboard_port}"] if dashboard_port else ["--include-dashboard=false"]
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
        f"--num-cpus={cpus}", "--num-gpus=0", *dashboard, "--disable-usage-stats",
        "--min-worker-port=0", "--max-worker-port=0", f"--temp-dir={temp_dir}",
    ]
    return command, {**os.environ, "RAY_AUTH_MODE": "token"}
