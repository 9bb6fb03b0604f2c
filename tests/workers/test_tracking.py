"""MLflow and TensorBoard tracking (workers/tracking.py) around real training runs: one
MLflow run per job across attempts, params and batched metrics, the right end status, a
tracking server that is down costs the job nothing; TensorBoard event files per job.

MLflow runs against its file store (`file:` URI, fast to create); the callback speaks only
the client API, so its SQLite store or a tracking server behave the same."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from trainer.config import ConfigError, parse_config
from trainer.loop import Callback
from tests.processes import free_port
from workers import tracking

JOB = "job_tracking_test"


def config(steps: int = 12) -> dict:
    return {
        "name": "tracked",
        "tags": ["demo"],
        "model": {"cell": "lstm", "hidden_size": 16},
        "data": {"kind": "recall", "vocab": 4, "lag": 2, "length": 2000, "batch_size": 4},
        "tbptt": {"k1": 8, "k2": 8},
        "train": {"max_steps": steps, "eval_every": 6, "checkpoint_every": 8, "seed": 1, "device": "cpu"},
    }


class Checkpoints(Callback):
    def __init__(self):
        self.saved: dict[int, dict] = {}

    def on_checkpoint(self, step, checkpoint):
        self.saved[step] = checkpoint


class FailAt(Callback):
    def __init__(self, step: int, error: BaseException):
        self.step, self.error = step, error

    def on_update(self, step, metrics):
        if step == self.step:
            raise self.error


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory):
    """One store for the module (creating MLflow's schema takes seconds); tests use
    their own job ids."""
    pytest.importorskip("mlflow", reason="mlflow (or mlflow-skinny) is not installed: pip install mlflow-skinny")
    from mlflow.tracking import MlflowClient

    # MLflow's file store: no schema to create. (It is in maintenance mode, so MLflow asks
    # for an explicit opt-in; the callback speaks only the client API, as to a server.)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = (tmp_path_factory.mktemp("mlflow") / "mlruns").as_uri()
        MlflowClient(tracking_uri=uri).create_experiment("unroll-tests")
        yield uri


@pytest.fixture
def mlflow_uri(mlflow_store: str, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = mlflow_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "unroll-tests")
    monkeypatch.delenv("UNROLL_TENSORBOARD_DIR", raising=False)
    return uri


def the_run(uri: str, job_id: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("unroll-tests")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`unroll.job_id` = '{job_id}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]  # one run per job, whatever the attempts
    return client, runs[0]


@pytest.mark.slow
def test_mlflow_one_run_per_job_across_attempts(mlflow_uri: str):
    # Attempt 1 is lost at step 10 (an infrastructure failure): its run stays open.
    saved = Checkpoints()
    with pytest.raises(RuntimeError):
        tracking.fit(JOB, 1, parse_config(config()), [saved, FailAt(10, RuntimeError("node lost"))])
    assert sorted(saved.saved) == [8]
    client, run = the_run(mlflow_uri, JOB)
    assert run.info.status == "RUNNING"

    # Attempt 2 resumes from the checkpoint and finishes the same run.
    summary = tracking.fit(JOB, 2, parse_config(config()), [], resume=saved.saved[8])
    assert summary.steps == 12
    client, run = the_run(mlflow_uri, JOB)
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    params = run.data.params
    assert params["model.cell"] == "lstm" and params["tbptt.k1"] == "8" and params["train.max_steps"] == "12"
    assert run.data.tags["unroll.attempt"] == "2" and run.data.tags["unroll.tag.demo"] == "1"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert {m.step for m in losses} == set(range(1, 13))
    assert {m.step for m in client.get_metric_history(run.info.run_id, "valid/accuracy")} == {6, 12}
    assert "train/grad_norm" in run.data.metrics and "system/wall_s" in run.data.metrics


@pytest.mark.slow
def test_mlflow_run_ends_failed_on_a_job_error_and_killed_on_cancel(mlflow_uri: str):
    with pytest.raises(ConfigError):
        tracking.fit("job_fails", 1, parse_config(config()), [FailAt(3, ConfigError([("train.max_steps", "boom")]))])
    assert the_run(mlflow_uri, "job_fails")[1].info.status == "FAILED"

    class Cancel(Callback):
        def should_stop(self):
            return True

    assert tracking.fit("job_cancelled", 1, parse_config(config()), [Cancel()]).stopped == "cancelled"
    assert the_run(mlflow_uri, "job_cancelled")[1].info.status == "KILLED"


def test_a_tracking_server_that_is_down_costs_the_job_nothing(monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("mlflow", reason="mlflow (or mlflow-skinny) is not installed")
    port = free_port()  # nothing listens here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    trackers = tracking.for_job("job_down", 1, config(6))
    assert len(trackers) == 1
    start = time.monotonic()
    from trainer.loop import fit

    summary = fit(config(6), trackers)
    assert summary.steps == 6 and summary.stopped == "completed"
    assert time.monotonic() - start < 60
    assert trackers[0].failed


def test_no_tracking_configured_means_no_trackers(monkeypatch: pytest.MonkeyPatch):
    for name in ("MLFLOW_TRACKING_URI", "UNROLL_TENSORBOARD_DIR"):
        monkeypatch.delenv(name, raising=False)
    assert tracking.for_job("job_x", 1, config()) == []
    assert tracking.for_job("job_x", 1, config(), env={"MLFLOW_TRACKING_URI": ""}) == []


def test_flatten_config_to_dotted_params():
    assert tracking.flatten({"tbptt": {"k1": 24, "k2": 24}, "tags": ["a"], "priority": 0}) == {
        "tbptt.k1": "24", "tbptt.k2": "24", "tags": "['a']", "priority": "0",
    }


def test_tensorboard_event_files_per_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("UNROLL_TENSORBOARD_DIR", str(tmp_path / "tb"))
    tracking.fit("job_tb", 1, parse_config(config(12)), [])
    events = EventAccumulator(str(tmp_path / "tb" / "job_tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 13))
    assert [e.step for e in events.Scalars("valid/accuracy")] == [6, 12]
