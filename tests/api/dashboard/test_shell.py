"""How the app serves the dashboard, without a browser: the shell at / and at every deep
link, with no token; the API's routes and errors untouched; assets versioned by content;
a clear page when the assets were never built."""

from __future__ import annotations

import os

import httpx
import pytest

from service.api import dashboard
from service.api.app import create_app
from service.store.settings import Settings


@pytest.fixture
async def client():
    # No lifespan: nothing here touches the database or Redis.
    app = create_app(Settings(database_url="sqlite:///:memory:"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        yield c


@pytest.fixture
def fake_build(tmp_path, monkeypatch):
    """A stand-in build, so the shell's behaviour is tested without npm."""
    (tmp_path / "app.js").write_text("console.log(1)")
    (tmp_path / "app.css").write_text("body{}")
    monkeypatch.setattr(dashboard, "STATIC", tmp_path)
    monkeypatch.setattr(dashboard, "_shell_cache", None)
    return tmp_path


@pytest.mark.parametrize("path", ["/", "/jobs/job_123", "/sweeps/swp_9", "/?state=running&tag=x"])
async def test_every_page_url_serves_the_shell_without_a_token(client, fake_build, path):
    r = await client.get(path)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'src="/assets/app.js?v=' in r.text and 'id="main"' in r.text
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert r.headers["cache-control"] == "no-cache"


async def test_the_api_keeps_its_routes_errors_and_schema(client, fake_build):
    # (tests/api/test_auth.py walks every route with a running app: all still need a token)
    r = await client.get("/v1/no-such-route")
    assert r.status_code == 404 and "error" in r.json()  # JSON, not the shell
    r = await client.get("/jobs/a/b")
    assert r.status_code == 404
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert "/" not in paths and not any(p.startswith(("/jobs", "/sweeps", "/assets")) for p in paths)


async def test_asset_urls_change_when_the_build_changes(client, fake_build):
    first = (await client.get("/")).text
    script = fake_build / "app.js"
    script.write_text("console.log(2)")
    stat = script.stat()
    os.utime(script, (stat.st_atime, stat.st_mtime + 5))
    second = (await client.get("/")).text
    assert first != second  # a browser never runs a stale cached script


async def test_an_unbuilt_dashboard_says_how_to_build_it(client, tmp_path, monkeypatch):
    monkeypatch.setattr(dashboard, "STATIC", tmp_path / "missing")
    r = await client.get("/")
    assert r.status_code == 503 and "make dashboard" in r.text


@pytest.mark.skipif(not dashboard.built(), reason="the dashboard is not built: run `make dashboard`")
async def test_the_built_assets_are_served(client):
    r = await client.get("/assets/app.js")
    assert r.status_code == 200 and "javascript" in r.headers["content-type"]
    assert "unrollCharts" in r.text  # the hook the browser tests read
    r = await client.get("/assets/app.css")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/css")
    assert (await client.get("/assets/nope.js")).status_code == 404
