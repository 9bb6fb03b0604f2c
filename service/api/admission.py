"""Admission per project: one project's flood of requests does not queue another's behind it.

An API process serves every project on one event loop. Without a bound, a client of one
project with 100 connections sending back to back holds 100 requests in the process at
once, and every other project's request waits behind them (bench/tenancy.py measured the
other project's p99 at 10x its quiet value). So each API process lets at most
``UNROLL_MAX_REQUESTS_PER_PROJECT`` requests of one project be in flight; past it, the
request is answered 429 at once, with ``Retry-After``, before any routing, body read or
database work. Well-behaved clients (the CLI, the dashboard) never come near it.

The project is known from the token cache (service.api.auth): a token not cached yet is
let through to be authenticated (one request per token and cache period). Event streams
are not counted here: they are long by design and bounded on their own.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from service.api import errors
from service.store.db import repo


def _bearer(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() or None if scheme.lower() == "bearer" else None
    return None


class ProjectAdmission:
    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.in_flight: dict[str, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        project = self._project(scope) if scope["type"] == "http" and self.limit > 0 else None
        if project is None:
            await self.app(scope, receive, send)
            return
        held = self.in_flight.get(project, 0)
        if held >= self.limit:
            response = errors.error_response(
                429,
                "too_many_requests",
                f"this project already has {held} requests in progress on this server; at most {self.limit}"
                " (UNROLL_MAX_REQUESTS_PER_PROJECT): retry shortly",
                headers={"Retry-After": "1"},
            )
            await response(scope, receive, send)
            return
        self.in_flight[project] = held + 1
        try:
            await self.app(scope, receive, send)
        finally:
            left = self.in_flight[project] - 1
            if left:
                self.in_flight[project] = left
            else:
                del self.in_flight[project]

    def _project(self, scope: Scope) -> str | None:
        if scope["path"].endswith("/events"):
            return None
        token = _bearer(scope)
        runtime = getattr(scope["app"].state, "runtime", None) if "app" in scope else None
        if token is None or runtime is None:
            return None
        principal = runtime.tokens.get(repo.hash_token(token))
        return principal.project_id if principal is not None else None
