"""Liveness, readiness and Prometheus metrics: the routes without a token."""

from __future__ import annotations

import asyncio
import json
import logging

import sqlalchemy as sa
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from service.api.deps import IsAdminDep, RuntimeDep
from service.api.schemas import Readiness
from service.store.db import repo
from service.store.db.models import JobState

router = APIRouter(tags=["health"])
log = logging.getLogger("unroll.api")

CHECK_TIMEOUT_S = 2.0


@router.get("/healthz", summary="Liveness: the process serves requests (checks nothing else)")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _down(exc: Exception) -> str:
    return f"down: {type(exc).__name__}: {exc}".splitlines()[0][:300]


async def _database(runtime) -> str:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            async with runtime.engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
        return "ok"
    except Exception as exc:  # any failure is "not ready", with the reason
        return _down(exc)


async def _redis(runtime) -> str:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            await runtime.redis.ping()
        return "ok"
    except Exception as exc:
        return _down(exc)


async def _ray(runtime) -> str:
    # Each live dispatcher (which owns Ray) keeps a heartbeat key with a TTL holding its Ray
    # status; readiness only reads them, so the API never connects to Ray itself.
    pattern = getattr(runtime.keys, "dispatcher_heartbeats", None)
    if pattern is None:
        return "no dispatcher heartbeat"
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            keys = [key async for key in runtime.redis.scan_iter(match=pattern, count=100)]
            beats = await runtime.redis.mget(keys) if keys else []
    except Exception as exc:
        return f"unknown: {type(exc).__name__}"
    statuses = []
    for beat in beats:
        try:
            statuses.append(str(json.loads(beat).get("ray", "unknown")))
        except (TypeError, ValueError, AttributeError):
            continue
    if not statuses:
        return "no dispatcher heartbeat"
    return "ok" if "ok" in statuses else statuses[0]


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: the database, Redis and a live dispatcher (Ray)",
    description="`checks` says which dependency is down. Why (the error: host names, "
    "drivers, versions) goes to the API's log, and into the answer only for the admin token.",
    responses={503: {"model": Readiness, "description": "Some dependency is down; `checks` says which"}},
)
async def readyz(runtime: RuntimeDep, admin: IsAdminDep) -> JSONResponse:
    database, redis, ray = await asyncio.gather(_database(runtime), _redis(runtime), _ray(runtime))
    checks = {"database": database, "redis": redis, "ray": ray}
    ready = all(v == "ok" for v in checks.values())
    if not ready:
        log.warning("not ready: %s", ", ".join(f"{name} {state}" for name, state in checks.items() if state != "ok"))
    if not admin:  # the reason may name hosts and software: not for anonymous callers
        checks = {name: state.split(":", 1)[0] for name, state in checks.items()}
    body = Readiness(ready=ready, checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
async def metrics(runtime: RuntimeDep) -> Response:
    m = runtime.metrics
    # Gauges are read now, at scrape time; a dependency that is down leaves them out.
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            depth = await runtime.queue.depth()
        m.queue_depth.clear()
        for priority, n in depth.items():
            m.queue_depth.labels(str(priority)).set(n)
    except (RedisError, OSError, TimeoutError):
        pass
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            async with runtime.sessions() as session:
                counts = await session.run_sync(repo.count_jobs_by_state)
        for state in JobState:
            m.jobs.labels(state.value).set(counts.get(state, 0))
    except Exception:
        pass
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
