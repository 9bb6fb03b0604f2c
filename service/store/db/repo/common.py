"""Helpers every repository module shares."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.store.db.errors import NotFound


def is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def get_owned(session: Session, model: Any, kind: str, object_id: str, project_id: str | None) -> Any:
    """The `model` row `object_id`; NotFound when unknown or (with project_id) another
    project's: the same answer, so an id of another project reveals nothing."""
    stmt = sa.select(model).where(model.id == object_id)
    if project_id is not None:
        stmt = stmt.where(model.project_id == project_id)
    found = session.execute(stmt).scalar_one_or_none()
    if found is None:
        raise NotFound(kind, object_id)
    return found
