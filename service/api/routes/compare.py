"""/v1/compare: any jobs of the caller's project side by side, whatever their sweep or
state (SPEC §7, `GET /v1/compare?jobs=a,b`): what differs in their configurations, and the
chosen series on one step axis.

- The configuration difference flattens each job's stored config (SPEC §2) into dotted
  paths (`tbptt.k1`, `optim.lr`; lists are one value) and keeps the paths whose values are
  not all equal, including a path that some jobs lack. Equal means equal JSON, so `1` and
  `true` differ, as they do in the config.
- The series are aligned by step: for each metric, `steps` is the union of the jobs' steps,
  and each job has one value per step (null where it has no point there). A non-finite
  point is stored as null too (SPEC §3), so those steps are listed in `nonfinite`.
- `max_points` bounds the rows of each aligned table: each job's series is downsampled to
  max_points / jobs points the way GET /v1/jobs/{id}/metrics does (buckets keep their
  extremes and first non-finite point), so one request reads at most
  max_points x series values per job. The bounds are in service.store.limits.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel

from service.api.deps import ProjectDep, RuntimeDep
from service.api.errors import Invalid, responses
from service.api.schemas import MetricPoint, StateName, public_summary
from service.store import limits, sweeps
from service.store.db import repo
from service.store.db.models import Job, JobState
from trainer.config import ID_PATTERN

router = APIRouter(prefix="/v1/compare", tags=["jobs"])

_JOB_ID = re.compile(ID_PATTERN)
_METRIC_MAX = 200  # the column's width (models.Metric.name)
# Read for every job unless `metrics` says otherwise, with the task's metric of each.
DEFAULT_METRICS = ("train/loss", "valid/loss")
DEFAULT_POINTS = 1000


# --- what the route answers -------------------------------------------------------------------


class ComparedJob(BaseModel):
    id: str
    name: str | None
    state: StateName
    sweep_id: str | None
    step: int
    max_steps: int | None
    progress: float
    created_at: datetime
    finished_at: datetime | None
    # The latest point of each compared series this job has (value null: not finite).
    final: dict[str, MetricPoint]
    # The trainer's summary (SPEC §6), once the job has finished.
    summary: dict[str, Any] | None


class ConfigDifference(BaseModel):
    # A dotted path of the job configuration.
    key: str
    # job id -> its value at `key`; a job whose config has no such path is left out.
    values: dict[str, Any]


class AlignedSeries(BaseModel):
    # The union of the jobs' steps, ascending.
    steps: list[int]
    # job id -> one value per step of `steps`: null where the job has no point at that
    # step, or where its value was not finite (those steps are in `nonfinite`).
    values: dict[str, list[float | None]]
    # job id -> steps whose stored value is not finite; only jobs that have any.
    nonfinite: dict[str, list[int]]


class Comparison(BaseModel):
    # In the order asked for.
    jobs: list[ComparedJob]
    # The series compared: `metrics` as asked, or train/loss, valid/loss and each job's
    # task metric (valid/accuracy, valid/ppl, valid/mse).
    metrics: list[str]
    # Every series name any of the jobs has (what else could be compared).
    available_metrics: list[str]
    # The paths whose values differ between the jobs, in the configs' order.
    config_diff: list[ConfigDifference]
    # metric -> its aligned table.
    series: dict[str, AlignedSeries]


# --- the route --------------------------------------------------------------------------------

_DESCRIPTION = f"""Any jobs of the project (any state, any sweep, or none) side by side: the
configuration paths whose values differ, and the chosen series aligned by step (see the
schema). At most {limits.MAX_COMPARE_JOBS} jobs and {limits.MAX_COMPARE_METRICS} series;
`max_points` (at most {limits.MAX_COMPARE_POINTS:,}) bounds the steps of each aligned
series (at least one point per job is kept). 404 names a job that is unknown or another
project's."""


@router.get(
    "",
    response_model=Comparison,
    summary="Compare jobs: configuration differences and series aligned by step",
    description=_DESCRIPTION,
    responses=responses(401, 404, 422, 503),
)
async def compare_jobs(
    project: ProjectDep,
    runtime: RuntimeDep,
    jobs: Annotated[
        list[str] | None,
        Query(description="Job ids, comma-separated (or the parameter repeated)", max_length=limits.MAX_COMPARE_JOBS),
    ] = None,
    metrics: Annotated[
        list[str] | None,
        Query(description="Series to compare (comma-separated or repeated); default: the tasks' main metrics",
              max_length=limits.MAX_COMPARE_METRICS),
    ] = None,
    max_points: Annotated[int, Query(ge=1, le=limits.MAX_COMPARE_POINTS)] = DEFAULT_POINTS,
) -> Comparison:
    job_ids = parse_job_ids(jobs)
    wanted = parse_metrics(metrics)
    async with runtime.sessions() as session:
        return await session.run_sync(_compare, project.project_id, job_ids, wanted, max_points)


def _split(values: list[str] | None) -> list[str]:
    return [item.strip() for value in values or [] for item in value.split(",")]


def parse_job_ids(values: list[str] | None) -> list[str]:
    """The ids in order, each once; 422 naming `jobs` for anything else."""
    items = _split(values)
    if not items or items == [""]:
        raise Invalid("jobs", "name at least one job id (jobs=job_a,job_b)")
    ids: list[str] = []
    for item in items:
        if not _JOB_ID.fullmatch(item):
            raise Invalid("jobs", f"{item[:70]!r} is not a job id")
        if item not in ids:
            ids.append(item)
    if len(ids) > limits.MAX_COMPARE_JOBS:
        raise Invalid("jobs", f"{len(ids)} jobs; at most {limits.MAX_COMPARE_JOBS} can be compared at once")
    return ids


def parse_metrics(values: list[str] | None) -> list[str] | None:
    """The series names in order, each once (None: the defaults); 422 naming `metrics`."""
    if values is None:
        return None
    names: list[str] = []
    for item in _split(values):
        if not item or len(item) > _METRIC_MAX:
            raise Invalid("metrics", f"a series name has 1 to {_METRIC_MAX} characters")
        if item not in names:
            names.append(item)
    if len(names) > limits.MAX_COMPARE_METRICS:
        raise Invalid("metrics", f"{len(names)} series; at most {limits.MAX_COMPARE_METRICS} at once")
    return names


def _compare(session, project_id: str, job_ids: list[str], wanted: list[str] | None, max_points: int) -> Comparison:
    rows: list[Job] = [repo.get_job(session, job_id, project_id) for job_id in job_ids]  # 404 first
    names = wanted if wanted is not None else default_metrics(rows)
    per_job = max(1, max_points // len(rows))
    available: list[str] = []
    columns: dict[str, dict[str, list[tuple[int, float | None]]]] = {name: {} for name in names}
    finals: dict[str, dict[str, MetricPoint]] = {}
    for job in rows:
        # A job that never ran has no metrics: skip its queries.
        own = repo.metric_names(session, job.id) if job.started_at is not None else []
        available.extend(n for n in own if n not in available)
        present = [n for n in names if n in own]
        series = repo.read_series(session, job.id, present, None, per_job) if present else {}
        for name in names:
            columns[name][job.id] = series.get(name, [])
        last = repo.last_metrics(session, job.id) if present else {}
        finals[job.id] = {n: MetricPoint(step=last[n][0], value=last[n][1]) for n in present if n in last}
    return Comparison(
        jobs=[_compared(job, finals[job.id]) for job in rows],
        metrics=names,
        available_metrics=sorted(available),
        config_diff=config_differences({job.id: job.config for job in rows}),
        series={name: align(columns[name]) for name in names},
    )


def default_metrics(rows: list[Job]) -> list[str]:
    names = list(DEFAULT_METRICS)
    for job in rows:
        metric, _ = sweeps.task_metric(job.config)
        if metric not in names:
            names.append(metric)
    return names


def _compared(job: Job, final: dict[str, MetricPoint]) -> ComparedJob:
    return ComparedJob(
        id=job.id, name=job.name, state=JobState(job.state).value, sweep_id=job.sweep_id, step=job.step,
        max_steps=job.max_steps, progress=job.progress, created_at=job.created_at, finished_at=job.finished_at,
        final=final, summary=public_summary(job.id, job.summary),
    )


# --- the two comparisons (pure) ---------------------------------------------------------------


def _same(values: list[Any]) -> bool:
    texts = {json.dumps(v, sort_keys=True) for v in values}
    return len(texts) == 1


def config_differences(configs: dict[str, dict[str, Any]]) -> list[ConfigDifference]:
    """The paths whose values are not equal across the configs (a path missing from some
    config counts as a difference), in the order the paths first appear."""
    flat = {job_id: sweeps.flatten(config or {}) for job_id, config in configs.items()}
    paths: dict[str, None] = {}
    for leaves in flat.values():
        paths.update(dict.fromkeys(leaves))
    out = []
    for path in paths:
        values = {job_id: leaves[path] for job_id, leaves in flat.items() if path in leaves}
        if len(values) < len(flat) or not _same(list(values.values())):
            out.append(ConfigDifference(key=path, values=values))
    return out


def align(series: dict[str, list[tuple[int, float | None]]]) -> AlignedSeries:
    """Each job's [(step, value)] on the union of their steps."""
    steps = sorted({step for points in series.values() for step, _ in points})
    values: dict[str, list[float | None]] = {}
    nonfinite: dict[str, list[int]] = {}
    for job_id, points in series.items():
        at = dict(points)
        values[job_id] = [at.get(step) for step in steps]
        bad = [step for step, value in points if value is None]
        if bad:
            nonfinite[job_id] = bad
    return AlignedSeries(steps=steps, values=values, nonfinite=nonfinite)
