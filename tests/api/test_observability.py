"""The dispatchers' metrics travel in their Redis heartbeats and come out of the API's
/metrics with a `dispatcher` label; log lines are JSON with the job id and attempt."""

from __future__ import annotations

import json
import logging

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.store.logs import JsonFormatter
from service.api.metrics import Metrics
from workers.metrics import DispatcherMetrics


def beat(name: str, metrics: DispatcherMetrics, running: int = 1) -> dict:
    # What Dispatcher._heartbeat writes (through JSON, as Redis carries it).
    return json.loads(json.dumps({"dispatcher": name, "ray": "ok", "running": running, "ts": 1234.5, "metrics": metrics.snapshot()}))


def scrape(metrics: Metrics) -> dict[str, list]:
    families = text_string_to_metric_families(generate_latest(metrics.registry).decode())
    return {f.name: f.samples for f in families}


def test_dispatcher_metrics_render_per_dispatcher():
    a, b = DispatcherMetrics(), DispatcherMetrics()
    a.dispatch_latency.observe(0.02)
    a.dispatch_latency.observe(7.0)
    a.lease_expiries.inc()
    a.retries.labels("lease_expired").inc()
    b.heartbeats.inc(3)
    api = Metrics()
    api.dispatchers.beats = [beat("host-a:1", a), beat("host-b:2", b, running=0)]
    samples = scrape(api)

    def value(family: str, sample: str, **labels) -> float:
        found = [s.value for s in samples[family] if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())]
        assert len(found) == 1, (sample, labels, samples[family])
        return found[0]

    assert value("unroll_dispatchers", "unroll_dispatchers") == 2
    assert value("unroll_dispatch_latency_seconds", "unroll_dispatch_latency_seconds_count", dispatcher="host-a:1") == 2
    assert value("unroll_dispatch_latency_seconds", "unroll_dispatch_latency_seconds_bucket", dispatcher="host-a:1", le="0.025") == 1
    assert value("unroll_dispatch_latency_seconds", "unroll_dispatch_latency_seconds_bucket", dispatcher="host-a:1", le="10.0") == 2
    assert value("unroll_lease_expiries", "unroll_lease_expiries_total", dispatcher="host-a:1") == 1
    assert value("unroll_job_retries", "unroll_job_retries_total", dispatcher="host-a:1", reason="lease_expired") == 1
    assert value("unroll_dispatcher_heartbeats", "unroll_dispatcher_heartbeats_total", dispatcher="host-b:2") == 3
    assert value("unroll_dispatcher_running_attempts", "unroll_dispatcher_running_attempts", dispatcher="host-b:2") == 0
    assert value("unroll_dispatcher_ray_up", "unroll_dispatcher_ray_up", dispatcher="host-a:1") == 1


def test_no_dispatcher_means_no_dispatcher_series_and_bad_beats_are_skipped():
    api = Metrics()
    assert scrape(api)["unroll_dispatchers"][0].value == 0
    api.dispatchers.beats = [{"dispatcher": "odd:1", "metrics": [{"name": "x"}]}]
    assert scrape(api)["unroll_dispatchers"][0].value == 1  # rendered what it could


def test_log_lines_are_json_with_job_and_attempt():
    record = logging.LogRecord("unroll.dispatcher", logging.INFO, __file__, 1, "job %s attempt %d started", ("job_1", 2), None)
    record.job_id, record.attempt, record.worker = "job_1", 2, "host:1"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "job job_1 attempt 2 started"
    assert (line["job_id"], line["attempt"], line["worker"], line["level"]) == ("job_1", 2, "host:1", "info")
