"""The API under test, on real things: a migrated SQLite file and a throwaway PostgreSQL
database (each test runs on both; PostgreSQL is skipped, saying why, when unreachable),
the Redis of tests/conftest.py under a key prefix of the test's own, and an artifact store
and data root in the test's temporary directory.

- ``app`` / ``client``: the app with its lifespan running, and an httpx.AsyncClient over
  ASGI (no sockets) for most tests.
- ``live_server``: the same app served by uvicorn on a free port in a thread, for what
  needs real HTTP (Server-Sent Events, the fuzz run).
- ``make_token(project)``: a token of a project, created directly in the database.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.api.app import create_app
from service.store.db import repo
from service.store.db.base import Base
from service.store.db.migrate import upgrade
from service.store.db.session import make_engine
from service.store.settings import Settings, get_settings
from tests.api.helpers import ADMIN_TOKEN, LiveServer
from tests.processes import POSTGRES_ADMIN_URL, create_postgres_database, drop_postgres_database



# --- databases ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sqlite_api_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('api-sqlite') / 'unroll.db'}"
    upgrade(url)
    return url


@pytest.fixture(scope="session")
def postgresql_api_url() -> Iterator[str]:
    try:
        url = create_postgres_database("unroll_api_test")
    except psycopg.Error as exc:
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}: {exc}".splitlines()[0])
    upgrade(url)
    yield url
    drop_postgres_database(url)


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def api_db_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue(f"{request.param}_api_url")


@pytest.fixture(scope="session")
def sync_engine(api_db_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(api_db_url)
    yield engine
    engine.dispose()


def wipe(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text(f"TRUNCATE {', '.join(t.name for t in Base.metadata.sorted_tables)} RESTART IDENTITY CASCADE"))
        else:
            for table in reversed(Base.metadata.sorted_tables):
                conn.execute(table.delete())


@pytest.fixture
def db(sync_engine: sa.Engine) -> Iterator[Session]:
    """A sync session on the wiped database, to arrange state (commit what you add)."""
    wipe(sync_engine)
    with Session(sync_engine, expire_on_commit=False) as session:
        yield session


@pytest.fixture
def make_token(db: Session) -> Callable[..., str]:
    def make(project: str = "demo") -> str:
        row = repo.get_or_create_project(db, project)
        secret, _ = repo.create_token(db, row.id)
        db.commit()
        return secret

    return make


# --- the app ----------------------------------------------------------------------------------


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    return root


@pytest.fixture
def settings(api_db_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, data_root: Path, db: Session) -> Settings:
    get_settings.cache_clear()
    return Settings(
        database_url=api_db_url,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        artifacts=str(tmp_path / "artifacts"),
        data_roots=[data_root],
        admin_token=ADMIN_TOKEN,
        max_body_bytes=64 * 1024,
        max_upload_bytes=256 * 1024,
        token_cache_seconds=30,
    )


@pytest.fixture
async def app(settings: Settings, redis_client) -> AsyncIterator:
    # redis_client: its teardown deletes this test's keys.
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def client(app) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://unroll.test", timeout=30) as client:
        yield client


# --- a real server ----------------------------------------------------------------------------


@pytest.fixture
def live_server(settings: Settings, redis_client) -> Iterator[LiveServer]:
    with LiveServer(create_app(settings)) as server:
        yield server
