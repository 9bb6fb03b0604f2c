"""service.api.admission's queue of one project, on its own (no server): a waiting request
that is cancelled leaves the queue, a place handed over at the moment of a cancellation
is given on, and the gates are empty once every request has ended."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from service.api.admission import ProjectAdmission
from service.api.auth import Principal
from service.store.db import repo


def _scope(token: str, tokens: dict) -> dict:
    app = SimpleNamespace(state=SimpleNamespace(runtime=SimpleNamespace(tokens=tokens)))
    return {"type": "http", "path": "/v1/jobs", "headers": [(b"authorization", f"Bearer {token}".encode())], "app": app}


async def _run() -> None:
    release = asyncio.Event()
    ran: list[str] = []

    async def app(scope, receive, send):
        ran.append(scope["name"])
        await release.wait()

    tokens = {repo.hash_token("a"): Principal("A", "t1"), repo.hash_token("b"): Principal("B", "t2")}
    admission = ProjectAdmission(app, limit=10, in_progress=1)

    def call(name: str, token: str) -> asyncio.Task:
        return asyncio.create_task(admission(_scope(token, tokens) | {"name": name}, None, None))

    first, second, third = call("a1", "a"), call("a2", "a"), call("a3", "a")
    other = call("b1", "b")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert ran == ["a1", "b1"]  # B is not behind A's queue
    assert admission.gates["A"].running == 1 and len(admission.gates["A"].waiting) == 2

    second.cancel()  # a waiting request goes away: it leaves the queue
    await asyncio.sleep(0)
    assert len(admission.gates["A"].waiting) == 1

    release.set()
    await asyncio.gather(first, other)
    third_ran = await asyncio.wait_for(third, 5)
    assert third_ran is None and ran == ["a1", "b1", "a3"]
    assert admission.gates == {}  # nothing held once all have ended

    # A place handed over at the very moment its waiter is cancelled is given on, not lost.
    release.clear()
    ran.clear()
    holder, waiter, after = call("h", "a"), call("w", "a"), call("x", "a")
    await asyncio.sleep(0)
    release.set()
    await asyncio.sleep(0)  # the holder ends and hands its place to the waiter ...
    waiter.cancel()  # ... which is cancelled before it runs
    await asyncio.wait_for(asyncio.gather(holder, after), 5)
    assert ran == ["h", "x"] and admission.gates == {}


def test_the_queue_of_a_project_hands_places_on_and_forgets_what_ended():
    asyncio.run(_run())
