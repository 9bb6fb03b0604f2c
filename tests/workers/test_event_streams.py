"""A job's event stream with the real parts: the API (uvicorn, real HTTP), an `unroll worker`
dispatcher, Ray, and an attempt whose Ray worker process is killed (SIGKILL). A subscriber
that connects mid-run sees metrics and log events; one that comes back with Last-Event-ID
sees every transition it missed (lost, resumed) in order with its attempt, then the end."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time

import httpx
import pytest

from service.api.app import create_app
from service.store import events
from service.store.db import repo
from service.store.db.models import JobState
from service.store.settings import Settings
from tests.api.helpers import LiveServer, auth

pytestmark = pytest.mark.redis

CONFIG = {
    "model": {"cell": "lstm", "hidden_size": 16},
    "data": {"kind": "recall", "vocab": 4, "lag": 2, "length": 4000, "batch_size": 4, "valid_length": 64},
    "tbptt": {"k1": 8, "k2": 12},
    "optim": {"lr": 0.01},
    # runs until cancelled
    "train": {"max_steps": 1_000_000, "eval_every": 50, "checkpoint_every": 25, "seed": 3, "device": "cpu"},
    "resources": {"cpus": 1},
}


@pytest.fixture
def api(stack):
    settings = Settings(
        database_url=stack.database_url, redis_url=stack.redis_url, redis_prefix=stack.prefix,
        artifacts=str(stack.artifacts), stream_keepalive_seconds=1.0,
    )
    with stack.sessions.begin() as session:
        token, _ = repo.create_token(session, stack.project_id)
    with LiveServer(create_app(settings)) as server:
        yield server.url, token


async def next_event(lines) -> dict:
    """The next event of a stream's lines: its data, with `event` and `event_id`."""
    name, data, event_id = None, [], None
    async for line in lines:
        if line == "" and data:
            return {"event": name, "event_id": event_id, **json.loads("\n".join(data))}
        field, _, value = line.partition(": ")
        if field == "event":
            name = value
        elif field == "id":
            event_id = value
        elif field == "data":
            data.append(value)
    raise EOFError


def attempt_pid(stack, job_id: str, attempt: int) -> int:
    """The process that runs the attempt, from its first log line (workers.reporter)."""
    with stack.sessions.begin() as session:
        lines = [entry.line for entry in repo.read_logs(session, job_id)]
    for line in lines:
        found = re.match(rf"attempt {attempt} on .*, pid (\d+)", line)
        if found:
            return int(found[1])
    raise AssertionError(f"no start line of attempt {attempt} in {lines}")


def wait_for_attempt(stack, job_id: str, attempt: int, step: int, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = stack.job(job_id)
        if job.attempt == attempt and job.state == JobState.RUNNING and job.step >= step:
            return job
        assert job.state in (JobState.QUEUED, JobState.RUNNING), (job.state, job.error)
        time.sleep(0.2)
    raise AssertionError(f"attempt {attempt} of {job_id} not running past step {step}\n{stack.worker_logs()}")


async def test_a_resumed_subscriber_sees_every_transition_of_a_killed_and_resumed_job(stack, api):
    url, token = api
    stack.start_worker()
    async with httpx.AsyncClient(base_url=url, headers=auth(token), timeout=30) as http:
        job_id = (await http.post("/v1/jobs", json=CONFIG)).json()["id"]
        await asyncio.to_thread(stack.wait, job_id, {JobState.RUNNING}, 120, 30)

        # mid-run: the job as it is, then its live metrics and log lines
        seen: list[dict] = []
        async with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            lines = response.aiter_lines()
            snapshot = await asyncio.wait_for(next_event(lines), 30)
            assert snapshot["snapshot"] is True and snapshot["state"] == "running" and snapshot["attempt"] == 1
            deadline = time.monotonic() + 60
            while not {"metrics", "log", "progress"} <= {e["event"] for e in seen}:
                assert time.monotonic() < deadline, [e["event"] for e in seen]
                seen.append(await asyncio.wait_for(next_event(lines), 30))
        last_seen = seen[-1]["event_id"]
        metrics = next(e for e in seen if e["event"] == "metrics")
        assert metrics["attempt"] == 1 and {"train/loss", "train/grad_norm", "train/lr"} <= set(metrics["values"])
        assert metrics["step"] == max(metrics["steps"].values()) and metrics["steps"]["train/loss"] == metrics["step"]
        logged = [line for e in seen if e["event"] == "log" for line in e["lines"]]
        stored = (await http.get(f"/v1/jobs/{job_id}/logs")).json()["lines"]
        texts = [line["line"] for line in stored]
        start = texts.index(logged[0]["line"])
        assert [line["line"] for line in logged] == texts[start : start + len(logged)]  # as stored, in order
        assert [line["ts"] for line in logged] == [line["ts"].replace("Z", "+00:00") for line in stored[start : start + len(logged)]]
        assert all(line["level"] and line["ts"] for line in logged)

        # disconnected, the worker process of the attempt is killed; the job resumes
        os.kill(attempt_pid(stack, job_id, 1), signal.SIGKILL)
        resumed = await asyncio.to_thread(wait_for_attempt, stack, job_id, 2, 60)
        assert resumed.step >= 60  # from its checkpoint, not from the start

        # back with Last-Event-ID: everything that followed, then live, until the end
        async with http.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": last_seen}) as response:
            lines = response.aiter_lines()
            missed: list[dict] = []
            deadline = time.monotonic() + 60
            while not any(e["event"] == "state" and e["attempt"] == 2 for e in missed):
                assert time.monotonic() < deadline, [(e["event"], e.get("state"), e["attempt"]) for e in missed]
                missed.append(await asyncio.wait_for(next_event(lines), 30))
            assert (await http.post(f"/v1/jobs/{job_id}/cancel")).status_code == 202
            while True:
                try:
                    missed.append(await asyncio.wait_for(next_event(lines), 30))
                except EOFError:
                    break  # the response completed

    assert all(e["job_id"] == job_id for e in missed)
    ids = [events.parse_id(e["event_id"]) for e in missed]
    assert ids == sorted(set(ids)) and ids[0] > events.parse_id(last_seen)  # in order, each once, all new
    transitions = [(e["state"], e["attempt"], e["transition"]) for e in missed if e["event"] == "state"]
    assert transitions == [
        ("queued", 1, "lost"),
        ("running", 2, "claim"),
        ("running", 2, "cancel_requested"),
        ("cancelled", 2, "finish"),
    ], transitions
    assert missed[-1]["event"] == "state" and missed[-1]["state"] == "cancelled"  # the last one
    lost = next(e for e in missed if e["event"] == "state")
    assert "WorkerCrashedError" in lost["reason"] or "died" in lost["reason"], lost
    # what the second attempt says comes after its claim, and the first says nothing then
    claimed_at = next(i for i, e in enumerate(missed) if e.get("transition") == "claim")
    assert all(e["attempt"] == 2 for e in missed[claimed_at:] if e["event"] in ("progress", "metrics", "log"))
    assert any(e["event"] == "metrics" and e["attempt"] == 2 for e in missed)
    assert any(e["event"] == "log" and any("resuming at step" in line["line"] for line in e["lines"]) for e in missed)
