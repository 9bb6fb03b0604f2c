"""Live event streams cannot be turned against the service: a project holds at most
UNROLL_MAX_STREAMS_PER_PROJECT of them per API process, many open streams leave readiness
and submission alone (the streams have Redis connections of their own), and every stream
ends: with its job, after a bounded time when the job never starts, and even when the
job's final event was lost."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx
import pytest

from service.store.db import repo, states
from service.store.db.models import JobState
from service.store.keys import Keys
from tests.api.conftest import live_server  # noqa: F401
from tests.api.helpers import JOB, auth

pytestmark = pytest.mark.redis

PROJECTS = 8  # x 20 streams each: more than a default redis-py pool (100) holds


@pytest.fixture
def settings(settings):  # the API tests' settings, with short stream bounds
    return settings.model_copy(update={"stream_max_seconds": 30.0, "stream_keepalive_seconds": 0.5, "admission_wait_s": 1.0})


async def first_event(lines) -> dict:
    """The next event of an open stream's lines (its data, with `event` and `event_id`).
    Keep the line iterator: an abandoned one closes its response when collected."""
    name, data, event_id = None, [], None
    async for line in lines:
        if line.startswith(("event: ", "data: ", "id: ")):
            field, _, value = line.partition(": ")
            if field == "event":
                name = value
            elif field == "id":
                event_id = value
            else:
                data.append(value)
        elif line == "" and data:
            return {"event": name, "event_id": event_id, **json.loads("\n".join(data))}
    raise EOFError


def events_of(body: str) -> list[dict]:
    found = []
    for block in body.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if "data" in fields:
            found.append({"event": fields.get("event"), "event_id": fields.get("id"), **json.loads(fields["data"])})
    return found


async def test_streams_are_bounded_per_project_and_never_starve_readiness_or_submission(
    live_server, make_token, settings, redis_client  # noqa: F811
):
    await redis_client.set(Keys(settings.redis_prefix).dispatcher_heartbeat("d1"), json.dumps({"ray": "ok"}), ex=60)
    tokens = [make_token(f"streamer-{i}") for i in range(PROJECTS)]
    limit = settings.max_streams_per_project
    limits = httpx.Limits(max_connections=PROJECTS * limit + 50, max_keepalive_connections=20)
    async with httpx.AsyncClient(base_url=live_server.url, timeout=30, limits=limits) as http, contextlib.AsyncExitStack() as held:
        jobs = [(await http.post("/v1/jobs", json=JOB, headers=auth(token))).json()["id"] for token in tokens]

        async def hold(token: str, job_id: str) -> tuple[httpx.Response, object]:
            response = await held.enter_async_context(http.stream("GET", f"/v1/jobs/{job_id}/events", headers=auth(token)))
            assert response.status_code == 200, await response.aread()
            lines = response.aiter_lines()
            assert (await asyncio.wait_for(first_event(lines), 30))["snapshot"] is True
            return response, lines

        opened = await asyncio.gather(*(hold(token, job_id) for token, job_id in zip(tokens, jobs) for _ in range(limit)))
        assert len(opened) == PROJECTS * limit

        # with all of them open, the API still answers its probes and takes jobs
        ready = await http.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"database": "ok", "redis": "ok", "ray": "ok"}
        submitted = await http.post("/v1/jobs", json=JOB, headers=auth(tokens[0]))
        assert submitted.status_code == 201, submitted.text

        # one more of a full project's waits for a slot, then is refused, naming the bound;
        # another project's is not
        refused = await http.get(f"/v1/jobs/{jobs[0]}/events", headers=auth(tokens[0]), timeout=10)
        assert refused.status_code == 429 and refused.headers["retry-after"]
        error = refused.json()["error"]
        assert error["code"] == "too_many_streams"
        assert f"UNROLL_MAX_STREAMS_PER_PROJECT={limit}" in error["message"]
        newcomer = make_token("newcomer")
        other = (await http.post("/v1/jobs", json=JOB, headers=auth(newcomer))).json()["id"]
        async with http.stream("GET", f"/v1/jobs/{other}/events", headers=auth(newcomer)) as response:
            assert response.status_code == 200
            assert (await asyncio.wait_for(first_event(response.aiter_lines()), 10))["state"] == "queued"

        # a client that goes away gives its slot back at once (not at its next keep-alive)
        await opened[0][0].aclose()
        deadline = time.monotonic() + 10
        while True:
            async with http.stream("GET", f"/v1/jobs/{jobs[0]}/events", headers=auth(tokens[0])) as response:
                if response.status_code == 200:
                    break
                assert response.status_code == 429
            assert time.monotonic() < deadline, "the slot of a closed stream was not given back"
            await asyncio.sleep(0.1)


async def test_a_stream_of_a_job_cancelled_while_queued_ends(live_server, make_token):  # noqa: F811
    token = make_token()
    async with httpx.AsyncClient(base_url=live_server.url, headers=auth(token), timeout=10) as http:
        job_id = (await http.post("/v1/jobs", json=JOB)).json()["id"]
        async with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            lines = response.aiter_lines()
            assert (await asyncio.wait_for(first_event(lines), 10))["state"] == "queued"
            assert (await http.post(f"/v1/jobs/{job_id}/cancel")).json()["state"] == "cancelled"
            rest = [await asyncio.wait_for(first_event(lines), 10)]
            with pytest.raises(EOFError):  # the body completes
                await asyncio.wait_for(first_event(lines), 10)
        assert [(e["event"], e["state"], e["transition"]) for e in rest] == [("state", "cancelled", "cancel")]
        # opened now, it says so and ends at once
        async with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            (only,) = events_of((await asyncio.wait_for(response.aread(), 10)).decode())
        assert only["snapshot"] is True and only["state"] == "cancelled"


async def test_a_stream_of_a_job_that_never_starts_ends_after_its_max_duration(live_server, make_token, settings):  # noqa: F811
    settings.stream_max_seconds = 1.0  # read when a stream opens
    token = make_token()
    async with httpx.AsyncClient(base_url=live_server.url, headers=auth(token), timeout=10) as http:
        job_id = (await http.post("/v1/jobs", json=JOB)).json()["id"]
        for last_event_id in (None, "0-0"):  # fresh, then reconnected as told
            headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
            async with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
                body = (await asyncio.wait_for(response.aread(), 10)).decode()
            seen = events_of(body)
            assert seen[-1]["event"] == "end" and seen[-1]["reason"] == "max_duration" and seen[-1]["event_id"] == "0-0"
            assert [e["event"] for e in seen] == (["state", "end"] if last_event_id is None else ["end"])
            assert body.startswith("retry: ")  # and when to reconnect


async def test_a_stream_ends_with_its_job_even_when_the_final_event_was_lost(live_server, make_token, db):  # noqa: F811
    token = make_token()
    async with httpx.AsyncClient(base_url=live_server.url, headers=auth(token), timeout=10) as http:
        job_id = (await http.post("/v1/jobs", json=JOB)).json()["id"]
        async with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            lines = response.aiter_lines()
            assert (await asyncio.wait_for(first_event(lines), 10))["state"] == "queued"
            # a writer that committed and died before publishing (a session without publisher)
            assert states.claim(db, job_id, "w1", 30) == 1
            assert states.finish(db, job_id, 1, JobState.FAILED, "lost with its event")
            db.commit()
            rest = [await asyncio.wait_for(first_event(lines), 10)]
            with pytest.raises(EOFError):
                await asyncio.wait_for(first_event(lines), 10)
        assert [(e["event"], e["state"], e.get("snapshot")) for e in rest] == [("state", "failed", True)]
        assert rest[0]["error"] == "lost with its event"


async def test_another_projects_job_and_forged_ids_are_refused(live_server, make_token, db):  # noqa: F811
    mine, theirs = make_token("mine"), make_token("theirs")
    async with httpx.AsyncClient(base_url=live_server.url, timeout=10) as http:
        job_id = (await http.post("/v1/jobs", json=JOB, headers=auth(mine))).json()["id"]
        assert (await http.get(f"/v1/jobs/{job_id}/events", headers=auth(theirs))).status_code == 404
        assert (await http.get("/v1/jobs/job_unknown/events", headers=auth(mine))).status_code == 404
        assert (await http.get(f"/v1/jobs/{job_id}/events")).status_code == 401
        for forged in ("x" * 65, "1-2-3", "-1-0", f"{2**64}-0", "unroll:*"):
            r = await http.get(f"/v1/jobs/{job_id}/events", headers={**auth(mine), "Last-Event-ID": forged})
            assert r.status_code == 422, (forged, r.text)
        assert repo.get_job(db, job_id).state is JobState.QUEUED
        async with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=auth(mine)) as response:
            assert response.status_code == 200
