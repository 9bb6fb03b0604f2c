"""What every attempt of a job shares, whether it runs in one process (workers/runner.py) or
as a data-parallel group (workers/ddp.py): what the dispatcher passes to the Ray task, what
the attempt reads before training, and how its outcome is written.

Everything the attempt needs is passed in explicitly (`AttemptSpec`): a Ray worker does not
share the dispatcher's environment. The outcome is written by the attempt itself, fenced
by its number (its `state` event is published by that commit: workers.reporter); what it
cannot decide (a crash, a lost node) is left to the dispatcher, which sees the Ray task
fail, or to the lease, which expires.

An attempt that reserves no GPU (`resources.gpus: 0`) sees none (`gpus_as_reserved`):
Ray no longer hides GPUs from tasks that reserve none, and a job on a GPU that Ray gave to
another would take its memory and time. One that reserves GPUs, whole or a fraction, runs
on the first GPU Ray assigned to its task (`pin_assigned_gpu`), also in a worker process
whose CUDA started for an earlier task.
"""

from __future__ import annotations

import logging
import os
import tempfile
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import redis
import torch
from sqlalchemy.orm import Session, sessionmaker

from service.store.artifacts import ArtifactStore
from service.store.db import early_stop, repo, states
from service.store.db.errors import NotFound
from service.store.db.session import make_engine
from service.store.keys import DEFAULT_PREFIX
from service.store.lifecycle import JobState
from trainer import checkpoint as ckpt
from trainer.config import ConfigError, JobConfig, parse_config
from trainer.loop import Callback, NonFiniteError, Summary
from workers.reporter import Attempt, AttemptStale, JobReporter

log = logging.getLogger("unroll.attempt")

# Failures of the job itself: retrying cannot help, so the job fails at once.
JOB_ERRORS = (ConfigError, NonFiniteError)


@dataclass(frozen=True)
class AttemptSpec:
    job_id: str
    attempt: int
    worker: str
    database_url: str
    redis_url: str
    artifacts: str
    lease_seconds: float
    prefix: str = DEFAULT_PREFIX
    max_params: int | None = None  # UNROLL_MAX_PARAMS, checked on the model as built


@dataclass(frozen=True)
class ParameterCap(Callback):
    """Refuse, before the first step, a model larger than the service allows. The API checks
    the config's size before it accepts a job, but a text job's vocabulary is known only
    once its data is read: this checks the model as built (a job error: it fails, not retried)."""

    max_params: int

    def on_start(self, info: dict[str, Any]) -> None:
        if info["parameters"] > self.max_params:
            raise ConfigError([(
                "model",
                f"the model has {info['parameters']:,} parameters with its data's vocabulary; this service allows"
                f" at most {self.max_params:,} (UNROLL_MAX_PARAMS)",
            )])


def service_checks(spec: AttemptSpec) -> tuple[Callback, ...]:
    """The callbacks every attempt runs before its own: the service's rules on the built model."""
    return (ParameterCap(spec.max_params),) if spec.max_params is not None else ()


# Where a process looks for GPUs: CUDA's list of visible devices, and how torch counts them
# before CUDA is initialised (by NVML, honouring that list, so asking initialises nothing).
HIDDEN_GPUS = {"CUDA_VISIBLE_DEVICES": "", "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}


@contextmanager
def gpus_as_reserved(config: JobConfig) -> Iterator[JobConfig]:
    """Run an attempt with the GPUs it reserved, and no other. With `resources.gpus: 0`
    this process's GPUs are hidden until the attempt ends (then restored: Ray reuses the
    process for later tasks, which may reserve GPUs), and `train.device: auto` means cpu.
    Hiding happens before anything asks torch about CUDA, and never initialises CUDA, so a
    later task of this process still finds the GPUs Ray gives it. Yields the config to train."""
    if config.resources.gpus > 0:
        pin_assigned_gpu()
        try:
            yield config
        finally:
            if torch.cuda.is_initialized():  # give back the allocator's cache: the next task may get another GPU
                torch.cuda.empty_cache()
        return
    saved = {name: os.environ.get(name) for name in HIDDEN_GPUS}
    os.environ.update(HIDDEN_GPUS)
    try:
        if config.train.device == "auto":
            config = config.model_copy(update={"train": config.train.model_copy(update={"device": "cpu"})})
        yield config
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# CUDA reads CUDA_VISIBLE_DEVICES once, when it starts in a process, and numbers the GPUs
# of that list for good; Ray sets the variable anew for each task of a reused process.
# Noted by the first attempt with GPUs, before anything of it touches CUDA.
_cuda_numbering: list[str | None] = []


def cuda_ordinal(assigned: list[str], numbering: str | None) -> int:
    """torch's index of the first GPU of `assigned` (Ray's ids, as CUDA_VISIBLE_DEVICES names
    them) when CUDA started with CUDA_VISIBLE_DEVICES = `numbering` (None: unset, every
    GPU of the node by its index). A fraction of a GPU is one id."""
    if numbering is None:
        return int(assigned[0])
    visible = [name.strip() for name in numbering.split(",") if name.strip()]
    if assigned[0] not in visible:
        raise RuntimeError(
            f"GPU {assigned[0]} was assigned to this task, but this worker process started CUDA with"
            f" CUDA_VISIBLE_DEVICES={numbering!r} and cannot reach it"
        )
    return visible.index(assigned[0])


def assigned_gpus() -> list[str]:
    """The GPU ids Ray assigned to the running task or actor; [] outside Ray."""
    import ray

    if not ray.is_initialized():
        return []
    return [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]


def pin_assigned_gpu() -> int | None:
    """Make the first GPU Ray assigned this process's current CUDA device (`train.device:
    cuda`, and `auto` on a GPU, train there); its index, or None when there is nothing to pin
    (outside Ray, or no GPU visible)."""
    if not _cuda_numbering:
        _cuda_numbering.append(os.environ.get("CUDA_VISIBLE_DEVICES"))
    assigned = assigned_gpus()
    if not assigned or not torch.cuda.is_available():
        return None
    index = cuda_ordinal(assigned, _cuda_numbering[0])
    torch.cuda.set_device(index)
    return index


@lru_cache(maxsize=4)
def sessions_for(database_url: str) -> sessionmaker[Session]:
    # One engine per worker process and database, reused by every attempt it runs.
    return sessionmaker(make_engine(database_url, pool_size=2, max_overflow=2), expire_on_commit=False)


@lru_cache(maxsize=4)
def redis_for(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


@dataclass
class OpenedAttempt:
    """What an attempt reads before training: its job config, its latest checkpoint, and
    how to find uploaded datasets."""

    attempt: Attempt
    config: JobConfig  # parsed once here, passed on typed to the trainer
    project_id: str
    latest_uri: str | None

    def load_checkpoint(self) -> dict[str, Any] | None:
        store = self.attempt.store
        return ckpt.from_bytes(store.read_bytes(self.latest_uri)) if self.latest_uri else None

    def evaluated_checkpoint(self) -> Path:
        """`kind: evaluate`: the local file of the checkpoint it names (of a job of the
        same project); ConfigError (the job's own failure) when it is gone."""
        target = self.config.evaluate
        assert target is not None and target.step is not None  # the API pins the step
        with self.attempt.sessions.begin() as session:
            try:
                repo.get_job(session, target.job, self.project_id)
                uri = repo.get_checkpoint(session, target.job, target.step).uri
            except NotFound:
                raise ConfigError([("evaluate.step", f"job {target.job} has no checkpoint at step {target.step} any more (deleted or pruned)")]) from None
        return self.attempt.store.local_path(uri, Path(tempfile.gettempdir()) / "unroll-models")

    def resolve(self, dataset_id: str) -> Path:
        with self.attempt.sessions.begin() as session:
            uri = repo.get_dataset(session, dataset_id, project_id=self.project_id).uri
        return self.attempt.store.local_path(uri, Path(tempfile.gettempdir()) / "unroll-datasets")


def open_attempt(spec: AttemptSpec) -> OpenedAttempt:
    sessions = sessions_for(spec.database_url)
    attempt = Attempt(
        job_id=spec.job_id, number=spec.attempt, worker=spec.worker, sessions=sessions, store=ArtifactStore(spec.artifacts),
        redis=redis_for(spec.redis_url), prefix=spec.prefix, lease_seconds=spec.lease_seconds,
    )
    with sessions.begin() as session:
        job = repo.get_job(session, spec.job_id)
        latest = repo.latest_checkpoint(session, spec.job_id)
        raw, project_id, latest_uri = job.config, job.project_id, latest.uri if latest else None
    try:
        config = parse_config(raw)
    except ConfigError as exc:  # a config this version no longer accepts: the job's own failure
        raise AttemptEnded(train_attempt(JobReporter(attempt), _raise(exc))) from None
    return OpenedAttempt(attempt, config, project_id, latest_uri)


class AttemptEnded(Exception):
    """open_attempt already wrote the attempt's outcome (its config is invalid)."""

    def __init__(self, outcome: str):
        super().__init__(outcome)
        self.outcome = outcome


def _raise(exc: Exception) -> Callable[[], Summary]:
    def train() -> Summary:
        raise exc

    return train


def train_attempt(reporter: JobReporter, train: Callable[[], Summary]) -> str:
    """Train, and write the attempt's outcome (fenced by its number). Its claim announced
    it already (the dispatcher's `running` event)."""
    try:
        summary = train()
    except JOB_ERRORS as exc:
        return _finish(reporter, JobState.FAILED, error=str(exc))
    except Exception:
        reporter.log(traceback.format_exc(), level="error")
        try:
            reporter.close()
        except Exception:  # noqa: BLE001 - the original failure is the one to report
            pass
        raise
    if reporter.stale:
        reporter.abandon()
        return "stale"
    if summary.stopped == "time limit":  # a final checkpoint was written: a retry resumes there
        error = f"time limit: train.max_wall_s used up at step {summary.steps}"
        return _finish(reporter, JobState.FAILED, error=error, summary=summary)
    state = JobState.CANCELLED if summary.stopped == "cancelled" else JobState.SUCCEEDED
    return _finish(reporter, state, summary=summary)


def _summary(summary: Summary | None, model: dict[str, Any] | None) -> dict[str, Any] | None:
    """The job's stored summary: the trainer's, with the model artifact's record (`model`)."""
    if summary is None:
        return None
    return {**summary.to_dict(), **({"model": model} if model is not None else {})}


def _decide_sweep(session: Session, job_id: str) -> None:
    """A sweep trial ended: its early stopping decides in the transaction that ends it
    (service.store.db.early_stop.advance), so that the sweep never reads finished while a
    paused trial is about to go on. A failing decision (a savepoint) does not cost the
    outcome: the dispatcher decides again after the attempt, the reconciler later."""
    try:
        with session.begin_nested():
            early_stop.advance(session, job_id)
    except Exception as exc:  # noqa: BLE001 - the outcome stands; the decision is repeated
        log.warning("job %s: its sweep's early stopping not decided, left to the dispatcher: %s", job_id, exc)


def _finish(reporter: JobReporter, state: JobState, *, error: str | None = None, summary=None) -> str:
    attempt = reporter.attempt
    if error:
        reporter.log(f"failed: {error}", level="error")
    finished: list[bool] = []

    def finish(session) -> None:
        finished.append(states.finish(
            session, attempt.job_id, attempt.number, state, error,
            summary=_summary(summary, reporter.model),
        ))
        if finished[0]:
            _decide_sweep(session, attempt.job_id)

    try:
        # The last metrics, logs and checkpoint and the outcome: one transaction.
        reporter.close(summary, then=finish)
    except AttemptStale:
        return "stale"
    if not finished or not finished[0]:
        return "stale"
    return state.value
