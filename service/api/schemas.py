"""What the API sends and receives, one family per resource (Create / Public / List).

The body of POST /v1/jobs is the job configuration of SPEC §2 (``trainer.config.JobConfig``):
the route validates it with ``trainer.config.parse_config`` itself, so the API and the
trainer cannot disagree; OpenAPI documents it under the name ``JobConfig``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.store import asha, limits, quotas
from service.store.db.base import unstorable
from service.store.db.models import ApiToken, Attempt, Checkpoint, Dataset, Job, JobLog, JobState, Project

StateName = Literal["queued", "running", "succeeded", "failed", "cancelled"]


# --- jobs -------------------------------------------------------------------------------------


class MetricPoint(BaseModel):
    step: int
    # None: the value was not finite (nan or inf).
    value: float | None


class AttemptPublic(BaseModel):
    number: int
    worker: str | None
    started_at: datetime
    ended_at: datetime | None
    outcome: Literal["succeeded", "failed", "cancelled", "lost"] | None
    error: str | None

    @classmethod
    def of(cls, row: Attempt) -> AttemptPublic:
        return cls(
            number=row.number,
            worker=row.worker,
            started_at=row.started_at,
            ended_at=row.ended_at,
            outcome=row.outcome.value if row.outcome is not None else None,
            error=row.error,
        )


class JobPublic(BaseModel):
    id: str
    name: str | None
    tags: list[str]
    sweep_id: str | None
    state: StateName
    priority: int
    # The latest try (0 before the first claim) and the budget of tries.
    attempt: int
    max_attempts: int
    step: int
    max_steps: int | None
    # step / max_steps, 0..1
    progress: float
    error: str | None
    # Why a queued job cannot be placed yet.
    pending_reason: str | None
    worker: str | None
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    config: dict[str, Any]
    # The trainer's final summary (SPEC §6), once the job has finished.
    summary: dict[str, Any] | None
    # The latest point of every series (only on GET /v1/jobs/{id}).
    metrics: dict[str, MetricPoint] | None = None
    attempts: list[AttemptPublic] | None = None

    @classmethod
    def of(
        cls,
        job: Job,
        metrics: dict[str, tuple[int, float | None]] | None = None,
        attempts: list[Attempt] | None = None,
    ) -> JobPublic:
        return cls(
            id=job.id,
            name=job.name,
            tags=list(job.tags or []),
            sweep_id=job.sweep_id,
            state=JobState(job.state).value,
            priority=job.priority,
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            step=job.step,
            max_steps=job.max_steps,
            progress=job.progress,
            error=job.error,
            pending_reason=job.pending_reason,
            worker=job.lease_owner,
            cancel_requested=job.cancel_requested_at is not None,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            updated_at=job.updated_at,
            config=job.config,
            summary=public_summary(job.id, job.summary),
            metrics=None
            if metrics is None
            else {name: MetricPoint(step=step, value=value) for name, (step, value) in metrics.items()},
            attempts=None if attempts is None else [AttemptPublic.of(a) for a in attempts],
        )


class JobList(BaseModel):
    jobs: list[JobPublic]
    # Pass as `cursor` for the next page; null on the last page.
    next_cursor: str | None


class MetricSeries(BaseModel):
    # name -> [[step, value], ...] in step order (value null when not finite)
    series: dict[str, list[tuple[int, float | None]]]


class LogLinePublic(BaseModel):
    id: int
    attempt: int
    ts: datetime
    level: str
    line: str

    @classmethod
    def of(cls, row: JobLog) -> LogLinePublic:
        return cls(id=row.id, attempt=row.attempt, ts=row.ts, level=row.level, line=row.line)


class LogPage(BaseModel):
    lines: list[LogLinePublic]
    # The id of the last line returned (pass as `after` to follow); the given `after` when none.
    next_after: int


def public_summary(job_id: str, summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """The stored summary as shown: the model artifact's record gets its download URL in
    place of its storage location."""
    if not summary or "model" not in summary:
        return summary
    model = {k: v for k, v in summary["model"].items() if k != "uri"}
    return {**summary, "model": {**model, "url": f"/v1/jobs/{job_id}/model"}}


class CheckpointPublic(BaseModel):
    step: int
    attempt: int
    bytes: int
    sha256: str
    created_at: datetime
    # Relative URL that downloads it.
    url: str

    @classmethod
    def of(cls, row: Checkpoint) -> CheckpointPublic:
        return cls(
            step=row.step,
            attempt=row.attempt,
            bytes=row.bytes,
            sha256=row.sha256,
            created_at=row.created_at,
            url=f"/v1/jobs/{row.job_id}/checkpoints/{row.step}",
        )


class CheckpointList(BaseModel):
    checkpoints: list[CheckpointPublic]


# --- sweeps -----------------------------------------------------------------------------------


def _base_is_a_job_config(schema: dict[str, Any]) -> None:
    # `base` is validated point by point with parse_config (after the grid is applied), so
    # the model takes any object; the documentation shows what it must be.
    schema["properties"]["base"] = {"$ref": "#/components/schemas/JobConfig", "description": "A job configuration (SPEC §2)"}


class EarlyStop(BaseModel):
    """Asynchronous successive halving for a sweep (service.store.asha; Li et al., MLSys 2020)."""

    model_config = ConfigDict(extra="forbid")

    # The evaluated metric trials are ranked by (default: the task's, SPEC §3), and whether
    # higher ("max") or lower ("min") is better (default: the task's; needed with another metric).
    metric: str | None = Field(None, min_length=1, max_length=64, pattern=r"^valid/[a-z0-9_]+$")
    goal: Literal["max", "min"] | None = None
    # The first rung, in update steps; rung k is min_steps * reduction_factor^k.
    min_steps: int = Field(ge=1, le=10_000_000)
    reduction_factor: int = Field(3, ge=asha.MIN_REDUCTION_FACTOR, le=asha.MAX_REDUCTION_FACTOR)
    # The last rung: a trial that reaches it has its whole budget (default: base train.max_steps).
    max_steps: int | None = Field(None, ge=1, le=10_000_000)
    # asha: one bracket; hyperband: brackets of ASHA, bracket s starting at rung s.
    mode: Literal["asha", "hyperband"] = "asha"
    # true: a trial not promoted is paused with a checkpoint at its rung and may resume
    # later; false: it is stopped for good. Either way it ends succeeded, summary.stopped "early".
    resume: bool = True
    # "Which points reach this value?": a trial whose metric reaches it (>= for max, <= for
    # min) at an evaluation stops there, done (summary.stopped "target"), and leaves the
    # ranking (service.store.asha). null: rank for the best point only.
    target: float | None = Field(None, ge=-1e12, le=1e12, allow_inf_nan=False)


class SweepCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_base_is_a_job_config)

    name: str | None = Field(None, max_length=200)
    # A job configuration (SPEC §2); each grid point overrides some of its fields.
    base: dict[str, Any]
    # {dotted.path: [values]}: the sweep runs the Cartesian product of the lists.
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    # Each grid point runs with train.seed = base seed + 0 .. seeds - 1.
    seeds: int = Field(1, ge=1, le=1000)
    # At most this many of the sweep's jobs run at once (null: no limit).
    max_parallel: int | None = Field(None, ge=1, le=1_000_000)
    # Stop unpromising trials early (null: every trial runs its whole budget).
    early_stop: EarlyStop | None = None

    def unstorable(self) -> tuple[str, str] | None:
        """(field, problem) where `base` or `grid` holds what the database cannot (NaN,
        infinity, NUL): both are stored as sent, also where a grid point overrides a value.
        Asked by the route after the grid's size (cheap) is checked, so that a huge grid
        is refused before anything walks its values."""
        for name in ("base", "grid"):
            found = unstorable(getattr(self, name), name)
            if found is not None:
                return name, f"{found[0]}: {found[1]}"
        return None


class SweepJob(BaseModel):
    job_id: str
    # The grid values of this job ({dotted.path: value}) and its seed.
    point: dict[str, Any]
    seed: int
    state: StateName
    progress: float
    step: int
    # The trainer's summary once finished, else the latest metrics known.
    summary: dict[str, Any] | None


class SweepStat(BaseModel):
    # Over the point's seeds that have a finite value; std is the sample standard
    # deviation (null with fewer than two values).
    mean: float | None
    std: float | None
    n: int
    # Seeds whose value was not finite (stored as null): left out of mean and std.
    nonfinite: int = 0


class SweepPointSummary(BaseModel):
    # {dotted.path: value}: one combination of the grid.
    point: dict[str, Any]
    # Jobs of this point that have finished (succeeded, failed or cancelled), of all.
    jobs_done: int
    jobs_total: int
    # Jobs per state.
    states: dict[str, int]
    # The last evaluation of the task's metric, and the best one (max for accuracy, min
    # for ppl and mse), over seeds; running jobs count with what they have reported.
    final: SweepStat
    best: SweepStat
    # Means over the point's jobs (from each finished job's summary; for a running one,
    # its steps so far, seconds since it started and latest tokens/s).
    steps: float | None
    wall_s: float | None
    tokens_per_s: float | None
    # The maximum over the point's jobs.
    peak_memory_bytes: int | None
    clipped_fraction: float | None
    skipped_steps: float | None
    job_ids: list[str]
    # With early_stop: the highest rung (its step) any of the point's jobs reached, the
    # steps its jobs trained in all, and the steps saved against training each to max_steps.
    rung: int | None = None
    steps_used: int | None = None
    steps_saved: int | None = None


class SweepSummary(BaseModel):
    # The task's validation metric: valid/accuracy (recall), valid/ppl (text), valid/mse
    # (adding, timeseries); and whether higher ("max") or lower ("min") is better.
    metric: str
    goal: Literal["max", "min"]
    # The grid's paths, in order.
    axes: list[str]
    # One row per grid point, in the grid's order.
    rows: list[SweepPointSummary]
    # The point with the best final mean (the first in grid order on a tie); null before
    # any evaluation.
    best_point: dict[str, Any] | None
    # With early_stop: the steps at which trials are judged (every bracket's, ascending).
    rungs: list[int] | None = None


class SweepPublic(BaseModel):
    id: str
    name: str | None
    # running while any job runs (or some ran and some wait); queued when none started;
    # when all ended: failed if any failed, else cancelled if any was, else succeeded.
    state: StateName
    created_at: datetime
    cancel_requested: bool
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    seeds: int
    max_parallel: int | None
    # As submitted, with its defaults filled in (null: no early stopping).
    early_stop: dict[str, Any] | None = None
    # Jobs per state.
    counts: dict[str, int]
    # One row per job: grid point x seed.
    jobs: list[SweepJob]
    # One row per grid point, seeds aggregated: the comparison table.
    summary: SweepSummary


class SweepCancelled(BaseModel):
    id: str
    # Jobs that were queued or running when the cancel arrived.
    cancelled: int


# --- datasets ---------------------------------------------------------------------------------


class DatasetPublic(BaseModel):
    id: str
    name: str
    sha256: str
    bytes: int
    created_at: datetime

    @classmethod
    def of(cls, row: Dataset) -> DatasetPublic:
        return cls(id=row.id, name=row.name, sha256=row.sha256, bytes=row.bytes, created_at=row.created_at)


class DatasetList(BaseModel):
    datasets: list[DatasetPublic]


# --- admin ------------------------------------------------------------------------------------


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=200)
    # Seconds until the token stops working (null: it never expires).
    expires_in_s: int | None = Field(None, ge=limits.MIN_TOKEN_LIFETIME_S, le=limits.MAX_TOKEN_LIFETIME_S)


class TokenCreated(BaseModel):
    project_id: str
    project: str
    token_id: str
    # The secret: shown once, stored only as a hash.
    token: str
    expires_at: datetime | None = None


class TokenPublic(BaseModel):
    """A token as listed: never its secret (only a hash of it is stored)."""

    id: str
    project_id: str
    project: str
    name: str | None
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def of(cls, token: ApiToken, project: str) -> TokenPublic:
        return cls(
            id=token.id, project_id=token.project_id, project=project, name=token.name, created_at=token.created_at,
            last_used_at=token.last_used_at, expires_at=token.expires_at, revoked_at=token.revoked_at,
        )


class TokenList(BaseModel):
    tokens: list[TokenPublic]


class QuotaUpdate(BaseModel):
    """Bounds of a project's quota to set; a field sent as null goes back to the default,
    a field left out is unchanged (service.store.quotas)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_running: int | None = Field(None, ge=0, le=quotas.MAX_RUNNING_BOUND, description="jobs running at once (0 pauses the project)")
    max_cpus: float | None = Field(None, ge=0, le=quotas.MAX_RESOURCE_BOUND, description="CPUs its running jobs hold at once")
    max_gpus: float | None = Field(None, ge=0, le=quotas.MAX_RESOURCE_BOUND, description="GPUs its running jobs hold at once")
    max_priority: int | None = Field(None, ge=-(2**31), le=2**31 - 1, description="the highest priority its jobs may ask for")
    max_queued: int | None = Field(None, ge=0, le=quotas.MAX_QUEUED_BOUND, description="jobs it may have queued")

    def changes(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True)


class ProjectPublic(BaseModel):
    """A project, its quota (null: the deployment's default or no bound) and what it holds."""

    id: str
    name: str
    created_at: datetime
    max_running: int | None
    max_cpus: float | None
    max_gpus: float | None
    max_priority: int | None
    max_queued: int | None
    running: int = 0
    cpus: float = 0.0
    gpus: float = 0.0
    queued: int = 0

    @classmethod
    def of(cls, project: Project, usage: quotas.Usage, queued: int) -> ProjectPublic:
        quota = {name: getattr(project, name) for name in quotas.Quota.names()}
        return cls(
            id=project.id, name=project.name, created_at=project.created_at, **quota,
            running=usage.running, cpus=usage.cpus, gpus=usage.gpus, queued=queued,
        )


class ProjectList(BaseModel):
    projects: list[ProjectPublic]


# --- health -----------------------------------------------------------------------------------


class Readiness(BaseModel):
    ready: bool
    # database / redis / ray -> "ok" or what is wrong
    checks: dict[str, str]
