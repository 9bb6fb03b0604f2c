"""The FastAPI application: ``create_app(settings)`` wires the routers, the error handlers
and the middleware; the lifespan opens the database engine, the Redis client and the
queue, and closes them. Importing this module or calling ``create_app`` connects to
nothing: ``uvicorn --factory service.api.app:create_app`` or ``unroll api``.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api import dashboard, errors
from service.api.admission import ProjectAdmission
from service.api.routes import admin, compare, datasets, health, inference, jobs, sweeps
from service.api.metrics import LatencyMiddleware, Metrics
from service.api.runtime import open_runtime
from service.store.settings import Settings, get_settings
from trainer.config import JobConfig

# Routes that need no token (everything else does; tests/api proves it route by route).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


class RequestGuard:
    """Refuses, before any routing, what no route can use:

    - a body larger than ``max_body_bytes`` (413): at once when Content-Length says so,
      else as soon as the streamed body passes the limit. Dataset uploads are exempt:
      their route streams them to the artifact store under their own, larger cap.
    - a NUL character in the path or query (400): no database can store or compare one.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string", b"")
        if b"%00" in raw or b"%00" in query or b"\x00" in raw or b"\x00" in query or "\x00" in scope["path"]:
            await errors.error_response(400, "bad_request", "NUL characters are not allowed in URLs")(scope, receive, send)
            return
        if scope["method"] == "POST" and scope["path"] == datasets.UPLOAD_PATH:
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length":
                if value.isdigit() and int(value) > limit:
                    response = errors.error_response(413, "too_large", f"request body is larger than {limit} bytes")
                    await response(scope, receive, send)
                    return
                await self.app(scope, receive, send)  # the server enforces Content-Length itself
                return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise errors.PayloadTooLarge(limit)
            return message

        await self.app(scope, counted, send)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the job configuration (the body of POST /v1/jobs, which the
    route reads itself so that the trainer's parse_config is the only validator)."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes, tags=app.openapi_tags
        )
        config = JobConfig.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(config.pop("$defs", {}))
        components["JobConfig"] = config
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = open_runtime(settings, metrics)
        app.state.runtime = runtime
        listener = runtime.listen_for_revocations()
        # What is alive now (modules, routes, ORM and pydantic metadata: ~130k objects)
        # lives as long as the app: out of the collector's sight, a full collection no
        # longer walks it (a 40 ms pause in the middle of requests otherwise). Garbage is
        # collected first so that none of it is kept; unfrozen when the app stops.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
            await runtime.close()
            gc.unfreeze()

    app = FastAPI(
        title="unroll",
        version="0.1.0",
        description="Truncated-BPTT training for recurrent networks, as a service. "
        "Every route under /v1 takes `Authorization: Bearer <token>`; errors are "
        '`{"error": {"code", "message", "field"?}}`.',
        lifespan=lifespan,
        # Off unless asked for: FastAPI otherwise looks up the global OpenTelemetry
        # providers on every request, and /metrics already serves Prometheus.
        telemetry=None if settings.otel else {"tracing": False, "metrics": False, "logs": False},
        openapi_tags=[
            {"name": "jobs", "description": "Training jobs (SPEC §2 configs)"},
            {"name": "inference", "description": "Using a trained job: generate, predict, sessions"},
            {"name": "sweeps", "description": "Grids of jobs"},
            {"name": "datasets", "description": "Uploaded training data"},
            {"name": "admin", "description": "Projects and tokens (admin token only)"},
            {"name": "health", "description": "Liveness, readiness, Prometheus (no token)"},
        ],
    )
    app.state.settings = settings
    app.state.metrics = metrics
    errors.install(app)
    for module in (jobs, compare, inference, sweeps, datasets, admin, health):
        app.include_router(module.router)
    app.include_router(dashboard.router)  # after the API: GET / and the dashboard's deep links
    app.add_middleware(RequestGuard, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(
        ProjectAdmission, waiting=settings.max_requests_per_project, requests=settings.requests_in_progress_per_project,
        streams=settings.max_streams_per_project, wait_s=settings.admission_wait_s,
    )
    app.add_middleware(LatencyMiddleware, metrics=metrics)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app
