"""Admission per project: one project's flood of requests does not queue another's behind it.

An API process serves every project on one event loop, which shares its time between the
requests in progress. Without a bound, a client of one project with 32 connections sending
back to back holds 32 requests in progress at once, and every other project's request
shares the loop with all of them (bench/tenancy.py measured the other project's p99 at 10x
its quiet value). So each API process gives every project its own small share of the loop:

- at most ``UNROLL_REQUESTS_IN_PROGRESS_PER_PROJECT`` requests of one project run at once,
  and at most ``UNROLL_MAX_STREAMS_PER_PROJECT`` of its event streams are open;
- the project's next ones wait, in arrival order, costing nothing but a parked task, and
  start as its running ones end. A request of another project never waits behind them: it
  shares the loop with at most that many of the flooding project's requests;
- at most ``UNROLL_MAX_REQUESTS_PER_PROJECT`` of each kind wait, each at most
  ``UNROLL_ADMISSION_WAIT_S``; past either, a 429 with ``Retry-After``, before any routing,
  body read or database work.

This is the per-flow queueing of fair queuing (Demers, Keshav and Shenker, SIGCOMM 1989),
with a project as the flow and the event loop as the link: each flow's backlog waits in
its own queue, so a heavy flow lengthens only its own. A client that retries a 429 at
once, in a loop, costs the loop a whole request each time; a waiting one costs nothing,
which is why past its share a request waits rather than being refused. Well-behaved
clients (the CLI, the dashboard) run a few requests at a time and never wait here.

The project is known from the token cache (service.api.auth): a token not cached yet is
let through to be authenticated (one request per token and cache period), and so are
requests without a token (health, metrics, the dashboard's files); the stream route keeps
its own count as well (service.api.streams).
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
    """One project's requests of one kind in this process: those running, those waiting."""

    running: int = 0
    waiting: deque[asyncio.Future[None]] = field(default_factory=deque)


class ProjectAdmission:
    def __init__(self, app: ASGIApp, *, waiting: int, requests: int, streams: int, wait_s: float) -> None:
        self.app = app
        self.waiting = waiting  # per project and kind (0: no admission at all)
        self.running = {False: requests, True: streams}  # per project: requests, streams
        self.wait_s = wait_s
        self.gates: dict[tuple[str, bool], _Gate] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        project = self._project(scope) if scope["type"] == "http" and self.waiting > 0 else None
        if project is None:
            await self.app(scope, receive, send)
            return
        stream = scope["path"].endswith("/events")
        key = (project, stream)
        gate = self.gates.setdefault(key, _Gate())
        if gate.running >= self.running[stream] and len(gate.waiting) >= self.waiting:
            await self._refuse(stream, gate, waited=False)(scope, receive, send)
            return
        if not await self._enter(key, gate):
            await self._refuse(stream, gate, waited=True)(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self._leave(key, gate)

    async def _enter(self, key: tuple[str, bool], gate: _Gate) -> bool:
        """Run now, or wait for a running one to end (True), at most wait_s (False)."""
        if gate.running < self.running[key[1]] and not gate.waiting:
            gate.running += 1
            return True
        turn = asyncio.get_running_loop().create_future()
        gate.waiting.append(turn)
        try:
            async with asyncio.timeout(self.wait_s):
                await turn  # _leave hands its place over: `running` counts this request already
            return True
        except (TimeoutError, asyncio.CancelledError) as exc:
            if turn.done() and not turn.cancelled():
                self._leave(key, gate)  # the place came with the timeout or cancellation: give it on
            else:
                if turn in gate.waiting:  # a _leave may have passed it by already
                    gate.waiting.remove(turn)
                self._forget(key, gate)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return False

    def _leave(self, key: tuple[str, bool], gate: _Gate) -> None:
        while gate.waiting:
            turn = gate.waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        gate.running -= 1
        self._forget(key, gate)

    def _forget(self, key: tuple[str, bool], gate: _Gate) -> None:
        if not gate.running and not gate.waiting and self.gates.get(key) is gate:
            del self.gates[key]

    def _refuse(self, stream: bool, gate: _Gate, waited: bool):
        why = f"waited {self.wait_s:g} s (UNROLL_ADMISSION_WAIT_S) for one to end" if waited else \
            f"{len(gate.waiting)} more wait already (UNROLL_MAX_REQUESTS_PER_PROJECT={self.waiting})"
        if stream:
            return errors.error_response(
                429, "too_many_streams",
                f"this project already has {gate.running} event streams open on this API server, the most it may"
                f" (UNROLL_MAX_STREAMS_PER_PROJECT={self.running[True]}), and {why}; close one, or retry later",
                headers={"Retry-After": "5"},
            )
        return errors.error_response(
            429, "too_many_requests",
            f"this project already has {gate.running} requests running on this server, the most it may"
            f" (UNROLL_REQUESTS_IN_PROGRESS_PER_PROJECT={self.running[False]}), and {why}: retry shortly",
            headers={"Retry-After": "1"},
        )

    def _project(self, scope: Scope) -> str | None:
        token = _bearer(scope)
        runtime = getattr(scope["app"].state, "runtime", None) if "app" in scope else None
        if token is None or runtime is None:
            return None
        principal = runtime.tokens.get(repo.hash_token(token))
        return principal.project_id if principal is not None else None
