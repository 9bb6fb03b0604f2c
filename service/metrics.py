"""Prometheus metrics of the API: one registry per app (so several apps, e.g. in tests,
never collide), a latency histogram filled by a tiny ASGI middleware, and gauges that are
read from Redis and the database when /metrics is scraped (never on a timer)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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


class LatencyMiddleware:
    """Observes every HTTP request's duration under its route template (not the raw path,
    which would make one series per job id)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

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
            self.metrics.request_latency.labels(scope["method"], template, str(status)).observe(
                time.perf_counter() - start
            )
