"""Prometheus metrics of the API: one registry per app (so several apps, e.g. in tests,
never collide), a latency histogram filled by a tiny ASGI middleware, and gauges that are
read from Redis and the database when /metrics is scraped (never on a timer).

The dispatchers' own metrics (dispatch latency, lease expiries, retries, heartbeats) come
from the snapshots they put in their Redis heartbeats (workers/metrics.py explains why),
read at scrape time too and rendered with a `dispatcher` label by `DispatcherCollector`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.store.logs import ensure_logging

log = logging.getLogger("unroll.api")
METRICS_PATH = "/metrics"
HEARTBEAT_READ_TIMEOUT_S = 2.0

# Submissions take a few milliseconds; the buckets resolve 1 ms to 10 s.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.submissions = Counter(
            "unroll_jobs_submitted",
            "Jobs accepted by POST /v1/jobs and POST /v1/sweeps (idempotent repeats excluded)",
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "unroll_http_request_duration_seconds",
            "HTTP request latency by route template, method and status",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "unroll_queue_depth", "Messages waiting in the dispatch queue, per priority", ["priority"],
            registry=self.registry,
        )
        self.jobs = Gauge("unroll_jobs", "Jobs in the database, per state", ["state"], registry=self.registry)
        self.dispatchers = DispatcherCollector()
        self.registry.register(self.dispatchers)

    async def refresh_dispatchers(self, redis: Any, pattern: str) -> None:
        """Read every live dispatcher heartbeat (keys matching `pattern`); on any Redis
        trouble the dispatcher series are left out of this scrape."""
        try:
            async with asyncio.timeout(HEARTBEAT_READ_TIMEOUT_S):
                keys = [key async for key in redis.scan_iter(match=pattern, count=100)]
                raw = await redis.mget(keys) if keys else []
        except Exception:  # noqa: BLE001 - /readyz reports Redis; metrics just go quiet
            self.dispatchers.beats = []
            return
        beats = []
        for value in raw:
            try:
                beat = json.loads(value)
            except (TypeError, ValueError):
                continue
            if isinstance(beat, dict) and beat.get("dispatcher"):
                beats.append(beat)
        self.dispatchers.beats = beats


class DispatcherCollector:
    """The dispatchers' heartbeats as Prometheus families, each series labelled with its
    dispatcher (host:pid)."""

    def __init__(self) -> None:
        self.beats: list[dict[str, Any]] = []

    def describe(self) -> list[Metric]:
        return []  # families vary with what the dispatchers report; collected at scrape time only

    def collect(self):
        beats = self.beats
        alive = GaugeMetricFamily("unroll_dispatchers", "Dispatchers with a live heartbeat in Redis")
        alive.add_metric([], len(beats))
        yield alive
        last = GaugeMetricFamily(
            "unroll_dispatcher_last_heartbeat_timestamp_seconds", "When each dispatcher last wrote its heartbeat",
            labels=["dispatcher"],
        )
        running = GaugeMetricFamily("unroll_dispatcher_running_attempts", "Attempts each dispatcher runs now", labels=["dispatcher"])
        ray_up = GaugeMetricFamily("unroll_dispatcher_ray_up", "1 when the dispatcher reaches Ray", labels=["dispatcher"])
        families: dict[str, Metric] = {}
        for beat in beats:
            name = str(beat["dispatcher"])
            last.add_metric([name], float(beat.get("ts") or 0.0))
            running.add_metric([name], float(beat.get("running") or 0))
            ray_up.add_metric([name], 1.0 if beat.get("ray") == "ok" else 0.0)
            for family in beat.get("metrics") or []:
                try:
                    metric = families.get(family["name"])
                    if metric is None:
                        metric = families[family["name"]] = Metric(family["name"], family["help"], family["type"])
                    for sample, labels, value in family["samples"]:
                        metric.add_sample(sample, {**labels, "dispatcher": name}, float(value))
                except (KeyError, TypeError, ValueError):
                    continue  # a heartbeat from another version: skip what we cannot read
        yield last
        yield running
        yield ray_up
        yield from families.values()


class LatencyMiddleware:
    """Observes every HTTP request's duration under its route template (not the raw path,
    which would make one series per job id), and logs one JSON line per request that
    changes something (POST, DELETE, ...) or fails with a 5xx, with the job id when the
    route has one. Before a scrape of /metrics it reads the dispatchers' heartbeats."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        ensure_logging()  # the API's `unroll` loggers write JSON lines

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        if scope["path"] == METRICS_PATH:
            runtime = getattr(getattr(scope.get("app"), "state", None), "runtime", None)
            if runtime is not None:
                await self.metrics.refresh_dispatchers(runtime.redis, runtime.keys.dispatcher_heartbeats)

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            elapsed = time.perf_counter() - start
            self.metrics.request_latency.labels(scope["method"], template, str(status)).observe(elapsed)
            if scope["method"] not in ("GET", "HEAD", "OPTIONS") or status >= 500:
                params = scope.get("path_params") or {}
                log.log(
                    logging.WARNING if status >= 500 else logging.INFO,
                    "%s %s %d", scope["method"], template, status,
                    extra={
                        "method": scope["method"], "path": template, "status": status,
                        "duration_ms": round(elapsed * 1000, 2), "job_id": params.get("job_id"),
                        "sweep_id": params.get("sweep_id"),
                    },
                )
