"""Uploaded datasets (the bytes live in the artifact store)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.store.db.base import new_id
from service.store.db.models import (
    Dataset,
)
from service.store.db.repo.common import get_owned


def create_dataset(
    session: Session, *, project_id: str, name: str, sha256: str, bytes: int, uri: str
) -> Dataset:
    dataset = Dataset(id=new_id("dataset"), project_id=project_id, name=name, sha256=sha256, bytes=bytes, uri=uri)
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


