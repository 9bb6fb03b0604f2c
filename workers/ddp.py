"""Data-parallel jobs (`resources.workers` > 1) on Ray Train's TorchTrainer.

Each of the N ranks runs the engine's own loop on its block of the streams
(trainer/distributed.py: gradients summed before clipping, so the group trains as one
process with every stream would). Gloo on CPUs, NCCL on GPUs; one bundle of
`resources.cpus` CPUs and `resources.gpus` GPUs per rank, reserved all at once by Ray
Train's placement group.

Only rank 0 writes: it owns the attempt's `JobReporter` (metrics, logs, progress, lease,
checkpoints, the final state — all fenced by the attempt number). Checkpoints are gathered
to rank 0 and hold every rank's carried state; at start, rank 0 reads the latest one and
sends it to the others, and each takes its block.

A lost rank: Ray Train's FailureConfig restarts the whole group (up to `MAX_RESTARTS`
times) within the same attempt; the new group resumes from the last checkpoint. If the
group keeps failing, `fit` raises, the Ray task fails, and the dispatcher retries the job
as a new attempt, from the same checkpoint. Either way the job ends as an undisturbed run
would, since a resume continues the same trajectory.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed

from service.store.db import repo
from trainer.config import JobConfig
from trainer.distributed import GroupCallbacks, Sync
from trainer.loop import Callback, Summary, fit
from workers.attempt import JOB_ERRORS, AttemptSpec, gpus_as_reserved, open_attempt, service_checks, sessions_for, train_attempt
from workers.reporter import JobReporter

MAX_RESTARTS = 2  # group restarts inside one attempt before the attempt itself fails
RANKS_LINE = "data-parallel ranks (host:pid): "  # rank 0 logs it at each start of the group


def rank_pids(log_lines: list[str]) -> list[list[int]]:
    """Each start of a group in a job's log: its ranks' PIDs, by rank."""
    return [[int(part.rsplit(":", 1)[1]) for part in line.removeprefix(RANKS_LINE).split()]
            for line in log_lines if line.startswith(RANKS_LINE)]


class Sink(Protocol):
    """Where rank 0 reads the checkpoint to resume from and writes what the group reports."""

    def train_rank0(self, train: "RankTrainer") -> None: ...
    def train_other(self, train: "RankTrainer") -> None: ...


@dataclass
class RankTrainer:
    """What every rank runs: the shared start (checkpoint sent from rank 0), then `fit`."""

    config: JobConfig
    sync: Sync
    extra: tuple[Callback, ...] = ()

    def __call__(self, callbacks: list[Callback], resume: dict[str, Any] | None, resolve=None, log=None) -> Summary:
        ranks = [None] * self.sync.world
        torch.distributed.all_gather_object(ranks, f"{socket.gethostname()}:{os.getpid()}")
        if log is not None:  # which processes hold the ranks: for operators (and tests)
            log(RANKS_LINE + " ".join(ranks))
        state = self.sync.broadcast_object(resume)
        local = self.sync.local_checkpoint(state)
        del state
        return fit(self.config, [GroupCallbacks(self.sync, callbacks), *self.extra], resume=local, resolve=resolve, sync=self.sync)


# -- sinks ------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobSink:
    """The service's: the attempt's database rows and artifact store (workers/runner.py)."""

    spec: AttemptSpec

    def train_rank0(self, train: RankTrainer) -> None:
        job = open_attempt(self.spec)
        reporter = JobReporter(job.attempt)
        train_attempt(reporter, lambda: train([reporter], job.load_checkpoint(), job.resolve, reporter.log))

    def train_other(self, train: RankTrainer) -> None:
        job = open_attempt(self.spec)  # reads only: the config's datasets
        try:
            train([], None, job.resolve)
        except JOB_ERRORS:
            pass  # the same error happens on rank 0, which records it


# -- the group --------------------------------------------------------------------------


def _rank_main(loop_config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker: the process group is up when this starts. A rank
    that reserves no GPU sees none (workers.attempt.gpus_as_reserved)."""
    with gpus_as_reserved(loop_config["config"]) as config:
        if torch.cuda.is_available():
            import ray.train.torch

            torch.cuda.set_device(ray.train.torch.get_device())
        torch.set_num_threads(max(1, int(loop_config["threads"])))
        sync = Sync()
        train = RankTrainer(config, sync, tuple(loop_config.get("extra", ())))
        sink: Sink = loop_config["sink"]
        (sink.train_rank0 if sync.rank == 0 else sink.train_other)(train)


def train_group(
    config: JobConfig, sink: Sink, *, name: str, storage: str | None = None,
    max_restarts: int = MAX_RESTARTS, extra: tuple[Callback, ...] = (),
) -> None:
    """Run a job config as a Ray Train group (Ray must be initialised). Raises if the
    group still fails after `max_restarts` restarts."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    res = config.resources
    per_worker = {"CPU": res.cpus, **({"GPU": res.gpus} if res.gpus else {})}
    trainer = TorchTrainer(
        _rank_main,
        train_loop_config={"config": config, "sink": sink, "extra": extra, "threads": res.cpus},
        torch_config=TorchConfig(backend="nccl" if res.gpus else "gloo"),
        scaling_config=ScalingConfig(num_workers=res.workers, use_gpu=res.gpus > 0, resources_per_worker=per_worker),
        run_config=RunConfig(
            name=name,
            storage_path=storage or os.path.join(tempfile.gettempdir(), "unroll-ray-train"),
            failure_config=FailureConfig(max_failures=max_restarts),
        ),
    )
    trainer.fit()


def run_group_attempt(spec: AttemptSpec, config: JobConfig) -> str:
    """The dispatcher's Ray task for a group job: drive the group, then read the outcome
    rank 0 wrote (the task holds no resources of its own; the ranks do)."""
    try:
        train_group(config, JobSink(spec), name=f"{spec.job_id}-a{spec.attempt}", extra=service_checks(spec))
    except Exception:
        # The group failed past its restarts: the dispatcher retries the job from its
        # last checkpoint as a new attempt.
        raise RuntimeError(f"data-parallel group failed:\n{traceback.format_exc()[-2000:]}") from None
    with sessions_for(spec.database_url).begin() as session:
        job = repo.get_job(session, spec.job_id)
        return job.state.value if job.attempt == spec.attempt else "stale"


def group_is_placeable(cpus: float, gpus: float, workers: int, timeout_s: float = 2.0) -> bool:
    """Whether `workers` bundles of (cpus, gpus) can be reserved together now. The probe
    placement group is all-or-nothing and removed at once, so it never holds part of a
    group; Ray Train then reserves the group's own (if another job took the resources in
    between, that group waits, whole, until they are free)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    pg = placement_group([bundle] * workers, strategy="PACK")
    try:
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
        return bool(ready)
    finally:
        remove_placement_group(pg)
