"""Dependencies shared by the routers, as ``Annotated`` aliases (a route says
``project: ProjectDep`` and gets the caller's project, or the request ends in a 401)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.api import auth
from service.api.runtime import Runtime
from service.store.settings import Settings

# auto_error=False: a missing header is our 401 in our error shape, not FastAPI's 403.
_bearer = HTTPBearer(auto_error=False, description="A project token (`unroll token create`) or, on /v1/admin, the admin token")


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def get_settings_of_app(runtime: RuntimeDep) -> Settings:
    return runtime.settings


SettingsDep = Annotated[Settings, Depends(get_settings_of_app)]


async def get_sessions(runtime: RuntimeDep) -> async_sessionmaker[AsyncSession]:
    return runtime.sessions


SessionsDep = Annotated[async_sessionmaker[AsyncSession], Depends(get_sessions)]

Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _admin_secret(runtime: Runtime) -> str | None:
    secret = runtime.settings.admin_token
    return secret.get_secret_value() if secret is not None else None


async def caller(request: Request, token: str | None) -> auth.Principal:
    """The project `token` acts for (401 otherwise)."""
    runtime: Runtime = request.app.state.runtime
    return await auth.authenticate(token, runtime.sessions, runtime.tokens, _admin_secret(runtime))


def bearer_token(request: Request) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, read as HTTPBearer reads it
    (for service.api.direct routes, which have no dependencies)."""
    scheme, credentials = get_authorization_scheme_param(request.headers.get("authorization"))
    return credentials if credentials and scheme.lower() == "bearer" else None


async def get_project(request: Request, credentials: Credentials) -> auth.Principal:
    return await caller(request, credentials.credentials if credentials is not None else None)


ProjectDep = Annotated[auth.Principal, Depends(get_project)]


async def get_admin(runtime: RuntimeDep, credentials: Credentials) -> None:
    auth.require_admin(credentials.credentials if credentials is not None else None, _admin_secret(runtime))


AdminDep = Annotated[None, Depends(get_admin)]


async def get_is_admin(runtime: RuntimeDep, credentials: Credentials) -> bool:
    """Whether the caller presents the admin token (for routes open to all that tell the
    admin more)."""
    secret = _admin_secret(runtime)
    return bool(secret and credentials is not None and auth.is_admin(credentials.credentials, secret))


IsAdminDep = Annotated[bool, Depends(get_is_admin)]
