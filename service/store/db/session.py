"""Engines and sessions: one engine per process, built from settings.

A single ``UNROLL_DATABASE_URL`` serves both roles: the async API gets asyncpg or
aiosqlite, sync workers and migrations get psycopg 3 or pysqlite (``sync_url`` /
``async_url``). Sessions never commit on their own: ``session_scope`` is the one place a
unit of work is committed or rolled back. Losing the database surfaces everywhere as
``DatabaseUnavailable``.

Repository and state functions are written against a sync ``Session``; async code runs
them with ``await async_session.run_sync(repo.get_job, job_id)``.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.engine.interfaces import ExceptionContext
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker

from service.store.db.errors import DatabaseUnavailable
from service.store.settings import get_settings

T = TypeVar("T")

_SYNC_DRIVERS = {"postgresql": "psycopg", "sqlite": "pysqlite"}
_ASYNC_DRIVERS = {"postgresql": "asyncpg", "sqlite": "aiosqlite"}
_BACKEND_ALIASES = {"postgres": "postgresql", "postgresql": "postgresql", "sqlite": "sqlite"}


def _with_driver(url: str | URL, drivers: dict[str, str]) -> URL:
    url = make_url(url) if isinstance(url, str) else url
    backend = _BACKEND_ALIASES.get(url.get_backend_name())
    if backend is None:
        raise ValueError(f"unsupported database {url.get_backend_name()!r}: use postgresql:// or sqlite://")
    return url.set(drivername=f"{backend}+{drivers[backend]}")


def sync_url(url: str | URL) -> URL:
    """`postgresql://…` → `postgresql+psycopg://…`, `sqlite:///…` → `sqlite+pysqlite:///…`
    (whatever driver the URL named)."""
    return _with_driver(url, _SYNC_DRIVERS)


def async_url(url: str | URL) -> URL:
    """`postgresql://…` → `postgresql+asyncpg://…`, `sqlite:///…` → `sqlite+aiosqlite:///…`."""
    return _with_driver(url, _ASYNC_DRIVERS)


def sqlite_path(url: URL) -> Path | None:
    """The file of a SQLite URL, or None for an in-memory database."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    if url.database.startswith("file:"):
        return None
    return Path(url.database)


# --- errors -------------------------------------------------------------------------------

# PostgreSQL SQLSTATEs that mean "the server is not there for us" rather than "bad query".
_PG_UNAVAILABLE_PREFIXES = ("08", "57P", "53")  # connection exception, shutdown, resources
_SQLITE_UNAVAILABLE = ("database is locked", "unable to open database file", "disk i/o error")


def is_unavailable(exc: BaseException | None, ctx: ExceptionContext | None = None) -> bool:
    """Whether `exc` (from any of our drivers) means the database is not there for us."""
    if exc is None:
        return False
    if ctx is not None and ctx.is_disconnect:
        return True
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)) and not isinstance(exc, sqlite3.Error):
        return True
    sqlstate = getattr(exc, "sqlstate", None) or getattr(getattr(exc, "diag", None), "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate.startswith(_PG_UNAVAILABLE_PREFIXES):
        return True
    name = type(exc).__name__
    message = str(exc).lower()
    if isinstance(exc, sqlite3.OperationalError) or name == "OperationalError":
        if any(text in message for text in _SQLITE_UNAVAILABLE):
            return True
        # psycopg reports refused / unreachable / timed-out connects as OperationalError
        # without a SQLSTATE (there is no server to send one).
        if sqlstate is None and "sqlite" not in type(exc).__module__:
            return True
    # asyncpg raises its own classes: a use of a connection the server dropped is an
    # InterfaceError without a SQLSTATE; others wrap an OSError.
    if name == "InterfaceError" and type(exc).__module__.startswith("asyncpg") and "connection is closed" in message:
        return True
    return is_unavailable(exc.__cause__) if exc.__cause__ is not exc else False


def _translate_error(ctx: ExceptionContext) -> None:
    if ctx.is_pre_ping:  # the pool's liveness check: it reconnects by itself on a disconnect
        return
    original = ctx.original_exception
    if is_unavailable(original, ctx):
        raise DatabaseUnavailable(f"database unavailable: {original}".strip()) from (
            ctx.sqlalchemy_exception or original
        )


# --- engines ------------------------------------------------------------------------------


def _sqlite_pragmas(dbapi_connection: Any, _record: Any, busy_timeout_ms: int, foreign_keys: bool) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # WAL: readers never block the writer nor the writer the readers.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; safe with WAL
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
    finally:
        cursor.close()


def _engine_options(url: URL, *, is_async: bool, foreign_keys: bool, overrides: dict[str, Any]) -> dict[str, Any]:
    settings = get_settings()
    options: dict[str, Any] = {"echo": settings.db_echo}
    if url.get_backend_name() == "postgresql":
        options["pool_pre_ping"] = True  # a restarted server costs one retry, not an error
        if "poolclass" not in overrides:
            options |= {"pool_size": settings.db_pool_size, "max_overflow": settings.db_max_overflow}
        timeout = settings.db_connect_timeout
        options["connect_args"] = {"timeout": timeout} if is_async else {"connect_timeout": max(1, round(timeout))}
    else:
        # The busy timeout is set by pragma; the driver's own timeout would stack on top.
        options["connect_args"] = {"timeout": settings.sqlite_busy_timeout_ms / 1000}
    options.update(overrides)
    return options


def _install_hooks(engine: Engine, url: URL, foreign_keys: bool) -> None:
    path = sqlite_path(url)

    def connect(dialect: sa.Dialect, _record: Any, cargs: Any, cparams: Any) -> Any:
        # Every way of failing to connect (refused, timeout, unknown database, unwritable
        # SQLite directory...) is the same thing to a caller: the database is not there.
        try:
            if path is not None:  # creating the engine touches nothing; the first connect does
                path.parent.mkdir(parents=True, exist_ok=True)
            return dialect.connect(*cargs, **cparams)
        except Exception as exc:
            raise DatabaseUnavailable(f"cannot connect to the database: {exc}".strip()) from exc

    sa.event.listen(engine, "do_connect", connect)
    sa.event.listen(engine, "handle_error", _translate_error)
    if url.get_backend_name() == "sqlite":
        busy = get_settings().sqlite_busy_timeout_ms

        def on_connect(dbapi_connection: Any, record: Any) -> None:
            _sqlite_pragmas(dbapi_connection, record, busy, foreign_keys)

        sa.event.listen(engine, "connect", on_connect)


def make_engine(url: str | URL | None = None, *, foreign_keys: bool = True, **overrides: Any) -> Engine:
    """A new sync engine (psycopg 3 / pysqlite) for `url` (default: settings)."""
    url = sync_url(url or get_settings().database_url)
    engine = sa.create_engine(url, **_engine_options(url, is_async=False, foreign_keys=foreign_keys, overrides=overrides))
    _install_hooks(engine, url, foreign_keys)
    return engine


def make_async_engine(url: str | URL | None = None, **overrides: Any) -> AsyncEngine:
    """A new async engine (asyncpg / aiosqlite) for `url` (default: settings)."""
    url = async_url(url or get_settings().database_url)
    engine = create_async_engine(url, **_engine_options(url, is_async=True, foreign_keys=True, overrides=overrides))
    _install_hooks(engine.sync_engine, url, True)
    if url.get_backend_name() == "postgresql":
        sa.event.listen(engine.sync_engine.pool, "checkout", _skip_closed)
    return engine


def _skip_closed(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """A pooled asyncpg connection the server has closed (a restart, pg_terminate_backend)
    knows it already: the event loop read the server's goodbye while it sat idle. Handing it
    out would fail its request, so the pool discards it and connects anew (SQLAlchemy retries
    a checkout that raises DisconnectionError). No round trip, unlike pool_pre_ping."""
    driver = getattr(dbapi_connection, "driver_connection", None)
    if driver is not None and driver.is_closed():
        raise sa.exc.DisconnectionError("the server closed this pooled connection")


# One engine per process, created on first use. A forked child (e.g. a worker process)
# must not share its parent's connections, so the owner pid is remembered.
_engines: dict[str, Any] = {}


def _per_process(key: str, factory: Any) -> Any:
    pid = os.getpid()
    entry = _engines.get(key)
    if entry is not None and entry[0] == pid:
        return entry[1]
    if entry is not None:  # inherited across fork: drop without closing the parent's sockets
        old = entry[1]
        (old.sync_engine if isinstance(old, AsyncEngine) else old).dispose(close=False)
    value = factory()
    _engines[key] = (pid, value)
    return value


def get_engine() -> Engine:
    return _per_process("sync", make_engine)


def get_async_engine() -> AsyncEngine:
    """The process's async engine. It belongs to the event loop that first uses it."""
    return _per_process("async", make_async_engine)


def get_sessionmaker() -> sessionmaker[Session]:
    return _per_process("sync_sessions", lambda: sessionmaker(get_engine(), expire_on_commit=False))


def get_async_sessionmaker() -> async_sessionmaker[AsyncSession]:
    return _per_process(
        "async_sessions", lambda: async_sessionmaker(get_async_engine(), expire_on_commit=False)
    )


def dispose_engines() -> None:
    """Close the process's sync engine and forget both (after settings change, in tests).
    An async engine should be closed with `await dispose_async_engine()` first."""
    for key, (pid, value) in list(_engines.items()):
        if pid == os.getpid() and isinstance(value, Engine):
            value.dispose()
    _engines.clear()


async def dispose_async_engine() -> None:
    entry = _engines.pop("async", None)
    _engines.pop("async_sessions", None)
    if entry is not None and entry[0] == os.getpid():
        await entry[1].dispose()


@contextmanager
def session_scope(sessions: sessionmaker[Session] | None = None) -> Iterator[Session]:
    """One transaction: commit when the block succeeds, roll back when it raises."""
    with (sessions or get_sessionmaker())() as session, session.begin():
        yield session


@asynccontextmanager
async def async_session_scope(sessions: async_sessionmaker[AsyncSession] | None = None) -> AsyncIterator[AsyncSession]:
    async with (sessions or get_async_sessionmaker())() as session, session.begin():
        yield session


@asynccontextmanager
async def autocommit_session(engine: AsyncEngine) -> AsyncIterator[AsyncSession]:
    """A session on an autocommit connection: each statement is its own transaction,
    committed in the same round trip (no BEGIN, no COMMIT). For paths whose write is a
    single statement, like a submission."""
    async with engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        async with AsyncSession(bind=conn, expire_on_commit=False) as session:
            yield session


async def run_autocommit(engine: AsyncEngine, fn: Callable[..., T], *args: Any) -> T:
    """`fn(session, *args)` (sync, like the repo's functions) in an autocommit_session."""
    async with autocommit_session(engine) as session:
        return await session.run_sync(fn, *args)
