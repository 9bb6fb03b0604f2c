"""What an attempt sends and sees, run in this process as a Ray worker would run it (no Ray):
its log, metrics and progress events reach the job's stream as they are stored, before its
final state; and an attempt that reserves no GPU sees none (restored for the next task)."""

from __future__ import annotations

import os

import pytest
import redis
import torch

from service.store import events
from service.store.db import repo, states
from service.store.keys import Keys
from trainer.config import parse_config
from workers import runner
from workers.attempt import HIDDEN_GPUS, AttemptSpec, gpus_as_reserved
from workers.reporter import LiveMetrics

pytestmark = pytest.mark.redis

CONFIG = {
    "model": {"hidden_size": 16},
    "data": {"kind": "recall", "vocab": 4, "lag": 2, "length": 4000, "batch_size": 4, "valid_length": 64},
    "tbptt": {"k1": 8},
    "train": {"max_steps": 40, "eval_every": 20, "checkpoint_every": 20},
    "resources": {"cpus": 1, "gpus": 0},
}


def run_here(stack, config: dict) -> tuple[str, str]:
    """Claim a job and run its attempt in this process; (job id, outcome)."""
    job_id = stack.submit(config, enqueue=False)
    with stack.sessions.begin() as session:
        assert states.claim(session, job_id, "here", lease_seconds=60) == 1
    spec = AttemptSpec(job_id=job_id, attempt=1, worker="here", database_url=stack.database_url,
                       redis_url=stack.redis_url, artifacts=str(stack.artifacts), lease_seconds=60, prefix=stack.prefix)
    return job_id, runner.run_attempt(spec)


def stream_of(stack, job_id: str) -> list[dict]:
    client = redis.Redis.from_url(stack.redis_url)
    try:
        return [events.decode(fields) for _, fields in client.xrange(Keys(stack.prefix).job_events(job_id))]
    finally:
        client.close()


def test_an_attempt_sends_what_it_stores_and_then_its_final_state(stack):
    job_id, outcome = run_here(stack, CONFIG)
    assert outcome == "succeeded"
    sent = stream_of(stack, job_id)
    assert sent[-1]["type"] == "state" and (sent[-1]["state"], sent[-1]["attempt"], sent[-1]["transition"]) == ("succeeded", 1, "finish")
    assert [e for e in sent if e["type"] == "state"] == [sent[-1]]  # its claim was made without a publisher
    with stack.sessions.begin() as session:
        stored = repo.read_logs(session, job_id)
        last = repo.last_metrics(session, job_id)
    lines = [line for e in sent if e["type"] == "log" for line in e["lines"]]
    assert [(line["line"], line["level"]) for line in lines] == [(row.line, row.level) for row in stored]
    metrics = [e for e in sent if e["type"] == "metrics"]
    assert metrics and all(e["attempt"] == 1 for e in metrics)
    latest: dict[str, tuple[int, float | None]] = {}
    for event in metrics:  # together, the latest value of every series, as stored
        latest.update({name: (event["steps"][name], value) for name, value in event["values"].items()})
    assert latest == {name: (step, value) for name, (step, value) in last.items()}
    progress = [e["step"] for e in sent if e["type"] == "progress"]
    assert progress == sorted(progress) and progress[-1] == 40


def test_metrics_events_keep_the_latest_value_of_each_series_at_most_every_interval():
    now = [100.0]
    live = LiveMetrics(every_s=0.5, clock=lambda: now[0])
    assert live.due() is None  # nothing yet
    live.add([repo.MetricPoint("train/loss", 1, 2.0), repo.MetricPoint("train/loss", 2, 1.5), repo.MetricPoint("valid/loss", 2, 1.7)])
    first = live.due()
    assert first == {"type": "metrics", "step": 2, "values": {"train/loss": 1.5, "valid/loss": 1.7}, "steps": {"train/loss": 2, "valid/loss": 2}}
    live.sent()
    live.add([repo.MetricPoint("train/loss", 3, 1.4)])
    now[0] += 0.2
    assert live.due() is None  # too soon: it waits, and keeps merging
    live.add([repo.MetricPoint("train/loss", 4, None)])
    assert live.due(final=True)["values"] == {"train/loss": None}  # the attempt's end is never held back
    now[0] += 0.3
    assert live.due() == {"type": "metrics", "step": 4, "values": {"train/loss": None}, "steps": {"train/loss": 4}}


def test_an_attempt_without_a_gpu_sees_none_and_trains_on_cpu(stack, monkeypatch):
    # As in a Ray worker process on a GPU node, which Ray no longer hides GPUs from.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK", raising=False)
    seen: list[dict] = []
    fit = runner.tracking.fit

    def spy(job_id, attempt, config, callbacks, **kwargs):
        seen.append({
            "env": {name: os.environ.get(name) for name in HIDDEN_GPUS},
            "device": config.train.device,
            "cuda": torch.cuda.is_available(),
        })
        return fit(job_id, attempt, config, callbacks, **kwargs)

    monkeypatch.setattr(runner.tracking, "fit", spy)
    job_id, outcome = run_here(stack, CONFIG)
    assert outcome == "succeeded"
    assert seen == [{"env": {"CUDA_VISIBLE_DEVICES": "", "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}, "device": "cpu", "cuda": False}]
    assert stack.job(job_id).summary["device"] == "cpu"
    # restored for the next task of this (reused) process
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0" and "PYTORCH_NVML_BASED_CUDA_CHECK" not in os.environ

    # an attempt that reserves a GPU keeps the devices Ray gave it
    seen.clear()
    _, outcome = run_here(stack, {**CONFIG, "resources": {"cpus": 1, "gpus": 1}})
    assert outcome == "succeeded"
    assert seen[0]["env"] == {"CUDA_VISIBLE_DEVICES": "0", "PYTORCH_NVML_BASED_CUDA_CHECK": None}
    assert seen[0]["device"] == "auto"


def test_hidden_gpus_come_back_even_when_the_attempt_raises(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    config = parse_config(CONFIG)
    with pytest.raises(RuntimeError), gpus_as_reserved(config) as inside:
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and inside.train.device == "cpu"
        raise RuntimeError("the attempt failed")
    assert "CUDA_VISIBLE_DEVICES" not in os.environ and config.train.device == "auto"  # the job's own config is untouched
    explicit = parse_config({**CONFIG, "train": {**CONFIG["train"], "device": "cpu"}})
    with gpus_as_reserved(explicit) as inside:
        assert inside is explicit
