"""The fixtures every test package shares: databases, Redis, and the Ray token of the
test session (the rest live in each package's conftest).

- ``db_url`` (session, parametrised sqlite/postgresql): a migrated database of each kind,
  wiped per test through ``session``; ``engine``; ``empty_db_url`` for migration tests;
  ``postgres_databases`` makes more throwaway ones. The store and the API tests share them.

- ``database_url`` (module): a migrated throwaway PostgreSQL database on the local server
  (``UNROLL_TEST_POSTGRES_URL``), dropped after the module; SQLite when no server answers.
- Ray: every cluster the tests start (heads, drivers, Ray Train groups) uses token auth,
  Ray's default, with one token written for the session (pytest_configure, before anything
  imports ray). A fresh machine has no ~/.ray/auth_token, and a head started without a
  token refuses to start.

- ``redis_url`` (session): the Redis at ``UNROLL_REDIS_URL`` or 127.0.0.1:6379 if it answers
  PING, else a private ``redis-server`` started for the session and stopped after it; the
  tests skip, saying why, when neither is possible.
- ``redis_prefix`` / ``redis_client``: a unique key prefix per test and an async client; the
  prefix's keys are deleted after the test, so tests share one server without seeing each
  other. Never FLUSHALL through these: the server may be someone else's.
- ``make_redis``: more async clients on the same server (separate connections), closed after.
- ``private_redis``: a redis-server of the test's own, to FLUSHALL, kill and restart.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis
import redis.asyncio as aioredis
import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.store.db.base import Base
from service.store.db.migrate import upgrade
from service.store.db.session import make_engine
from tests.processes import POSTGRES_ADMIN_URL, create_postgres_database, drop_postgres_database, free_port

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def pytest_configure(config: pytest.Config) -> None:
    if "RAY_AUTH_MODE" in os.environ:  # the caller chose (disabled, or a token of theirs)
        return
    import tempfile

    from service.cli.machine import ray_token_env

    os.environ.update(ray_token_env(Path(tempfile.mkdtemp(prefix="unroll-tests-ray-")) / "auth_token"))


def _answers(url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError, ValueError):
        return False


class RedisServer:
    """A throwaway redis-server on 127.0.0.1, without persistence, in its own directory.
    ``kill()`` is a crash (SIGKILL); ``start()`` brings it back on the same port, empty."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.executable = shutil.which("redis-server")
        if self.executable is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.directory = directory
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.directory), "--daemonize", "no",
        ]
        log = open(self.directory / "redis.log", "ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.directory)
        log.close()
        deadline = time.monotonic() + timeout_s
        while not _answers(self.url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{tail}")
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        """Crash the server (SIGKILL): every key is lost, clients see connection errors."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


def _start_private(directory: Path) -> RedisServer:
    # The free port may be taken between choosing and binding it: try a few.
    error: Exception | None = None
    for _ in range(3):
        try:
            return RedisServer(directory).start()
        except RuntimeError as exc:
            error = exc
            if shutil.which("redis-server") is None:
                break
    pytest.skip(f"no Redis: nothing answers at UNROLL_REDIS_URL or {DEFAULT_REDIS_URL}, and {error}")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    for url in (os.environ.get("UNROLL_REDIS_URL"), DEFAULT_REDIS_URL):
        if url and _answers(url):
            yield url
            return
    server = _start_private(tmp_path_factory.mktemp("redis"))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_prefix() -> str:
    return f"unroll-test-{secrets.token_hex(6)}"


@pytest.fixture
async def make_redis(redis_url: str) -> AsyncIterator[Callable[..., aioredis.Redis]]:
    """A factory of async clients on ``redis_url`` (keyword arguments go to ``from_url``)."""
    clients: list[aioredis.Redis] = []

    def make(**kwargs) -> aioredis.Redis:
        client = aioredis.Redis.from_url(redis_url, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture
async def redis_client(make_redis: Callable[..., aioredis.Redis], redis_prefix: str) -> AsyncIterator[aioredis.Redis]:
    """An async client (bytes responses, redis-py's default). Keys under ``redis_prefix``
    are deleted after the test."""
    client = make_redis()
    yield client
    keys = [key async for key in client.scan_iter(match=f"{redis_prefix}:*", count=1000)]
    if keys:
        await client.delete(*keys)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own (``.url``, ``.kill()``, ``.start()``, ``.stop()``),
    free to be flushed or killed; stopped after the test."""
    server = _start_private(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()


# --- a database for the end-to-end suites ---------------------------------------------------

@pytest.fixture(scope="module")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A migrated throwaway PostgreSQL database (production's), or SQLite without a server."""
    try:
        url = create_postgres_database()
    except psycopg.Error:
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'unroll.db'}"
        upgrade(url)
        yield url
        return
    upgrade(url)
    yield url
    drop_postgres_database(url)


# --- databases for the store and API tests ----------------------------------------------------
# A temporary SQLite file and a throwaway PostgreSQL database (created through the server's
# `postgres` database, dropped at the end). Tests parametrised over `db_url` run on both;
# without a PostgreSQL server the postgresql cases are skipped, never failed.


@pytest.fixture(scope="session")
def postgres_server() -> str:
    try:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3):
            pass
    except psycopg.Error as exc:
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}: {exc}".splitlines()[0])
    return POSTGRES_ADMIN_URL


class PostgresDatabases:
    """Creates throwaway databases and drops every one it created."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.urls: list[str] = []

    def create(self) -> str:
        url = create_postgres_database(admin_url=self.admin_url)
        self.urls.append(url)
        return url

    def drop_all(self) -> None:
        for url in self.urls:
            drop_postgres_database(url, self.admin_url)


@pytest.fixture(scope="session")
def postgres_databases(postgres_server: str) -> Iterator[PostgresDatabases]:
    databases = PostgresDatabases(postgres_server)
    yield databases
    databases.drop_all()


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'unroll.db'}"
    upgrade(url)
    return url


@pytest.fixture(scope="session")
def postgresql_url(postgres_databases: PostgresDatabases) -> str:
    url = postgres_databases.create()
    upgrade(url)
    return url


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """A migrated database of each kind, shared by the session (wiped per test)."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def empty_db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A database of each kind with no schema, for migration tests (one per test module)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('empty') / 'empty.db'}"
    return request.getfixturevalue("postgres_databases").create()


@pytest.fixture(scope="session")
def engine(db_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def wipe(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
            conn.execute(sa.text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
        else:
            for table in reversed(Base.metadata.sorted_tables):
                conn.execute(table.delete())


@pytest.fixture
def session(engine: sa.Engine) -> Iterator[Session]:
    """A session on a wiped database. Tests commit as they need."""
    wipe(engine)
    with Session(engine, expire_on_commit=False) as session:
        yield session
