"""Tokens can be listed, revoked and made to expire (issue 14), over /v1/admin and with
`unroll token create --expires | list | revoke`; a revoked token is refused on its next
request on every API replica, though each caches verified tokens. On c069bd3 there was no
way to list or revoke a token, and no expiry but through the database."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import httpx

from service.api.app import create_app
from service.store.db import repo
from service.store.db.base import utcnow
from tests.api.helpers import ADMIN_TOKEN, auth

ROOT = Path(__file__).resolve().parents[2]


async def _status_after_revocation(http: httpx.AsyncClient, token: str, timeout: float = 5.0) -> int:
    """The status a request with `token` gets once the revocation reached this replica
    (pub/sub is asynchronous: poll briefly, then give the last answer)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        status = (await http.get("/v1/jobs", headers=auth(token))).status_code
        if status != 200 or asyncio.get_running_loop().time() > deadline:
            return status
        await asyncio.sleep(0.05)


async def test_a_revoked_token_is_refused_on_its_next_request_on_every_replica(settings):
    replicas = [create_app(settings), create_app(settings)]
    async with replicas[0].router.lifespan_context(replicas[0]), replicas[1].router.lifespan_context(replicas[1]):
        a, b = (httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") for app in replicas)
        async with a, b:
            created = await a.post("/v1/admin/projects/tenant/tokens", json={"name": "ci"}, headers=auth(ADMIN_TOKEN))
            assert created.status_code == 201, created.text
            token, token_id = created.json()["token"], created.json()["token_id"]
            for http in (a, b):  # each replica verifies it once and caches it
                assert (await http.get("/v1/jobs", headers=auth(token))).status_code == 200
            listed = (await b.get("/v1/admin/tokens", params={"project": "tenant"}, headers=auth(ADMIN_TOKEN))).json()["tokens"]
            assert [(t["id"], t["name"], t["revoked_at"]) for t in listed] == [(token_id, "ci", None)]
            assert "token" not in listed[0] and all(token not in str(v) for v in listed[0].values())

            revoked = await a.post(f"/v1/admin/tokens/{token_id}/revoke", headers=auth(ADMIN_TOKEN))
            assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
            assert (await a.get("/v1/jobs", headers=auth(token))).status_code == 401  # the replica that revoked
            assert await _status_after_revocation(b, token) == 401  # and the other one, through Redis
            again = await b.post(f"/v1/admin/tokens/{token_id}/revoke", headers=auth(ADMIN_TOKEN))
            assert again.status_code == 200 and again.json()["revoked_at"] == revoked.json()["revoked_at"]  # idempotent
            assert (await a.post("/v1/admin/tokens/tok_nope/revoke", headers=auth(ADMIN_TOKEN))).status_code == 404
            assert (await a.get("/v1/admin/tokens", headers=auth(token))).status_code == 401  # admin only


async def test_a_token_can_be_made_to_expire_within_bounds(client):
    made = await client.post("/v1/admin/projects/tenant/tokens", json={"expires_in_s": 3600}, headers=auth(ADMIN_TOKEN))
    assert made.status_code == 201, made.text
    expires = made.json()["expires_at"]
    assert expires is not None and (await client.get("/v1/jobs", headers=auth(made.json()["token"]))).status_code == 200
    for bad in (59, 10 * 365 * 86400 + 1, -1):
        response = await client.post("/v1/admin/projects/tenant/tokens", json={"expires_in_s": bad}, headers=auth(ADMIN_TOKEN))
        assert response.status_code == 422 and response.json()["error"]["field"] == "expires_in_s", response.text


def _unroll(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_the_token_commands(db_url, session, redis_url, redis_prefix):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("UNROLL_")},
           "UNROLL_DATABASE_URL": db_url, "UNROLL_REDIS_URL": redis_url, "UNROLL_REDIS_PREFIX": redis_prefix}
    created = _unroll("token", "create", "--project", "cli", "--name", "laptop", "--expires", "30d", env=env)
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip().splitlines()[-1]
    row = repo.authenticate(session, secret)
    assert row is not None and row.name == "laptop"
    assert timedelta(days=29, hours=23) < row.expires_at - utcnow() <= timedelta(days=30)

    listed = _unroll("token", "list", "--project", "cli", env=env)
    assert listed.returncode == 0 and row.id in listed.stdout and "laptop" in listed.stdout and secret not in listed.stdout

    revoked = _unroll("token", "revoke", row.id, env=env)
    assert revoked.returncode == 0 and f"{row.id} revoked" in revoked.stdout, revoked.stderr
    session.expire_all()
    assert repo.authenticate(session, secret) is None
    assert "already revoked" in _unroll("token", "revoke", row.id, env=env).stdout
    unknown = _unroll("token", "revoke", "tok_nope", env=env)
    assert unknown.returncode == 2 and "no token" in unknown.stderr
    for bad in ("0s", "11000d", "soon"):
        refused = _unroll("token", "create", "--project", "cli", "--expires", bad, env=env)
        assert refused.returncode == 2 and "--expires" in refused.stderr, (bad, refused.stderr)
