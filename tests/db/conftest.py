"""Real databases for the persistence tests: a temporary SQLite file and a throwaway
PostgreSQL database (created through the `postgres` database, dropped at the end).
Tests parametrised over `db_url` run on both; without a PostgreSQL server the postgresql
cases are skipped, never failed."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.store.db.base import Base
from service.store.db.migrate import upgrade
from service.store.db.session import make_engine
from service.store.settings import get_settings
from tests.processes import POSTGRES_ADMIN_URL, create_postgres_database, drop_postgres_database

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


@pytest.fixture(autouse=True)
def _fresh_settings() -> Iterator[None]:
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


# --- factories ----------------------------------------------------------------------------

CONFIG = {"model": {"cell": "lstm", "hidden_size": 8}, "data": {"kind": "recall"}, "train": {"max_steps": 100}}


def make_project(session: Session, name: str = "demo"):
    from service.store.db import repo

    return repo.get_or_create_project(session, name)


def make_job(session: Session, *, project: str = "demo", commit: bool = True, **fields):
    """A queued job (committed unless told otherwise)."""
    from service.store.db import repo

    project_row = make_project(session, project)
    fields.setdefault("config", CONFIG)
    fields.setdefault("max_steps", 100)
    job, _ = repo.create_job(session, project_id=project_row.id, **fields)
    if commit:
        session.commit()
    return job


def make_running(session: Session, worker: str = "w1", **fields):
    """A job claimed by `worker`: (job, attempt)."""
    from service.store.db import states

    job = make_job(session, **fields)
    attempt = states.claim(session, job.id, worker, 30)
    assert attempt is not None
    session.commit()
    return job, attempt
