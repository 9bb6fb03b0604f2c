"""Experiment tracking where users already look: MLflow and TensorBoard, as trainer callbacks.

`fit(job_id, attempt, config, callbacks, **kwargs)` is the trainer's `fit` with the
trackers that this process's environment asks for (on a cluster, the Ray node's
environment: jobs run there), from `for_job`:

- `MLFLOW_TRACKING_URI` set (and `mlflow` or `mlflow-skinny` installed): `MlflowTracker`.
  One MLflow run per job, tagged `unroll.job_id`, in the experiment `MLFLOW_EXPERIMENT_NAME`
  (default `unroll`); a later attempt of the job continues the same run, so its curves stay
  one. Params are the job config flattened to dotted keys (`tbptt.k1`); metrics are every
  per-update and per-evaluation value, sent in batches (`log_batch`) by a background
  thread, so the training loop never waits for the tracking server. The run ends FINISHED,
  or KILLED when the job was cancelled.
- `UNROLL_TENSORBOARD_DIR` set: `TensorBoardTracker` writes event files under
  `<dir>/<job id>/` (a local or shared path; needs the `tensorboard` package).

Tracking is a copy, never the record (the database is): a tracker that fails logs one
warning and stops tracking; the job goes on.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

from service.store import sweeps
from trainer import loop
from trainer.config import ConfigError, JobConfig, config_dict
from trainer.loop import Callback, NonFiniteError, Summary

log = logging.getLogger("unroll.worker")

DEFAULT_EXPERIMENT = "unroll"
JOB_TAG = "unroll.job_id"
FLUSH_EVERY_S = 2.0
# MLflow's limits per log_batch call, and on a param's value.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_CHARS = 6000
# At the end, how long the last flush may hold the attempt before the rest is dropped.
CLOSE_TIMEOUT_S = 30.0
# Points kept while the tracking server is slow; beyond that the oldest are dropped.
MAX_BUFFERED = 200_000


def fit(job_id: str, attempt: int, config: JobConfig, callbacks: list[Callback], **kwargs: Any) -> Summary:
    """`trainer.loop.fit` with the job's trackers after `callbacks`. When training raises,
    the trackers are closed: an MLflow run ends FAILED for a job error, and stays open for
    the next attempt after an infrastructure failure."""
    trackers = for_job(job_id, attempt, config_dict(config))
    try:
        return loop.fit(config, [*callbacks, *trackers], **kwargs)
    except BaseException as exc:
        for tracker in trackers:
            tracker.abort(failed=isinstance(exc, (ConfigError, NonFiniteError)))
        raise


def for_job(job_id: str, attempt: int, config: dict[str, Any], env: dict[str, str] | None = None) -> list[Callback]:
    env = os.environ if env is None else env
    trackers: list[Callback] = []
    if env.get("MLFLOW_TRACKING_URI"):
        try:
            import mlflow  # noqa: F401
        except ImportError:
            log.warning("MLFLOW_TRACKING_URI is set but mlflow is not installed: job %s is not tracked", job_id)
        else:
            experiment = env.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
            trackers.append(MlflowTracker(env["MLFLOW_TRACKING_URI"], experiment, job_id, attempt, config))
    if env.get("UNROLL_TENSORBOARD_DIR"):
        try:
            trackers.append(TensorBoardTracker(env["UNROLL_TENSORBOARD_DIR"], job_id, attempt, config))
        except ImportError:
            log.warning("UNROLL_TENSORBOARD_DIR is set but tensorboard is not installed: no event files for job %s", job_id)
    return trackers


def flatten(config: dict[str, Any]) -> dict[str, str]:
    """{"tbptt": {"k1": 24}} -> {"tbptt.k1": "24"}: the config's leaves as parameter text."""
    return {path: str(value)[:MAX_PARAM_CHARS] for path, value in sweeps.flatten(config).items()}


class MlflowTracker(Callback):
    """One job's MLflow run. Every call to the server happens on the tracker's thread."""

    def __init__(self, tracking_uri: str, experiment: str, job_id: str, attempt: int, config: dict[str, Any]):
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.job_id, self.attempt, self.config = job_id, attempt, config
        self.run_id: str | None = None
        self.failed = False
        self._lock = threading.Lock()
        self._points: list[tuple[str, float, int, int]] = []  # name, value, ms, step
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._status: str | None = None
        self._wake = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"mlflow-{job_id}", daemon=True)
        self._thread.start()

    # -- callbacks (training thread: buffer only) ------------------------------------------

    def on_start(self, info: dict[str, Any]) -> None:
        with self._lock:
            self._tags.update({"unroll.attempt": str(self.attempt), "unroll.device": str(info.get("device"))})
            self._params["parameters"] = str(info.get("parameters"))

    def on_update(self, step: int, metrics: dict[str, float | None]) -> None:
        self._add(step, metrics)

    def on_eval(self, step: int, metrics: dict[str, float | None]) -> None:
        self._add(step, metrics)

    def on_end(self, summary: Summary) -> None:
        self._add(summary.steps, {"system/peak_memory_bytes": float(summary.peak_memory_bytes), "system/wall_s": summary.wall_s})
        self.close("KILLED" if summary.stopped == "cancelled" else "FINISHED")

    def _add(self, step: int, metrics: dict[str, float | None]) -> None:
        if self.failed:
            return
        now = int(time.time() * 1000)
        with self._lock:
            for name, value in metrics.items():
                # Non-finite values are kept as NaN (SPEC §3: never dropped silently).
                self._points.append((name, float("nan") if value is None else float(value), now, step))
            if len(self._points) > MAX_BUFFERED:
                del self._points[: len(self._points) - MAX_BUFFERED]

    def abort(self, failed: bool) -> None:
        # A job error ends the run FAILED; after an infrastructure failure the run stays
        # open for the next attempt. Either way the attempt's last metrics are sent first
        # (within CLOSE_TIMEOUT_S): the next attempt resumes from a checkpoint and never
        # recomputes the steps before it, so only this attempt can log them.
        self.close("FAILED" if failed else None)

    def close(self, status: str | None = None) -> None:
        """Send what is left and end the run with `status` (None: leave it running, for a
        later attempt to continue). Waits at most CLOSE_TIMEOUT_S."""
        self._status = status
        self._done.set()
        self._wake.set()
        self._thread.join(CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            log.warning("job %s: MLflow did not take the last metrics within %.0fs", self.job_id, CLOSE_TIMEOUT_S)

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=self.tracking_uri)
            self.run_id = self._open_run(client)
            while not self._done.is_set():
                self._wake.wait(FLUSH_EVERY_S)
                self._wake.clear()
                self._flush(client)
            self._flush(client)
            if self._status:
                client.set_terminated(self.run_id, status=self._status)
        except Exception as exc:  # noqa: BLE001 - tracking never fails a job
            self.failed = True
            with self._lock:
                self._points.clear()
            log.warning("job %s: MLflow tracking at %s stopped: %s", self.job_id, self.tracking_uri, exc)

    def _open_run(self, client) -> str:
        from mlflow.exceptions import MlflowException

        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(self.experiment)
            except MlflowException:  # another job created it meanwhile
                experiment_id = client.get_experiment_by_name(self.experiment).experiment_id
        else:
            experiment_id = experiment.experiment_id
        found = client.search_runs([experiment_id], filter_string=f"tags.`{JOB_TAG}` = '{self.job_id}'", max_results=1)
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
        else:
            run_id = client.create_run(experiment_id, run_name=self.config.get("name") or self.job_id, tags={JOB_TAG: self.job_id}).info.run_id
        # Every attempt logs them (the same values again are accepted): an attempt lost
        # before its first flush must not leave the run without its config.
        with self._lock:
            self._params.update(flatten({k: v for k, v in self.config.items() if k not in ("name", "tags")}))
            for tag in self.config.get("tags") or []:
                self._tags[f"unroll.tag.{tag}"] = "1"
        return run_id

    def _flush(self, client) -> None:
        from mlflow.entities import Metric, Param, RunTag

        with self._lock:
            points, self._points = self._points, []
            params, self._params = self._params, {}
            tags, self._tags = self._tags, {}
        items = list(params.items())
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i : i + MAX_PARAMS_PER_BATCH]])
        if tags:
            client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        for i in range(0, len(points), MAX_METRICS_PER_BATCH):
            batch = points[i : i + MAX_METRICS_PER_BATCH]
            client.log_batch(self.run_id, metrics=[Metric(name, value, ms, step) for name, value, ms, step in batch])


class TensorBoardTracker(Callback):
    """Event files under <dir>/<job id>/ (one file per attempt; TensorBoard shows them as
    one run). The writer queues events and writes them on its own thread."""

    def __init__(self, directory: str, job_id: str, attempt: int, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(directory) / job_id
        self.writer = SummaryWriter(log_dir=str(self.log_dir), filename_suffix=f".attempt{attempt}")
        self.attempt, self.config = attempt, config

    def on_start(self, info: dict[str, Any]) -> None:
        if info.get("start_step", 0) == 0:
            lines = [f"    {k}: {v}" for k, v in flatten(self.config).items()]
            self.writer.add_text("config", "\n".join(lines))

    def on_update(self, step: int, metrics: dict[str, float | None]) -> None:
        self._add(step, metrics)

    def on_eval(self, step: int, metrics: dict[str, float | None]) -> None:
        self._add(step, metrics)

    def _add(self, step: int, metrics: dict[str, float | None]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, math.nan if value is None else value, step)

    def on_end(self, summary: Summary) -> None:
        self.writer.close()

    def abort(self, failed: bool) -> None:
        self.writer.close()
