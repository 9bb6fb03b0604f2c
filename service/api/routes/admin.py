"""/v1/admin: what only the admin token (``UNROLL_ADMIN_TOKEN``) may do: create projects and
their tokens, list tokens, revoke one; see projects and set their quotas. ``unroll token
create | list | revoke`` and ``unroll project set | list`` do the same directly against the
database."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Body, Path, Query, status
from redis.exceptions import RedisError

from service.api.deps import AdminDep, RuntimeDep
from service.api.errors import responses
from service.api.schemas import (
    ProjectList,
    ProjectPublic,
    QuotaUpdate,
    TokenCreate,
    TokenCreated,
    TokenList,
    TokenPublic,
)
from service.store import limits, revocations
from service.store.db import repo
from service.store.db.base import utcnow
from service.store.quotas import NOTHING

router = APIRouter(prefix="/v1/admin", tags=["admin"])
log = logging.getLogger("unroll.api")


ProjectName = Annotated[str, Path(min_length=1, max_length=limits.PROJECT_NAME_MAX, pattern=limits.PROJECT_NAME_PATTERN)]


@router.get("/projects", response_model=ProjectList, summary="Every project: its quota and what it holds now", responses=responses(401, 503))
async def list_projects(_admin: AdminDep, runtime: RuntimeDep) -> ProjectList:
    async with runtime.sessions() as session:
        return await session.run_sync(_projects)


def _projects(session, name: str | None = None) -> ProjectList:
    rows = [repo.get_project_by_name(session, name)] if name is not None else repo.list_projects(session)
    usage, queued = repo.project_usage(session), repo.count_queued_by_project(session)
    return ProjectList(projects=[ProjectPublic.of(p, usage.get(p.id, NOTHING), queued.get(p.id, 0)) for p in rows])


@router.get("/projects/{project}", response_model=ProjectPublic, summary="One project: its quota and what it holds now", responses=responses(401, 404, 422, 503))
async def get_project(project: ProjectName, _admin: AdminDep, runtime: RuntimeDep) -> ProjectPublic:
    async with runtime.sessions() as session:
        return (await session.run_sync(_projects, project)).projects[0]


@router.patch(
    "/projects/{project}",
    response_model=ProjectPublic,
    summary="Set a project's quota (the project too, if needed); null puts a bound back to the default",
    responses=responses(401, 422, 503),
)
async def set_quota(project: ProjectName, body: QuotaUpdate, _admin: AdminDep, runtime: RuntimeDep) -> ProjectPublic:
    async with runtime.sessions() as session, session.begin():
        row = await session.run_sync(repo.set_quota, project, body.changes())
        public = (await session.run_sync(_projects, project)).projects[0]
    runtime.tokens.forget_project(row.id)  # this process at once
    try:
        await revocations.announce_project(runtime.redis, runtime.keys, row.id)
    except (RedisError, OSError) as exc:
        log.warning("announcing the new quota of %s failed (replicas apply it within the token cache time): %s", project, exc)
    return public


@router.post(
    "/projects/{project}/tokens",
    status_code=status.HTTP_201_CREATED,
    response_model=TokenCreated,
    summary="Create a token for a project (the project too, if needed)",
    responses=responses(401, 422, 503),
)
async def create_token(
    project: ProjectName,
    _admin: AdminDep,
    runtime: RuntimeDep,
    body: Annotated[TokenCreate | None, Body()] = None,
) -> TokenCreated:
    body = body or TokenCreate()
    expires_at = utcnow() + timedelta(seconds=body.expires_in_s) if body.expires_in_s is not None else None
    async with runtime.sessions() as session, session.begin():
        return await session.run_sync(_create, project, body.name, expires_at)


def _create(session, project_name: str, token_name: str | None, expires_at: datetime | None) -> TokenCreated:
    row = repo.get_or_create_project(session, project_name)
    secret, token = repo.create_token(session, row.id, name=token_name, expires_at=expires_at)
    return TokenCreated(project_id=row.id, project=row.name, token_id=token.id, token=secret, expires_at=expires_at)


@router.get("/tokens", response_model=TokenList, summary="Every token (of one project), newest first; never a secret", responses=responses(401, 422, 503))
async def list_tokens(
    _admin: AdminDep,
    runtime: RuntimeDep,
    project: Annotated[str | None, Query(min_length=1, max_length=200, description="a project's name")] = None,
) -> TokenList:
    async with runtime.sessions() as session:
        rows = await session.run_sync(repo.list_tokens, project)
    return TokenList(tokens=[TokenPublic.of(token, name) for token, name in rows])


@router.post(
    "/tokens/{token_id}/revoke",
    response_model=TokenPublic,
    summary="Revoke a token: refused on its next request, on every API replica (idempotent)",
    responses=responses(401, 404, 422, 503),
)
async def revoke_token(token_id: Annotated[str, Path(min_length=1, max_length=64)], _admin: AdminDep, runtime: RuntimeDep) -> TokenPublic:
    async with runtime.sessions() as session, session.begin():
        token_hash = await session.run_sync(repo.revoke_token, token_id)
        token, project = await session.run_sync(repo.get_token, token_id)  # NotFound: 404
    if token_hash is not None:
        runtime.tokens.forget(token_hash)  # this process at once, whatever Redis does
        try:
            await revocations.announce(runtime.redis, runtime.keys, token_hash)
        except (RedisError, OSError) as exc:
            # Other replicas refuse it when their cache entry expires (UNROLL_TOKEN_CACHE_SECONDS),
            # or at once if their listener lost Redis too (it then forgets every token).
            log.warning("announcing the revocation of %s failed: %s", token_id, exc)
    return TokenPublic.of(token, project)
