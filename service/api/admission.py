"""Admission per project: one project's flood of requests does not queue another's behind it.

An API process serves every project on one event loop, which shares its time between the
requests in progress. Without a bound, a client of one project with 32 connections sending
back to back holds 32 requests in progress at once, and every other project's request
shares the loop with all of them (bench/tenancy.py measured the other project's p99 at 10x
its quiet value). So each API process gives every project its own small share of the loop:

- at most ``UNROLL_REQUESTS_IN_PROGRESS_PER_PROJECT`` requests of one project run at once;
  the project's next ones wait, in arrival order, costing nothing but a parked task, and
  start as its running ones end. A request of another project never waits behind them: it
  shares the loop with at most that many of the flooding project's requests.
- at most ``UNROLL_MAX_REQUESTS_PER_PROJECT`` of one project are admitted (running and
  waiting); past it the request is answered 429 at once, with ``Retry-After``, before any
  routing, body read or database work.

This is the per-flow queueing of fair queuing (Demers, Keshav and Shenker, SIGCOMM 1989),
with a project as the flow and the event loop as the link: each flow's backlog waits in
its own queue, so a heavy flow lengthens only its own. Well-behaved clients (the CLI, the
dashboard) run a few requests at a time and never wait here.

The project is known from the token cache (service.api.auth): a token not cached yet is
let through to be authenticated (one request per token and cache period), and so are
requests without a token (health, metrics, the dashboard's files). Event streams are not
counted here: they are long by design and bounded on their own.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Receive, Scope, Send

from service.api import errors
from service.store.db import repo


def _bearer(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() or None if scheme.lower() == "bearer" else None
    return None


@dataclass
class _Gate:
    """One project's requests in this process: those running, and those waiting to."""

    running: int = 0
    waiting: deque[asyncio.Future[None]] = field(default_factory=deque)

    @property
    def admitted(self) -> int:
        return self.running + len(self.waiting)


class ProjectAdmission:
    def __init__(self, app: ASGIApp, limit: int, in_progress: int) -> None:
        self.app = app
        self.limit = limit  # admitted per project (0: no bound at all)
        self.in_progress = in_progress  # running per project
        self.gates: dict[str, _Gate] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        project = self._project(scope) if scope["type"] == "http" and self.limit > 0 else None
        if project is None:
            await self.app(scope, receive, send)
            return
        gate = self.gates.setdefault(project, _Gate())
        if gate.admitted >= self.limit:
            response = errors.error_response(
                429,
                "too_many_requests",
                f"this project already has {gate.admitted} requests running or waiting on this server; at most"
                f" {self.limit} (UNROLL_MAX_REQUESTS_PER_PROJECT): retry shortly",
                headers={"Retry-After": "1"},
            )
            await response(scope, receive, send)
            return
        await self._enter(project, gate)
        try:
            await self.app(scope, receive, send)
        finally:
            self._leave(project, gate)

    async def _enter(self, project: str, gate: _Gate) -> None:
        if gate.running < self.in_progress and not gate.waiting:
            gate.running += 1
            return
        turn = asyncio.get_running_loop().create_future()
        gate.waiting.append(turn)
        try:
            await turn  # _leave hands its place over: `running` counts this request already
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._leave(project, gate)  # the place came with the cancellation: give it on
            else:
                if turn in gate.waiting:  # a _leave may have passed it by already
                    gate.waiting.remove(turn)
                self._forget(project, gate)
            raise

    def _leave(self, project: str, gate: _Gate) -> None:
        while gate.waiting:
            turn = gate.waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        gate.running -= 1
        self._forget(project, gate)

    def _forget(self, project: str, gate: _Gate) -> None:
        if not gate.admitted and self.gates.get(project) is gate:
            del self.gates[project]

    def _project(self, scope: Scope) -> str | None:
        if scope["path"].endswith("/events"):
            return None
        token = _bearer(scope)
        runtime = getattr(scope["app"].state, "runtime", None) if "app" in scope else None
        if token is None or runtime is None:
            return None
        principal = runtime.tokens.get(repo.hash_token(token))
        return principal.project_id if principal is not None else None
