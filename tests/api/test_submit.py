"""The API's submission insert (service.api.submit): on PostgreSQL, concurrent submissions
are group-committed, and the batching changes nothing a request can see."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.store.db import repo
from service.store.db.models import Job, JobState
from service.store.db.session import make_async_engine
from service.api import submit
from service.api.submit import JobInserts



@pytest.fixture
async def inserts(db_url: str, session: Session):
    engine = make_async_engine(db_url)
    yield JobInserts(engine, max_batch=16, parallel=2)
    await engine.dispose()


def values(project_id: str, key: str | None = None) -> dict:
    return repo.new_job_values(project_id=project_id, config={"a": 1}, tags=["t"], max_steps=5, idempotency_key=key)


async def test_concurrent_submissions_each_get_their_row_and_keys_hold(
    inserts: JobInserts, session: Session, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []
    real = submit._insert_many

    async def counted(engine, rows):
        sizes.append(len(rows))
        return await real(engine, rows)

    monkeypatch.setattr(submit, "_insert_many", counted)
    project = repo.get_or_create_project(session, "demo")
    session.commit()
    rows = [values(project.id) for _ in range(60)] + [values(project.id, key=f"k{i % 5}") for i in range(40)]
    results = await asyncio.gather(*(inserts.insert(v) for v in rows))
    if db_url.startswith("postgresql"):  # group-committed: 16 rows a statement at most
        assert sum(sizes) == 100 and max(sizes) == 16 and len(sizes) < 100
    created = [job for job, new in results if new]
    assert len(created) == 60 + 5  # one per key, even when a batch held the same key twice
    by_key: dict[str, set[str]] = {}
    for v, (job, _) in zip(rows, results):
        if v["idempotency_key"]:
            by_key.setdefault(v["idempotency_key"], set()).add(job.id)
    assert all(len(ids) == 1 for ids in by_key.values())  # repeats got the winner's job
    stored = session.execute(sa.select(Job.id, Job.tags, Job.config, Job.state)).all()
    assert {r.id for r in stored} == {job.id for job in created}
    assert all(r.tags == ["t"] and r.config == {"a": 1} and r.state is JobState.QUEUED for r in stored)


async def test_a_row_that_fails_fails_only_its_request(inserts: JobInserts, session: Session, db_url: str) -> None:
    project = repo.get_or_create_project(session, "demo")
    session.commit()
    good = [values(project.id) for _ in range(20)]
    bad = values("prj_does_not_exist")  # a foreign key the database refuses
    results = await asyncio.gather(*(inserts.insert(v) for v in [*good[:10], bad, *good[10:]]), return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    if db_url.startswith("sqlite"):
        assert len(failures) == 1  # no batching there: the one row fails on its own
    else:
        assert len(failures) == 1 and isinstance(failures[0], Exception)
    assert session.execute(sa.text("SELECT count(*) FROM jobs")).scalar() == 20
