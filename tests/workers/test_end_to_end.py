"""Jobs run through real parts: database → Redis queue → `unroll worker` → Ray → trainer →
database. Workers are separate processes, killed with SIGKILL where the test says so."""

from __future__ import annotations

import collections
import json
import re
import signal
import socket
import time

import redis
from trainer.loop import Callback, fit

from service.store.artifacts import ArtifactStore
from service.store.db import repo, states
from service.store.db.models import JobState

TERMINAL = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}


def tiny_config(steps: int = 60, **overrides) -> dict:
    config = {
        "model": {"cell": "lstm", "hidden_size": 16},
        "data": {"kind": "recall", "vocab": 4, "lag": 2, "length": 4000, "batch_size": 4, "valid_length": 64},
        "tbptt": {"k1": 8, "k2": 12},
        "optim": {"lr": 0.01},
        "train": {"max_steps": steps, "eval_every": 20, "checkpoint_every": 20, "seed": 3, "device": "cpu"},
        "resources": {"cpus": 1},
    }
    for key, value in overrides.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return config


class Losses(Callback):
    def __init__(self):
        self.losses = {}

    def on_update(self, step, metrics):
        self.losses[step] = metrics["train/loss"]


def undisturbed_losses(config: dict) -> dict[int, float]:
    rec = Losses()
    fit(config, [rec])
    return rec.losses


def test_submitted_job_succeeds_with_metrics_checkpoints_and_logs(stack):
    stack.start_worker()
    job_id = stack.submit(tiny_config(60))
    job = stack.wait(job_id, TERMINAL)
    assert job.state == JobState.SUCCEEDED, (job.error, stack.worker_logs())
    assert job.attempt == 1 and job.progress == 1.0 and job.step == 60
    assert job.summary["steps"] == 60 and "valid_accuracy" in job.summary
    with stack.sessions.begin() as session:
        series = repo.read_series(session, job_id)
        checkpoints = repo.list_checkpoints(session, job_id)
        logs = [entry.line for entry in repo.read_logs(session, job_id)]
    assert [step for step, _ in series["train/loss"]] == list(range(1, 61))
    assert [step for step, _ in series["valid/accuracy"]] == [20, 40, 60]
    assert {"train/grad_norm", "train/grad_norm_clipped", "system/peak_memory_bytes", "system/wall_s"} <= set(series)
    assert [c.step for c in checkpoints] == [20, 40, 60]
    store = ArtifactStore(str(stack.artifacts))
    assert all(len(store.read_bytes(c.uri)) == c.bytes for c in checkpoints)
    assert any("attempt 1" in line for line in logs) and any(line.startswith("eval @ 60") for line in logs)
    # The run equals the trainer run alone.
    assert stack.losses(job_id) == undisturbed_losses(tiny_config(60))


def test_cancel_stops_a_running_job_and_keeps_its_checkpoints(stack):
    stack.start_worker()
    job_id = stack.submit(tiny_config(100_000, train={"checkpoint_every": 50}))
    stack.wait(job_id, {JobState.RUNNING}, step=120)
    with stack.sessions.begin() as session:
        assert states.request_cancel(session, job_id) == JobState.RUNNING
    job = stack.wait(job_id, TERMINAL, timeout=30)
    assert job.state == JobState.CANCELLED
    with stack.sessions.begin() as session:
        steps = [c.step for c in repo.list_checkpoints(session, job_id)]
    # The periodic ones, then one at the stop; train.keep_checkpoints (3) keeps the newest.
    assert steps[-1] == job.step and len(steps) == 3 and all(step % 50 == 0 for step in steps[:-1]), steps


def test_killed_worker_resumes_with_the_exact_losses_of_an_undisturbed_run(stack):
    config = tiny_config(2000, train={"checkpoint_every": 25, "eval_every": 500})
    first = stack.start_worker()
    job_id = stack.submit(config)
    stack.wait(job_id, {JobState.RUNNING}, step=60)
    first.send_signal(signal.SIGKILL)  # the dispatcher, and with it the Ray tasks it owns
    first.wait()
    stack.start_worker()
    job = stack.wait(job_id, TERMINAL, timeout=180)
    assert job.state == JobState.SUCCEEDED, (job.error, stack.worker_logs())
    assert job.attempt == 2
    outcomes = [(a.number, a.outcome.value if a.outcome else None) for a in _attempts(stack, job_id)]
    assert outcomes == [(1, "lost"), (2, "succeeded")]
    assert stack.losses(job_id) == undisturbed_losses(config)


def test_a_flushed_redis_loses_no_job(private_redis, stack):
    stack.redis_url = private_redis.url
    stack.start_worker()
    ids = [stack.submit(tiny_config(40, train={"seed": i})) for i in range(4)]
    stack.wait(ids[0], {JobState.RUNNING, JobState.SUCCEEDED})
    client = redis.Redis.from_url(private_redis.url)
    client.flushall()  # queued and running jobs both lose their Redis state
    client.close()
    for job_id in ids:
        job = stack.wait(job_id, TERMINAL, timeout=120)
        assert job.state == JobState.SUCCEEDED, (job.error, stack.worker_logs())
        assert job.attempt == 1  # exactly once: never claimed twice
        assert len(_attempts(stack, job_id)) == 1


def test_two_dispatchers_never_run_the_same_attempt(stack):
    procs = [stack.start_worker(), stack.start_worker()]
    # A dispatcher's name is host:pid of its `unroll worker` process (workers.dispatcher).
    names = {f"{socket.gethostname()}:{proc.pid}": i for i, proc in enumerate(procs)}
    ids = [stack.submit(tiny_config(20, train={"seed": i, "eval_every": 0, "checkpoint_every": 0})) for i in range(8)]
    workers = set()
    for job_id in ids:
        job = stack.wait(job_id, TERMINAL, timeout=180)
        assert job.state == JobState.SUCCEEDED, (job.error, stack.worker_logs())
        attempts = _attempts(stack, job_id)
        assert job.attempt == 1 and len(attempts) == 1
        workers.add(attempts[0].worker)
        # Claimed once, by one of the two dispatchers, and ended by that attempt.
        assert attempts[0].number == 1 and attempts[0].worker in names, (attempts[0].worker, names)
        assert attempts[0].outcome is not None and attempts[0].outcome.value == "succeeded"
        # The trainer ran once for it: one start of the attempt in the job's log (each run
        # logs "attempt N on WORKER: ..." when it starts), and every step reported once.
        with stack.sessions.begin() as session:
            lines = [entry.line for entry in repo.read_logs(session, job_id)]
        runs = [line for line in lines if line.startswith("attempt ")]
        assert len(runs) == 1 and runs[0].startswith(f"attempt 1 on {attempts[0].worker}:"), runs
        assert [step for step, _ in sorted(stack.losses(job_id).items())] == list(range(1, 21))
    assert workers <= set(names)
    # Each dispatcher's own log: every job was started (a Ray task submitted) exactly once
    # in all, by the dispatcher that holds its attempt; none by the other.
    started = _started(stack)
    for job_id in ids:
        (worker,) = {a.worker for a in _attempts(stack, job_id)}
        assert started[job_id] == [(names[worker], 1)], (job_id, started[job_id], stack.worker_logs())
    # Which dispatcher takes which job is a race (the one whose task just ended sees the
    # free CPU first), so "both did work" is not asserted: it would be flaky.


def test_bad_config_and_diverging_run_fail_with_their_reasons(stack):
    stack.start_worker()
    missing = stack.submit(tiny_config(data={"kind": "text", "path": "/nonexistent/corpus.txt"}) | {"data": {"kind": "text", "path": "/nonexistent/corpus.txt"}})
    # lr 1e38: the first update takes the weights past float32's range, so the loss of
    # step 2 overflows on any CPU (1e30 only made huge finite losses on some).
    diverging = stack.submit(tiny_config(50, optim={"name": "sgd", "lr": 1e38}, clip={"mode": "none", "on_nonfinite": "fail"}))
    job = stack.wait(missing, TERMINAL)
    assert job.state == JobState.FAILED and "data.path: no such file" in job.error
    assert job.attempt == 1  # a config error is not retried
    job = stack.wait(diverging, TERMINAL)
    assert job.state == JobState.FAILED and "non-finite" in job.error and "step" in job.error
    assert job.attempt == 1


def test_a_job_no_node_can_hold_stays_queued_and_says_why(stack):
    stack.start_worker()
    job_id = stack.submit(tiny_config(resources={"gpus": 1}))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not stack.job(job_id).pending_reason:
        time.sleep(0.2)
    job = stack.job(job_id)
    assert job.state == JobState.QUEUED and job.attempt == 0
    assert "1 GPU" in job.pending_reason and "no node" in job.pending_reason


def _attempts(stack, job_id):
    with stack.sessions.begin() as session:
        return states.list_attempts(session, job_id)


def _started(stack) -> dict[str, list[tuple[int, int]]]:
    """Job id -> (worker index, attempt) of each "job ... attempt N started" line in the
    dispatchers' JSON logs (workers.dispatcher.Dispatcher.place)."""
    started: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
    for index, path in enumerate(stack.logs):
        for line in path.read_text().splitlines():
            if not line.startswith("{"):
                continue  # Ray's own output
            entry = json.loads(line)
            if "job_id" in entry and re.fullmatch(r"job \S+ attempt \d+ started \(.*\)", entry.get("message", "")):
                started[entry["job_id"]].append((index, entry["attempt"]))
    return started
