"""The persistence tests' factories (the databases themselves, `db_url`, `session` and
friends, are tests/conftest.py's: the API tests use the same ones)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session

from service.store.settings import get_settings

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
