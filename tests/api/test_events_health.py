"""Live events over real HTTP (SSE), and the routes without a token: liveness, readiness,
Prometheus metrics, OpenAPI; and 503s when a dependency is down."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from service.api.app import create_app
from service.store import events
from service.store.db import states
from service.store.keys import Keys
from service.store.settings import Settings
from tests.api.helpers import ADMIN_TOKEN, JOB, auth

pytestmark = pytest.mark.redis


async def _next_event(lines) -> dict:
    """The next event of an SSE line iterator: its data, with `event` (its name) and
    `event_id` (its `id:`)."""
    name, data, event_id = "message", [], None
    async for line in lines:
        if line.startswith(":"):
            continue
        if line == "":
            if data:
                return {"event": name, "event_id": event_id, **json.loads("\n".join(data))}
            continue
        field, _, value = line.partition(": ")
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
        elif field == "id":
            event_id = value
    raise EOFError


async def _append(redis_client, settings, job_id: str, *batch: dict) -> list[str]:
    """What a worker's commit publishes (service.store.db.outbox → events.append)."""
    return await events.append(redis_client, Keys(settings.redis_prefix), [(job_id, event) for event in batch])


async def test_late_subscriber_gets_state_then_live_events(live_server, make_token, settings, redis_client, db):
    token = make_token()
    async with httpx.AsyncClient(base_url=live_server.url, headers=auth(token), timeout=10) as http:
        job_id = (await http.post("/v1/jobs", json=JOB)).json()["id"]
        # the job moved on before anyone watched
        states.claim(db, job_id, "w1", 30)
        db.commit()
        async with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.aiter_lines()
            first = await asyncio.wait_for(_next_event(lines), 10)
            assert first["event"] == "state" and first["snapshot"] is True
            assert first["state"] == "running" and first["attempt"] == 1 and first["worker"] == "w1"

            (progress_id,) = await _append(redis_client, settings, job_id, {"type": "progress", "step": 3, "max_steps": 10, "progress": 0.3})
            progress = await asyncio.wait_for(_next_event(lines), 10)
            assert progress["event"] == "progress" and progress["step"] == 3 and progress["job_id"] == job_id
            assert progress["event_id"] == progress_id

            await _append(redis_client, settings, job_id, {"type": "state", "state": "succeeded", "attempt": 1})
            final = await asyncio.wait_for(_next_event(lines), 10)
            assert final["state"] == "succeeded"
            with pytest.raises(EOFError):  # the stream ends with the job
                await asyncio.wait_for(_next_event(lines), 10)

        # reconnecting after the progress event: exactly what followed it, then the end
        async with http.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": progress_id}) as response:
            body = (await asyncio.wait_for(response.aread(), 10)).decode()
        replayed = await _all_events(body)
        assert [(e["event"], e.get("state")) for e in replayed] == [("state", "succeeded")]

        # a fresh subscriber gets the state the database holds: still running (nothing ended
        # the attempt in the database), so the stream stays open ...
        async with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            lines = response.aiter_lines()
            assert (await asyncio.wait_for(_next_event(lines), 10))["state"] == "running"  # the db still says so
            pending = asyncio.ensure_future(_next_event(lines))
            done, _ = await asyncio.wait({pending}, timeout=1)
            assert not done, pending.result() if done else None
            # ... until the attempt really finishes: the database first, then its event (the
            # order of every commit's outbox), which is the stream's last.
            assert states.finish(db, job_id, 1, "succeeded")
            db.commit()
            await _append(redis_client, settings, job_id, {"type": "state", "state": "succeeded", "attempt": 1})
            last = await asyncio.wait_for(pending, 10)
            assert last["event"] == "state" and last["state"] == "succeeded" and last["job_id"] == job_id
            with pytest.raises(EOFError):  # the response body completes
                await asyncio.wait_for(_next_event(lines), 10)

        # a finished job's stream is its state, then the end: the whole body arrives (nothing
        # is published now, so a stream left open would hang; the timeout fails it instead)
        async with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            assert response.status_code == 200
            body = (await asyncio.wait_for(response.aread(), 5)).decode()
        (only,) = await _all_events(body)
        assert only["event"] == "state" and only["snapshot"] is True
        assert only["state"] == "succeeded" and only["progress"] == 1.0 and only["attempt"] == 1


async def _all_events(body: str) -> list[dict]:
    async def replay():
        for line in body.split("\n"):
            yield line

    chunks, found = replay(), []
    while True:
        try:
            found.append(await _next_event(chunks))
        except EOFError:
            return found


async def test_the_api_publishes_its_own_transitions_and_a_stream_resumes_after_them(live_server, make_token):
    token = make_token()
    async with httpx.AsyncClient(base_url=live_server.url, headers=auth(token), timeout=10) as http:
        job_id = (await http.post("/v1/jobs", json=JOB)).json()["id"]
        async with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            lines = response.aiter_lines()
            snapshot = await asyncio.wait_for(_next_event(lines), 10)
            assert snapshot["state"] == "queued" and snapshot["event_id"] == "0-0"  # nothing was published yet
            assert (await http.post(f"/v1/jobs/{job_id}/cancel")).status_code == 202
            cancelled = await asyncio.wait_for(_next_event(lines), 10)
            assert (cancelled["state"], cancelled["attempt"], cancelled["transition"]) == ("cancelled", 0, "cancel")
            with pytest.raises(EOFError):
                await asyncio.wait_for(_next_event(lines), 10)
        assert (await http.post(f"/v1/jobs/{job_id}/cancel")).status_code == 202  # again: nothing new
        assert (await http.post(f"/v1/jobs/{job_id}/retry")).status_code == 200
        # back after the cancel: the retry, then (still queued) the stream stays open
        async with http.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": cancelled["event_id"]}) as response:
            lines = response.aiter_lines()
            retried = await asyncio.wait_for(_next_event(lines), 10)
            assert (retried["event"], retried["state"], retried["transition"]) == ("state", "queued", "retry")
            assert events.parse_id(retried["event_id"]) > events.parse_id(cancelled["event_id"])
            pending = asyncio.ensure_future(_next_event(lines))
            done, _ = await asyncio.wait({pending}, timeout=0.5)
            assert not done  # the second cancel said nothing
            assert (await http.post(f"/v1/jobs/{job_id}/cancel")).status_code == 202
            assert (await asyncio.wait_for(pending, 10))["state"] == "cancelled"
        # an id this stream never had (from the future, or trimmed away): a fresh snapshot
        async with http.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "99999999999999-0"}) as response:
            (only,) = await _all_events((await asyncio.wait_for(response.aread(), 10)).decode())
        assert only["snapshot"] is True and only["state"] == "cancelled"
        bad = await http.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "yesterday"})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "Last-Event-ID"


async def test_client_events_iterator(live_server, make_token, settings, redis_client):
    from service.cli.client import Client

    token = make_token()
    loop = asyncio.get_running_loop()

    def follow():
        with Client(live_server.url, token) as api:
            job = api.submit(JOB)
            seen = []
            for event in api.events(job["id"], timeout=10):
                seen.append(event)
                if len(seen) == 1:
                    asyncio.run_coroutine_threadsafe(
                        _append(redis_client, settings, job["id"], {"type": "state", "state": "cancelled", "attempt": 0}), loop
                    ).result(10)
            return seen

    seen = await asyncio.to_thread(follow)
    assert [e["type"] for e in seen] == ["state", "state"]
    assert seen[0]["state"] == "queued" and seen[1]["state"] == "cancelled"
    assert seen[0]["event_id"] == "0-0" and events.is_id(seen[1]["event_id"])


async def test_health_ready_metrics(client, make_token):
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    # database and Redis are up; no dispatcher has written a heartbeat yet
    assert ready.status_code == 503
    assert ready.json()["checks"] == {"database": "ok", "redis": "ok", "ray": "no dispatcher heartbeat"}

    token = make_token()
    await client.post("/v1/jobs", json=JOB, headers=auth(token))
    await client.post("/v1/jobs", json={**JOB, "priority": 7}, headers=auth(token))
    text = (await client.get("/metrics")).text
    assert "unroll_jobs_submitted_total 2.0" in text
    assert 'unroll_queue_depth{priority="0"} 1.0' in text and 'unroll_queue_depth{priority="7"} 1.0' in text
    assert 'unroll_jobs{state="queued"} 2.0' in text
    assert 'unroll_http_request_duration_seconds_count{method="POST",route="/v1/jobs",status="201"} 2.0' in text


async def test_openapi_documents_every_route_and_error(client):
    spec = (await client.get("/openapi.json")).json()
    assert "JobConfig" in spec["components"]["schemas"] and "ErrorBody" in spec["components"]["schemas"]
    submit = spec["paths"]["/v1/jobs"]["post"]
    assert submit["requestBody"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/JobConfig"
    assert {"200", "201", "401", "413", "422", "429", "503"} <= set(submit["responses"])
    # a DirectRoute documents what its signature no longer declares
    assert [(p["name"], p["in"], p["schema"]["maxLength"]) for p in submit["parameters"]] == [("Idempotency-Key", "header", 255)]
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            if path.startswith("/v1/"):
                assert "401" in op["responses"], (method, path)
                assert op.get("security") == [{"HTTPBearer": []}], (method, path)
    assert (await client.get("/docs")).status_code == 200


async def test_dependencies_down_are_503(settings: Settings, make_token, tmp_path):
    token = make_token()
    redis_down = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    app = create_app(redis_down)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            ready = await http.get("/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["redis"].startswith("down")
            # the job is committed; the reconciler enqueues it when Redis is back
            job = await http.post("/v1/jobs", json=JOB, headers=auth(token))
            assert job.status_code == 201
            r = await http.get(f"/v1/jobs/{job.json()['id']}/events", headers=auth(token))
            assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"

    db_down = settings.model_copy(update={"database_url": "postgresql://nobody@127.0.0.1:1/none"})
    app = create_app(db_down)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            r = await http.get("/v1/jobs", headers=auth(token))
            assert r.status_code == 503 and r.json()["error"]["message"] == "the database is unavailable"
            ready = await http.get("/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["database"].startswith("down")


async def test_ready_with_a_dispatcher_heartbeat(client, redis_client, settings):
    from service.store.keys import Keys

    keys = Keys(settings.redis_prefix)
    await redis_client.set(keys.dispatcher_heartbeat("d1"), json.dumps({"ray": "unreachable: boom"}), ex=10)
    ready = await client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["ray"] == "unreachable"  # why: for the admin
    ready = await client.get("/readyz", headers=auth(ADMIN_TOKEN))
    assert ready.status_code == 503 and ready.json()["checks"]["ray"] == "unreachable: boom"
    await redis_client.set(keys.dispatcher_heartbeat("d2"), json.dumps({"ray": "ok"}), ex=10)
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"ready": True, "checks": {"database": "ok", "redis": "ok", "ray": "ok"}}
