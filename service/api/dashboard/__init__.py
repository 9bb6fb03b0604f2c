"""The web dashboard (SPEC §5 ``GET /``): one HTML shell for every page the browser may
open directly (``/``, ``/jobs/{id}``, ``/sweeps/{id}``, ``/compare``, ``/datasets``) and
the built script and styles under ``/assets``.

The shell and assets need no token: they hold no data. The page asks for a project token,
keeps it in the browser and calls the /v1 API with it, like any other client. The assets
are built from ``frontend/`` (TypeScript and uPlot from npm, bundled by esbuild) into
``static/`` by ``make dashboard``; nothing built is committed. Without a build, the shell
says how to make one instead of serving a blank page.

The routes are plain Starlette routes, outside the OpenAPI schema: they are not API.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
SHELL = HERE / "index.html"
ASSETS = ("app.js", "app.css")

# The page loads only its own script, styles and API; nothing may frame it.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

NOT_BUILT = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>unroll: dashboard not built</title></head>
<body><main><h1>The dashboard is not built</h1>
<p>Build it once with <code>make dashboard</code> (runs <code>npm ci &amp;&amp; npm run build</code> in
<code>frontend/</code>), then reload. The API works without it: see <a href="/docs">/docs</a>.</p></main></body></html>"""


def built() -> bool:
    return all((STATIC / name).is_file() for name in ASSETS)


_shell_cache: tuple[tuple[float, ...], str] | None = None


def _shell_html() -> str:
    """The shell with the assets' content hash in their URLs, so a rebuild is never hidden
    by a cached script; recomputed only when a file changes."""
    global _shell_cache
    files = [SHELL, *(STATIC / name for name in ASSETS)]
    stamp = tuple(f.stat().st_mtime for f in files)
    if _shell_cache is None or _shell_cache[0] != stamp:
        digest = hashlib.sha256()
        for f in files[1:]:
            digest.update(f.read_bytes())
        _shell_cache = (stamp, SHELL.read_text().replace("{{version}}", digest.hexdigest()[:12]))
    return _shell_cache[1]


async def shell(request: Request) -> HTMLResponse:
    if not built():
        return HTMLResponse(NOT_BUILT, status_code=503, headers=SECURITY_HEADERS)
    return HTMLResponse(_shell_html(), headers=SECURITY_HEADERS)


router = APIRouter(include_in_schema=False)
# Deep links: the same shell; the script routes on location.pathname.
router.routes.extend(
    [
        Route("/", shell, methods=["GET"], name="dashboard"),
        Route("/jobs/{job_id}", shell, methods=["GET"], name="dashboard-job"),
        Route("/sweeps/{sweep_id}", shell, methods=["GET"], name="dashboard-sweep"),
        Route("/compare", shell, methods=["GET"], name="dashboard-compare"),
        Route("/datasets", shell, methods=["GET"], name="dashboard-datasets"),
        Mount("/assets", app=StaticFiles(directory=STATIC, check_dir=False), name="dashboard-assets"),
    ]
)
