"""/v1/admin: what only the admin token (``UNROLL_ADMIN_TOKEN``) may do: create projects and
their tokens. ``unroll token create`` does the same directly against the database."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path, status

from service.api.deps import AdminDep, RuntimeDep
from service.api.errors import responses
from service.api.schemas import TokenCreate, TokenCreated
from service.store.db import repo

router = APIRouter(prefix="/v1/admin", tags=["admin"])


@router.post(
    "/projects/{project}/tokens",
    status_code=status.HTTP_201_CREATED,
    response_model=TokenCreated,
    summary="Create a token for a project (the project too, if needed)",
    responses=responses(401, 422, 503),
)
async def create_token(
    project: Annotated[str, Path(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")],
    _admin: AdminDep,
    runtime: RuntimeDep,
    body: Annotated[TokenCreate | None, Body()] = None,
) -> TokenCreated:
    name = body.name if body is not None else None
    async with runtime.sessions() as session, session.begin():
        return await session.run_sync(_create, project, name)


def _create(session, project_name: str, token_name: str | None) -> TokenCreated:
    row = repo.get_or_create_project(session, project_name)
    secret, token = repo.create_token(session, row.id, name=token_name)
    return TokenCreated(project_id=row.id, project=row.name, token_id=token.id, token=secret)
