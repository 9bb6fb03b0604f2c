"""service.api.admission's queues, on their own (no server): a project's requests past its
share wait in order while another project's run; a waiting request that is cancelled or
waits too long leaves the queue (the latter with a 429); a place handed over at the moment
of a cancellation is given on; a project's streams wait apart from its requests; and
nothing is held once every request has ended."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from service.api.admission import ProjectAdmission
from service.api.auth import Principal
from service.store.db import repo

TOKENS = {repo.hash_token("a"): Principal("A", "t1"), repo.hash_token("b"): Principal("B", "t2")}
RUNTIME = SimpleNamespace(state=SimpleNamespace(runtime=SimpleNamespace(tokens=TOKENS)))


class App:
    """Records which requests ran; each runs until `release` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.ran: list[str] = []

    async def __call__(self, scope, receive, send) -> None:
        self.ran.append(scope["name"])
        await self.release.wait()


def call(admission: ProjectAdmission, name: str, token: str, path: str = "/v1/jobs", sent: list | None = None) -> asyncio.Task:
    scope = {"type": "http", "path": path, "headers": [(b"authorization", f"Bearer {token}".encode())], "app": RUNTIME, "name": name}

    async def send(message) -> None:
        (sent if sent is not None else []).append(message)

    return asyncio.create_task(admission(scope, None, send))


async def turns(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def queues_in_order_and_forgets() -> None:
    app = App()
    admission = ProjectAdmission(app, waiting=10, requests=1, streams=1, wait_s=30)
    first, second, third = call(admission, "a1", "a"), call(admission, "a2", "a"), call(admission, "a3", "a")
    other = call(admission, "b1", "b")
    stream = call(admission, "a-events", "a", path="/v1/jobs/j/events")
    await turns()
    assert app.ran == ["a1", "b1", "a-events"]  # B is not behind A's queue, nor A's stream behind its requests
    assert admission.gates["A", False].running == 1 and len(admission.gates["A", False].waiting) == 2

    second.cancel()  # a waiting request goes away: it leaves the queue
    await turns()
    assert len(admission.gates["A", False].waiting) == 1

    app.release.set()
    await asyncio.wait_for(asyncio.gather(first, other, third, stream), 5)
    assert app.ran == ["a1", "b1", "a-events", "a3"]
    assert admission.gates == {}  # nothing held once all have ended

    # A place handed over at the very moment its waiter is cancelled is given on, not lost.
    app.release.clear()
    app.ran.clear()
    holder, waiter, after = call(admission, "h", "a"), call(admission, "w", "a"), call(admission, "x", "a")
    await turns()
    app.release.set()
    await asyncio.sleep(0)  # the holder ends and hands its place to the waiter ...
    waiter.cancel()  # ... which is cancelled before it runs
    await asyncio.wait_for(asyncio.gather(holder, after), 5)
    assert app.ran == ["h", "x"] and admission.gates == {}


async def waits_at_most_wait_s() -> None:
    app = App()
    admission = ProjectAdmission(app, waiting=1, requests=1, streams=1, wait_s=0.2)
    holder = call(admission, "h", "a")
    refused_at_once, refused_later = [], []
    waiter = call(admission, "w", "a", sent=refused_later)
    past = call(admission, "p", "a", sent=refused_at_once)  # one more than may wait
    await asyncio.wait_for(past, 5)
    assert refused_at_once[0]["status"] == 429 and not refused_later
    await asyncio.wait_for(waiter, 5)
    body = json.loads(refused_later[1]["body"])
    assert refused_later[0]["status"] == 429 and "UNROLL_ADMISSION_WAIT_S" in body["error"]["message"]
    assert app.ran == ["h"] and len(admission.gates["A", False].waiting) == 0
    app.release.set()
    await holder
    assert admission.gates == {}


def test_a_projects_queue_runs_in_order_beside_others_and_forgets_what_ended():
    asyncio.run(queues_in_order_and_forgets())


def test_a_request_waits_at_most_the_admission_wait_then_429():
    asyncio.run(waits_at_most_wait_s())
