"""POST/GET /v1/jobs and a job's actions: submission, idempotency, quota, limits, list
filters and paging, cancel and retry transitions, metrics, logs and checkpoints."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import os
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from service.db import repo, states
from service.db.models import JobState
from service.keys import Keys
from tests.api.helpers import JOB, auth, job

pytestmark = pytest.mark.redis


async def submit(client, token, body=None, **headers):
    return await client.post("/v1/jobs", json=body or JOB, headers={**auth(token), **headers})


# --- submit -----------------------------------------------------------------------------------


async def test_submit_commits_then_enqueues(client, make_token, settings, redis_client):
    token = make_token()
    r = await submit(client, token, job(name="first", tags=["demo"], priority=5))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["state"] == "queued" and body["attempt"] == 0 and body["max_attempts"] == 3
    assert body["name"] == "first" and body["tags"] == ["demo"] and body["priority"] == 5
    assert body["max_steps"] == 10 and body["progress"] == 0.0
    assert body["config"]["tbptt"]["k2"] == 24  # stored as the trainer parsed it
    keys = Keys(settings.redis_prefix)
    assert await redis_client.hexists(keys.queue_members, body["id"])
    r = await client.get(f"/v1/jobs/{body['id']}", headers=auth(token))
    assert r.status_code == 200
    detail = r.json()
    assert detail["id"] == body["id"] and detail["metrics"] == {} and detail["attempts"] == []


async def test_submit_survives_a_queue_failure(client, app, make_token, db):
    """The row is the job: Redis down after the commit still answers 201 (the reconciler
    re-enqueues it later)."""
    token = make_token()

    async def broken(*args, **kwargs):
        raise ConnectionError("redis is down")

    import redis.exceptions

    async def redis_down(*args, **kwargs):
        raise redis.exceptions.ConnectionError("redis is down")

    app.state.runtime.queue.enqueue = redis_down
    r = await submit(client, token)
    assert r.status_code == 201
    assert repo.get_job(db, r.json()["id"]).state == JobState.QUEUED
