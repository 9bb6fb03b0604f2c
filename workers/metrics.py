"""The dispatcher's Prometheus metrics, and how they reach a scrape.

A dispatcher runs in its own process, often on another machine than the API. Instead of a
scrape target per dispatcher (whose address Prometheus would have to discover), each
dispatcher puts a snapshot of its metrics into the heartbeat it already writes to Redis
every second (`Keys.dispatcher_heartbeat`, with a TTL); the API's `/metrics` renders every
live heartbeat's snapshot with a `dispatcher` label (`service.api.metrics.DispatcherCollector`).
So one scrape of any API replica shows the whole cluster. A dispatcher that stops takes
its series with it when its key expires, and a new one starts its counters from zero, as
any restarted Prometheus target does (`rate()` and `increase()` handle the reset).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

# Submit → start: milliseconds on an idle cluster, hours behind a long queue.
DISPATCH_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)


class DispatcherMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.dispatch_latency = Histogram(
            "unroll_dispatch_latency_seconds",
            "From a job's submission to the start of its first attempt (time in the queue included)",
            buckets=DISPATCH_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.attempts_started = Counter(
            "unroll_attempts_started", "Attempts claimed and handed to Ray", registry=self.registry
        )
        self.lease_expiries = Counter(
            "unroll_lease_expiries",
            "Running attempts whose lease expired (their worker was lost) and that were taken back",
            registry=self.registry,
        )
        self.retries = Counter(
            "unroll_job_retries",
            "Lost attempts whose job went back to the queue for another attempt",
            ["reason"],
            registry=self.registry,
        )
        self.lease_renewals = Counter(
            "unroll_lease_renewals", "Leases of running attempts renewed by the dispatcher", registry=self.registry
        )
        self.preemptions = Counter(
            "unroll_preemptions",
            "Running attempts asked to stop and hand their slot to a waiting job of higher priority",
            registry=self.registry,
        )
        self.heartbeats = Counter(
            "unroll_dispatcher_heartbeats", "Heartbeats the dispatcher wrote to Redis", registry=self.registry
        )

    def snapshot(self) -> list[dict[str, Any]]:
        """Every family as plain JSON: name, type, help and samples [name, labels, value]."""
        families = []
        for family in self.registry.collect():
            families.append({
                "name": family.name,
                "type": family.type,
                "help": family.documentation,
                "samples": [[s.name, dict(s.labels), s.value] for s in family.samples if not s.name.endswith("_created")],
            })
        return families
