"""Uploaded datasets (the bytes live in the artifact store): records, the project's
storage in use (its quota), and deletion."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.store.db.base import new_id
from service.store.db.errors import InUse
from service.store.db.models import (
    Dataset,
    Job,
    JobState,
    Project,
)
from service.store.db.repo.common import get_owned, is_postgres


def create_dataset(
    session: Session, *, project_id: str, name: str, sha256: str, bytes: int, uri: str, dataset_id: str | None = None
) -> Dataset:
    """The record of a stored file; `dataset_id`: the id its folder in the store was named by."""
    dataset = Dataset(id=dataset_id or new_id("dataset"), project_id=project_id, name=name, sha256=sha256, bytes=bytes, uri=uri)
    session.add(dataset)
    session.flush()
    return dataset


def get_dataset(session: Session, dataset_id: str, project_id: str | None = None) -> Dataset:
    return get_owned(session, Dataset, "dataset", dataset_id, project_id)


def list_datasets(session: Session, project_id: str, *, limit: int = 100) -> list[Dataset]:
    return list(
        session.execute(
            sa.select(Dataset)
            .where(Dataset.project_id == project_id)
            .order_by(Dataset.created_at.desc(), Dataset.id.desc())
            .limit(limit)
        ).scalars()
    )


def dataset_bytes(session: Session, project_id: str) -> int:
    """The bytes of all the project's datasets: what its storage quota counts."""
    total = session.execute(
        sa.select(sa.func.coalesce(sa.func.sum(Dataset.bytes), 0)).where(Dataset.project_id == project_id)
    ).scalar_one()
    return int(total)  # PostgreSQL sums a BIGINT as a NUMERIC (a Decimal)


def lock_project_storage(session: Session, project_id: str) -> None:
    """Serialise the project's dataset inserts until the transaction ends, so that two
    uploads cannot both pass the quota check. PostgreSQL: a row lock on the project (FOR NO
    KEY UPDATE, which foreign-key checks of concurrent job inserts do not wait for). SQLite
    needs none: the INSERT that follows takes the database's write lock before the sum is
    read (and a SELECT here would start a read snapshot that the INSERT could not upgrade)."""
    if is_postgres(session):
        session.execute(sa.select(Project.id).where(Project.id == project_id).with_for_update(key_share=True))


def jobs_using_dataset(session: Session, project_id: str, dataset_id: str, *, limit: int = 5) -> list[str]:
    """Ids of the project's queued or running jobs whose config names the dataset
    (`data.dataset`), at most `limit`."""
    return list(
        session.execute(
            sa.select(Job.id)
            .where(
                Job.project_id == project_id,
                Job.state.in_((JobState.QUEUED, JobState.RUNNING)),
                Job.config[("data", "dataset")].as_string() == dataset_id,
            )
            .order_by(Job.created_at, Job.id)
            .limit(limit)
        ).scalars()
    )


def delete_dataset(session: Session, dataset_id: str, project_id: str) -> str:
    """Delete the dataset's record; returns the URI of its file, which the caller removes
    after the commit. NotFound for an unknown dataset or another project's; InUse while a
    queued or running job of the project trains on it (a finished job that names it can
    still be retried, and then fails for want of it)."""
    dataset = get_dataset(session, dataset_id, project_id)
    users = jobs_using_dataset(session, project_id, dataset_id)
    if users:
        raise InUse("dataset", dataset_id, users)
    uri = dataset.uri
    session.execute(sa.delete(Dataset).where(Dataset.id == dataset_id).execution_options(synchronize_session=False))
    session.expunge(dataset)
    return uri

