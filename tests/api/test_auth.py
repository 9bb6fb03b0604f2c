"""Who may call what: the auth matrix, and a walk over the route table proving that every
route but health, readiness, metrics and the docs needs a token."""

from __future__ import annotations

import re

import pytest
from fastapi.routing import APIRoute

from service.store.db import repo
from tests.api.helpers import ADMIN_TOKEN, JOB, auth

pytestmark = pytest.mark.redis

PUBLIC = {"/healthz", "/readyz", "/metrics"}


def _concrete(path: str) -> str:
    # Any value works: auth is checked before the object is looked up.
    return re.sub(r"\{[^}]+\}", lambda m: "12" if m.group(0) == "{step}" else "x1", path)


def api_routes(routes, prefix: str = ""):
    """Every APIRoute of the app, also inside included routers (FastAPI >= 0.16x wraps
    them; their routes already carry the router's prefix)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        inner = getattr(route, "original_router", None) or getattr(route, "router", None)
        if inner is not None and inner is not route:
            yield from api_routes(inner.routes)


async def test_every_route_but_health_requires_a_token(app, client):
    checked = 0
    for route in api_routes(app.routes):
        for method in route.methods:
            path = _concrete(route.path)
            for headers in ({}, auth("unroll_not-a-token"), {"Authorization": "Basic Zm9vOmJhcg=="}):
                r = await client.request(method, path, headers=headers)
                if route.path in PUBLIC:
                    assert r.status_code != 401, (method, route.path)
                else:
                    assert r.status_code == 401, (method, route.path, headers, r.text)
                    assert r.json()["error"]["code"] == "unauthorized"
                    assert r.headers["www-authenticate"] == "Bearer"
            checked += 1
    # the walk saw every operation the API documents
    assert checked == sum(len(ops) for ops in app.openapi()["paths"].values()) >= 17


async def test_another_projects_objects_are_404(client, make_token, db):
    mine, theirs = make_token("mine"), make_token("theirs")
    job_id = (await client.post("/v1/jobs", json=JOB, headers=auth(mine))).json()["id"]
    sweep = await client.post("/v1/sweeps", json={"base": JOB, "grid": {"tbptt.k1": [4, 8]}}, headers=auth(mine))
    sweep_id = sweep.json()["id"]
    for method, path in [
        ("GET", f"/v1/jobs/{job_id}"),
        ("POST", f"/v1/jobs/{job_id}/cancel"),
        ("POST", f"/v1/jobs/{job_id}/retry"),
        ("GET", f"/v1/jobs/{job_id}/metrics"),
        ("GET", f"/v1/jobs/{job_id}/logs"),
        ("GET", f"/v1/jobs/{job_id}/events"),
        ("GET", f"/v1/jobs/{job_id}/checkpoints"),
        ("GET", f"/v1/jobs/{job_id}/checkpoints/0"),
        ("GET", f"/v1/sweeps/{sweep_id}"),
        ("POST", f"/v1/sweeps/{sweep_id}/cancel"),
    ]:
        r = await client.request(method, path, headers=auth(theirs))
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["code"] == "not_found"
        unknown = await client.request(method, path.replace(job_id, "job_0000").replace(sweep_id, "swp_0000"), headers=auth(mine))
        assert unknown.status_code == 404  # the same answer as for an unknown id
    listed = (await client.get("/v1/jobs", headers=auth(theirs))).json()["jobs"]
    assert listed == []
    assert (await client.get(f"/v1/jobs/{job_id}", headers=auth(mine))).status_code == 200


async def test_admin_token_creates_projects_and_tokens(client, db):
    r = await client.post("/v1/admin/projects/research/tokens", headers=auth(ADMIN_TOKEN), json={"name": "ci"})
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["project"] == "research" and created["token"].startswith("unroll_")
    # the token works, and is stored only as a hash
    assert (await client.get("/v1/jobs", headers=auth(created["token"]))).status_code == 200
    row = repo.authenticate(db, created["token"])
    assert row is not None and row.token_hash != created["token"] and created["token"] not in row.token_hash
    # a second token of the same project sees the same jobs
    second = (await client.post("/v1/admin/projects/research/tokens", headers=auth(ADMIN_TOKEN))).json()
    assert second["project_id"] == created["project_id"] and second["token"] != created["token"]

    # the admin token is not a project token, and project tokens are not admin
    assert (await client.get("/v1/jobs", headers=auth(ADMIN_TOKEN))).status_code == 401
    r = await client.post("/v1/admin/projects/x/tokens", headers=auth(created["token"]))
    assert r.status_code == 401
    assert (await client.post("/v1/admin/projects/x/tokens")).status_code == 401
    bad_name = await client.post("/v1/admin/projects/..%2Fx/tokens", headers=auth(ADMIN_TOKEN))
    assert bad_name.status_code in (404, 422)


async def test_no_admin_token_configured(client, settings):
    settings.admin_token = None
    r = await client.post("/v1/admin/projects/x/tokens", headers=auth(ADMIN_TOKEN))
    assert r.status_code == 401 and "UNROLL_ADMIN_TOKEN" in r.json()["error"]["message"]


async def test_revoked_and_expired_tokens(client, db, app):
    from datetime import timedelta

    from service.store.db.base import utcnow

    project = repo.get_or_create_project(db, "demo")
    expired, _ = repo.create_token(db, project.id, expires_at=utcnow() - timedelta(seconds=1))
    revoked, row = repo.create_token(db, project.id)
    db.commit()
    assert (await client.get("/v1/jobs", headers=auth(expired))).status_code == 401
    assert (await client.get("/v1/jobs", headers=auth(revoked))).status_code == 200
    repo.revoke_token(db, row.id)
    db.commit()
    app.state.runtime.tokens.clear()  # revocation applies once the cache entry ages out
    assert (await client.get("/v1/jobs", headers=auth(revoked))).status_code == 401
