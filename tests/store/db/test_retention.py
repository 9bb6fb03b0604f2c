"""The repository side of deletion and retention: the datasets a queued or running job
names (a JSON path on both databases), a dataset's deletion, pruning checkpoints to the
newest N, and the lock that serialises a project's dataset records (the storage quota)."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.store.db import repo, states
from service.store.db.errors import InUse, NotFound
from service.store.db.models import JobState
from service.store.db.session import make_engine

from .conftest import make_job, make_project, make_running


def dataset(session: Session, project_id: str, name: str = "a.txt", size: int = 3):
    return repo.create_dataset(session, project_id=project_id, name=name, sha256="0" * 64, bytes=size, uri=f"file:///x/{name}")


def text_job(session: Session, dataset_id: str, **fields):
    return make_job(session, config={"data": {"kind": "text", "dataset": dataset_id}}, **fields)


def test_a_dataset_is_in_use_only_by_the_projects_queued_and_running_jobs(session: Session) -> None:
    project = make_project(session)
    ds = dataset(session, project.id)
    session.commit()
    queued = text_job(session, ds.id)
    running, _ = make_running(session, config={"data": {"kind": "text", "dataset": ds.id}})
    done = text_job(session, ds.id)
    states.request_cancel(session, done.id)
    text_job(session, "ds_other")  # names another dataset
    text_job(session, ds.id, project="elsewhere")  # another project's job (never this dataset)
    session.commit()
    assert sorted(repo.jobs_using_dataset(session, project.id, ds.id)) == sorted([queued.id, running.id])

    with pytest.raises(InUse) as raised:
        repo.delete_dataset(session, ds.id, project.id)
    assert set(raised.value.users) == {queued.id, running.id}
    session.rollback()
    for job_id in (queued.id, running.id):
        states.request_cancel(session, job_id)
    states.finish(session, running.id, 1, JobState.CANCELLED)
    assert repo.delete_dataset(session, ds.id, project.id) == "file:///x/a.txt"
    session.commit()
    with pytest.raises(NotFound):
        repo.get_dataset(session, ds.id)


def test_a_dataset_of_another_project_is_not_found(session: Session) -> None:
    mine, theirs = make_project(session, "mine"), make_project(session, "theirs")
    ds = dataset(session, theirs.id)
    session.commit()
    with pytest.raises(NotFound):
        repo.delete_dataset(session, ds.id, mine.id)


def test_dataset_bytes_sums_one_project(session: Session) -> None:
    mine, theirs = make_project(session, "mine"), make_project(session, "theirs")
    assert repo.dataset_bytes(session, mine.id) == 0
    dataset(session, mine.id, "a", 10)
    dataset(session, mine.id, "b", 32)
    dataset(session, theirs.id, "c", 1000)
    assert repo.dataset_bytes(session, mine.id) == 42 and type(repo.dataset_bytes(session, mine.id)) is int


def test_pruning_keeps_the_newest_checkpoints(session: Session) -> None:
    job, attempt = make_running(session)
    for step in (10, 20, 30, 40):
        repo.add_checkpoint(session, job.id, attempt, step=step, uri=f"file:///c/{step}", bytes=1, sha256="0" * 64)
    assert repo.prune_checkpoints(session, job.id, 2) == ["file:///c/20", "file:///c/10"]
    assert [c.step for c in repo.list_checkpoints(session, job.id)] == [30, 40]
    assert repo.prune_checkpoints(session, job.id, 2) == []
    assert repo.prune_checkpoints(session, job.id, 0) == ["file:///c/30"]  # the newest stays, whatever is asked
    assert repo.latest_checkpoint(session, job.id).step == 40


def test_recording_a_dataset_waits_for_another_of_the_same_project(session: Session, db_url: str) -> None:
    """Two uploads recorded at once are serialised, so the second counts the first's bytes
    (and is refused if they pass the quota together)."""
    if not db_url.startswith("postgres"):
        pytest.skip("SQLite needs no lock: the INSERT waits for the database's write lock")
    project = make_project(session)
    session.commit()
    engine = make_engine(db_url)

    def record(s: Session, name: str) -> int:
        repo.lock_project_storage(s, project.id)
        dataset(s, project.id, name, 60)
        return repo.dataset_bytes(s, project.id)

    seen: dict[str, int] = {}

    def second() -> None:
        with Session(engine) as s, s.begin():
            seen["second"] = record(s, "b")

    first = Session(engine)
    try:
        with first.begin():
            assert record(first, "a") == 60
            thread = threading.Thread(target=second)
            thread.start()
            deadline = time.monotonic() + 30
            while thread.is_alive() and time.monotonic() < deadline:  # until it waits for our lock (or is done)
                waiting = session.execute(sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )).scalar_one()
                session.rollback()
                if waiting:
                    break
                time.sleep(0.01)
        thread.join(timeout=30)
    finally:
        first.close()
        engine.dispose()
    assert seen["second"] == 120
