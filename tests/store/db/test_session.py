"""Engines and sessions: URL translation, SQLite pragmas, async use of the repository,
and losing the database surfacing as DatabaseUnavailable."""

from __future__ import annotations

import asyncio

from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.store.db import repo, session as db_session, states
from service.store.db.errors import DatabaseUnavailable
from service.store.db.models import JobState
from service.store.db.session import async_url, make_async_engine, make_engine, session_scope, sync_url

from tests.processes import free_port

from .conftest import make_job


def closed_port() -> int:
    return free_port()  # nothing listens once the socket is closed


@pytest.mark.parametrize(
    ("url", "sync", "async_"),
    [
        ("postgresql://u:p@h:5/db", "postgresql+psycopg://u:p@h:5/db", "postgresql+asyncpg://u:p@h:5/db"),
        ("postgres://h/db", "postgresql+psycopg://h/db", "postgresql+asyncpg://h/db"),
        ("postgresql+asyncpg://h/db", "postgresql+psycopg://h/db", "postgresql+asyncpg://h/db"),
        ("sqlite:///rel/x.db", "sqlite+pysqlite:///rel/x.db", "sqlite+aiosqlite:///rel/x.db"),
        ("sqlite+aiosqlite:////abs/x.db", "sqlite+pysqlite:////abs/x.db", "sqlite+aiosqlite:////abs/x.db"),
    ],
)
def test_url_translation(url: str, sync: str, async_: str) -> None:
    assert sync_url(url).render_as_string(hide_password=False) == sync
    assert async_url(url).render_as_string(hide_password=False) == async_


def test_unsupported_database_is_rejected() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        sync_url("mysql://h/db")


def test_sqlite_engine_creates_its_directory_and_sets_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "unroll.db"
    engine = make_engine(f"sqlite:///{path}")
    assert not path.parent.exists()  # creating an engine touches nothing
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
    assert path.exists()
    engine.dispose()


def test_foreign_keys_are_enforced(session: Session) -> None:
    with pytest.raises(sa.exc.IntegrityError):
        repo.create_job(session, project_id="prj_missing", config={})
    session.rollback()


def test_closed_port_is_database_unavailable() -> None:
    engine = make_engine(f"postgresql://postgres@127.0.0.1:{closed_port()}/x")
    with pytest.raises(DatabaseUnavailable), Session(engine) as s:
        repo.get_job(s, "job_x")


async def test_closed_port_is_database_unavailable_async() -> None:
    engine = make_async_engine(f"postgresql://postgres@127.0.0.1:{closed_port()}/x")
    with pytest.raises(DatabaseUnavailable):
        async with engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
    await engine.dispose()


def test_unopenable_sqlite_is_database_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    engine = make_engine(f"sqlite:///{blocker}/unroll.db")
    with pytest.raises(DatabaseUnavailable), engine.connect():
        pass


def _backend_pid(conn: sa.Connection) -> int:
    return conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()


def _terminate(url: str, pid: int) -> None:
    """What a database restart does to one connection: the server ends it."""
    killer = make_engine(url, poolclass=sa.pool.NullPool)
    with killer.connect() as conn:
        conn.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")
    killer.dispose()


def test_connection_lost_mid_session_is_database_unavailable(postgresql_url: str) -> None:
    engine = make_engine(postgresql_url)
    with engine.connect() as conn:
        _terminate(postgresql_url, _backend_pid(conn))
        with pytest.raises(DatabaseUnavailable):
            conn.execute(sa.text("SELECT 1"))
    engine.dispose()


def test_pooled_connections_the_server_dropped_are_replaced(postgresql_url: str) -> None:
    # A database restart kills every pooled connection: the pool's pre-ping must see the
    # disconnect and reconnect, not surface it as an error on the next checkout.
    engine = make_engine(postgresql_url)
    with engine.connect() as conn:
        pid = _backend_pid(conn)
    _terminate(postgresql_url, pid)
    with engine.connect() as conn:
        assert _backend_pid(conn) != pid
    engine.dispose()


async def test_an_api_pool_without_pre_ping_skips_connections_the_server_dropped(postgresql_url: str) -> None:
    # The API's pool (service/api/runtime.py) has no pre-ping: a pooled asyncpg connection
    # the server ended (a restart) must still not be handed to a request, which would
    # answer 503: it knows it is closed once the event loop has read the server's goodbye.
    engine = make_async_engine(postgresql_url, pool_pre_ping=False, pool_size=1, max_overflow=0)
    async with engine.connect() as conn:
        pid = (await conn.exec_driver_sql("SELECT pg_backend_pid()")).scalar()
    await asyncio.to_thread(_terminate, postgresql_url, pid)
    await asyncio.sleep(0.2)  # the loop runs meanwhile, as a serving API's does
    async with engine.connect() as conn:
        assert (await conn.exec_driver_sql("SELECT pg_backend_pid()")).scalar() != pid
    await engine.dispose()


def test_session_scope_commits_or_rolls_back(db_url: str, session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNROLL_DATABASE_URL", db_url)
    db_session.dispose_engines()
    try:
        with session_scope() as s:
            job = make_job(s, commit=False)
        with pytest.raises(RuntimeError), session_scope() as s:
            states.claim(s, job.id, "w", 30)
            raise RuntimeError("boom")
        with session_scope() as s:
            assert repo.get_job(s, job.id).state is JobState.QUEUED  # the claim was rolled back
        assert db_session.get_engine() is db_session.get_engine()  # one engine per process
    finally:
        db_session.dispose_engines()


async def test_repository_runs_on_async_sessions(db_url: str, session: Session) -> None:
    from sqlalchemy.ext.asyncio import async_sessionmaker

    job = make_job(session)
    engine = make_async_engine(db_url)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    try:
        async with db_session.async_session_scope(sessions) as s:
            attempt = await s.run_sync(states.claim, job.id, "w", 30)
            await s.run_sync(repo.insert_metrics, job.id, attempt, [("loss", 1, 0.5), ("loss", 2, float("nan"))])
        async with db_session.async_session_scope(sessions) as s:
            loaded = await s.run_sync(repo.get_job, job.id)
            series = await s.run_sync(repo.read_series, job.id)
        assert loaded.state is JobState.RUNNING and loaded.attempt == 1
        assert series == {"loss": [(1, 0.5), (2, None)]}
    finally:
        await engine.dispose()
