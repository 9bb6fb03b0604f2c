"""Projects and their API tokens (stored hashed)."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.store.db.base import new_id, utcnow
from service.store.db.errors import NotFound
from service.store.db.models import (
    ApiToken,
    Project,
)
from service.store.quotas import Quota


def get_project(session: Session, project_id: str) -> Project:
    project = session.get(Project, project_id)
    if project is None:
        raise NotFound("project", project_id)
    return project


def get_or_create_project(session: Session, name: str) -> Project:
    """The project called `name`, created if needed (safe when two callers race)."""
    found = session.execute(sa.select(Project).where(Project.name == name)).scalar_one_or_none()
    if found is not None:
        return found
    try:
        with session.begin_nested():
            project = Project(id=new_id("project"), name=name)
            session.add(project)
        return project
    except IntegrityError:
        return session.execute(sa.select(Project).where(Project.name == name)).scalar_one()


def quota_of(project: Project) -> Quota:
    return Quota(**{name: getattr(project, name) for name in Quota.names()})


def set_quota(session: Session, name: str, changes: Mapping[str, Any]) -> Project:
    """Set some bounds of the project's quota (None: back to the default); the project is
    created if needed, so an admin can bound a project before it has a token."""
    unknown = set(changes) - set(Quota.names())
    if unknown:
        raise ValueError(f"no quota named {', '.join(sorted(unknown))}")
    project = get_or_create_project(session, name)
    for field, value in changes.items():
        setattr(project, field, value)
    session.flush()
    return project


def project_quotas(session: Session) -> dict[str, tuple[str, Quota]]:
    """project id -> (name, quota) of every project with a quota set (the dispatcher's
    view; a project absent has the defaults)."""
    bounded = sa.or_(*(getattr(Project, name).is_not(None) for name in Quota.names()))
    return {p.id: (p.name, quota_of(p)) for p in session.execute(sa.select(Project).where(bounded)).scalars()}


def list_projects(session: Session, *, limit: int = 10_000) -> list[Project]:
    return list(session.execute(sa.select(Project).order_by(Project.name).limit(limit)).scalars())


def get_project_by_name(session: Session, name: str) -> Project:
    project = session.execute(sa.select(Project).where(Project.name == name)).scalar_one_or_none()
    if project is None:
        raise NotFound("project", name)
    return project


TOKEN_PREFIX = "unroll_"


def hash_token(token: str) -> str:
    """Tokens are stored as sha256 hex: they are long random secrets, so a fast hash is
    enough (no salt or slow KDF needed), and lookup is by equality on the hash."""
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(
    session: Session, project_id: str, *, name: str | None = None, expires_at: datetime | None = None
) -> tuple[str, ApiToken]:
    """A new token for the project: (the secret, shown once; its row)."""
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(
        id=new_id("token"), project_id=project_id, token_hash=hash_token(secret), name=name, expires_at=expires_at
    )
    session.add(row)
    session.flush()
    return secret, row


# Write `last_used_at` at most this often: a token is used on every request.
_TOKEN_TOUCH_INTERVAL = timedelta(seconds=60)


def authenticate(session: Session, token: str, *, now: datetime | None = None) -> ApiToken | None:
    """The live (not revoked, not expired) token row for a secret, or None."""
    now = now or utcnow()
    row = session.execute(
        sa.select(ApiToken).where(
            ApiToken.token_hash == hash_token(token),
            ApiToken.revoked_at.is_(None),
            sa.or_(ApiToken.expires_at.is_(None), ApiToken.expires_at > now),
        )
    ).scalar_one_or_none()
    if row is not None and (row.last_used_at is None or now - row.last_used_at >= _TOKEN_TOUCH_INTERVAL):
        row.last_used_at = now
    return row


def revoke_token(session: Session, token_id: str, *, now: datetime | None = None) -> str | None:
    """Revoke a live token; its hash (what API caches key it by, to forget it), or None if
    there is no such live token."""
    return session.execute(
        sa.update(ApiToken)
        .where(ApiToken.id == token_id, ApiToken.revoked_at.is_(None))
        .values(revoked_at=now or utcnow())
        .returning(ApiToken.token_hash)
    ).scalar_one_or_none()


def _tokens() -> sa.Select:
    return sa.select(ApiToken, Project.name).join(Project, Project.id == ApiToken.project_id)


def get_token(session: Session, token_id: str) -> tuple[ApiToken, str]:
    """(token, project name); NotFound if there is no such token."""
    row = session.execute(_tokens().where(ApiToken.id == token_id)).first()
    if row is None:
        raise NotFound("token", token_id)
    return row[0], row[1]


def list_tokens(session: Session, project: str | None = None, *, limit: int = 1000) -> list[tuple[ApiToken, str]]:
    """(token, project name) of every token (of one project, by name), newest first; the
    secrets are not stored, so none is shown."""
    stmt = _tokens()
    if project is not None:
        stmt = stmt.where(Project.name == project)
    rows = session.execute(stmt.order_by(ApiToken.created_at.desc(), ApiToken.id.desc()).limit(limit)).all()
    return [(token, name) for token, name in rows]
