"""Per-project quotas (issue 14), over /v1/admin and `unroll project set | list`: an admin
bounds a project; the project's submissions are held to its priority ceiling and queue
cap at once, on every API replica; a job the quota could never run is refused up front.
On c069bd3 any project could ask for priority 2**31-1, and nothing bounded one project."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import httpx

from service.api.app import create_app
from service.store.db import repo
from tests.api.helpers import ADMIN_TOKEN, auth, job

ROOT = Path(__file__).resolve().parents[2]


async def _patch(http: httpx.AsyncClient, project: str, **quota) -> httpx.Response:
    return await http.patch(f"/v1/admin/projects/{project}", json=quota, headers=auth(ADMIN_TOKEN))


async def test_priority_is_held_to_the_default_ceiling_and_to_the_projects_own(client, make_token):
    token = make_token("tenant")
    assert (await client.post("/v1/jobs", json=job(priority=100), headers=auth(token))).status_code == 201
    over = await client.post("/v1/jobs", json=job(priority=2**31 - 1), headers=auth(token))
    assert over.status_code == 422 and over.json()["error"]["field"] == "priority", over.text
    assert "100" in over.json()["error"]["message"]
    assert (await _patch(client, "tenant", max_priority=5)).status_code == 200
    # At once on this replica: the cached token is forgotten with its old quota.
    lowered = await client.post("/v1/jobs", json=job(priority=6), headers=auth(token))
    assert lowered.status_code == 422 and "max_priority" in lowered.json()["error"]["message"], lowered.text
    sweep = {"base": job(priority=6), "grid": {"tbptt.k1": [4, 8]}}
    refused = await client.post("/v1/sweeps", json=sweep, headers=auth(token))
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "base.priority", refused.text


async def test_a_new_quota_reaches_every_replica(settings, make_token):
    token = make_token("tenant")
    replicas = [create_app(settings), create_app(settings)]
    async with replicas[0].router.lifespan_context(replicas[0]), replicas[1].router.lifespan_context(replicas[1]):
        a, b = (httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") for app in replicas)
        async with a, b:
            assert (await b.post("/v1/jobs", json=job(priority=50), headers=auth(token))).status_code == 201  # cached on b
            assert (await _patch(a, "tenant", max_priority=10)).status_code == 200
            deadline = asyncio.get_running_loop().time() + 5
            while (status := (await b.post("/v1/jobs", json=job(priority=50), headers=auth(token))).status_code) == 201:
                assert asyncio.get_running_loop().time() < deadline, "replica b still applies the old quota"
                await asyncio.sleep(0.05)
            assert status == 422


async def test_max_queued_and_a_job_larger_than_the_quota(client, make_token):
    token = make_token("tenant")
    assert (await _patch(client, "tenant", max_queued=2, max_cpus=2, max_gpus=0)).status_code == 200
    for _ in range(2):
        assert (await client.post("/v1/jobs", json=job(), headers=auth(token))).status_code == 201
    third = await client.post("/v1/jobs", json=job(), headers=auth(token))
    assert third.status_code == 429 and "limit of 2" in third.json()["error"]["message"], third.text
    assert (await _patch(client, "tenant", max_queued=None)).status_code == 200
    big = await client.post("/v1/jobs", json=job(resources={"cpus": 1, "workers": 4}), headers=auth(token))
    assert big.status_code == 422 and big.json()["error"]["field"] == "resources.cpus", big.text
    gpu = await client.post("/v1/jobs", json=job(resources={"gpus": 1}), headers=auth(token))
    assert gpu.status_code == 422 and gpu.json()["error"]["field"] == "resources.gpus", gpu.text
    # Another project is not bound by this one's quota.
    other = make_token("other")
    assert (await client.post("/v1/jobs", json=job(resources={"cpus": 1, "workers": 4}), headers=auth(other))).status_code == 201


async def test_the_admin_routes_bound_and_show_quotas(client, make_token):
    token = make_token("tenant")
    for field, bad in (("max_running", "-1"), ("max_cpus", "1e999"), ("max_queued", "1000000000"), ("max_priority", "2147483648"), ("max_nope", "1")):
        response = await client.patch(
            "/v1/admin/projects/tenant", content=f'{{"{field}": {bad}}}',
            headers={**auth(ADMIN_TOKEN), "Content-Type": "application/json"},
        )
        assert response.status_code == 422 and response.json()["error"]["field"] == field, (field, response.text)
    assert (await _patch(client, "tenant", max_running=3, max_cpus=4.5)).status_code == 200
    assert (await client.post("/v1/jobs", json=job(), headers=auth(token))).status_code == 201
    shown = (await client.get("/v1/admin/projects/tenant", headers=auth(ADMIN_TOKEN))).json()
    assert (shown["max_running"], shown["max_cpus"], shown["max_gpus"], shown["queued"], shown["running"]) == (3, 4.5, None, 1, 0)
    cleared = (await _patch(client, "tenant", max_running=None)).json()
    assert cleared["max_running"] is None and cleared["max_cpus"] == 4.5  # only what was sent changes
    listed = (await client.get("/v1/admin/projects", headers=auth(ADMIN_TOKEN))).json()["projects"]
    assert "tenant" in [p["name"] for p in listed]
    assert (await client.get("/v1/admin/projects", headers=auth(token))).status_code == 401  # admin only
    assert (await client.get("/v1/admin/projects/nobody", headers=auth(ADMIN_TOKEN))).status_code == 404


def _unroll(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_the_project_commands(db_url, session, redis_url, redis_prefix):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("UNROLL_")},
           "UNROLL_DATABASE_URL": db_url, "UNROLL_REDIS_URL": redis_url, "UNROLL_REDIS_PREFIX": redis_prefix}
    done = _unroll("project", "set", "team-a", "--max-running", "4", "--max-cpus", "8", "--max-gpus", "1",
                   "--max-priority", "50", "--max-queued", "1000", env=env)
    assert done.returncode == 0, done.stderr
    quota = repo.quota_of(repo.get_project_by_name(session, "team-a"))
    assert (quota.max_running, quota.max_cpus, quota.max_gpus, quota.max_priority, quota.max_queued) == (4, 8.0, 1.0, 50, 1000)
    assert _unroll("project", "set", "team-a", "--max-priority", "default", env=env).returncode == 0
    session.expire_all()
    assert repo.quota_of(repo.get_project_by_name(session, "team-a")).max_priority is None
    listed = _unroll("project", "list", env=env)
    assert listed.returncode == 0 and "team-a" in listed.stdout and "0/4" in listed.stdout, listed.stdout
    for bad in (["--max-running", "-1"], ["--max-cpus", "lots"], ["--max-cpus", "inf"], []):
        refused = _unroll("project", "set", "team-a", *bad, env=env)
        assert refused.returncode == 2, (bad, refused.stdout, refused.stderr)
    for name in ("bad name", "../x", "x" * 201):  # the admin route's rule: never stored
        refused = _unroll("project", "set", name, "--max-running", "1", env=env)
        assert refused.returncode == 2 and "project name" in refused.stderr, (name, refused.stderr)
        assert _unroll("token", "create", "--project", name, env=env).returncode == 2
