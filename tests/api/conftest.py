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
import pytest
from sqlalchemy.orm import Session

from service.api.app import create_app
from service.store.db import repo
from service.store.settings import Settings, get_settings
from tests.api.helpers import ADMIN_TOKEN, LiveServer



# --- databases ------------------------------------------------------------------------------


@pytest.fixture
def db(session: Session) -> Session:
    """A sync session on the wiped database (tests/conftest.py's `session`), to arrange
    state: commit what you add."""
    return session


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
def settings(db_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, data_root: Path, db: Session) -> Settings:
    get_settings.cache_clear()
    return Settings(
        database_url=db_url,
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
