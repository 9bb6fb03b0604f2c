"""/v1/sweeps: a grid of jobs submitted together (SPEC §5).

A sweep expands `grid` ({dotted.path: [values]}) into its Cartesian product, times `seeds`
(train.seed = base seed + 0 .. seeds - 1). Every point is validated exactly like a single
submission before anything is written, and the sweep and all its jobs are created in one
transaction: a sweep exists whole or not at all. The queue writes follow the commit.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Response, status
from redis.exceptions import RedisError

from service.api.deps import ProjectDep, RuntimeDep
from service.api.errors import ApiError, Invalid
from service.api.errors import responses as error_responses
from service.api.quota import counter
from service.api.schemas import SweepCancelled, SweepCreate, SweepJob, SweepPublic, public_summary
from service.api.submission import check_config, check_references, job_fields
from service.store import early_stop, sweeps
from service.store.db import early_stop as db_early_stop
from service.store.db import repo, states
from service.store.db.base import utcnow
from service.store.db.models import Job, JobState
from service.store.quotas import queued_limit
from trainer.config import JobConfig

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"])

SweepId = Annotated[str, Path(min_length=1, max_length=64, description="A sweep id (`swp_...`)")]

@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=SweepPublic,
    summary="Submit a sweep: the grid's Cartesian product times seeds",
    responses=error_responses(400, 401, 413, 422, 429, 503),
)
async def create_sweep(body: SweepCreate, project: ProjectDep, runtime: RuntimeDep) -> SweepPublic:
    settings = runtime.settings
    n = sweeps.grid_size(body.grid, body.seeds)
    if n > settings.max_sweep_jobs:
        raise Invalid("grid", f"the sweep expands to {n} jobs; at most {settings.max_sweep_jobs} are allowed")
    bad = body.unstorable()
    if bad is not None:
        raise Invalid(*bad)
    configs: list[JobConfig] = []
    for raw, point, seed in sweeps.expand(body.base, body.grid, body.seeds):
        try:
            config = check_config(raw, settings, prefix="base.", quota=project.quota)
        except ApiError as exc:
            raise _blame_grid(exc, point) from None
        name = sweeps.point_name(body.name or config.name, point, seed, body.seeds)
        if name != config.name:
            config.name = name
        configs.append(config)
    settled = _early_stop(body, configs)
    async with runtime.sessions() as session, session.begin():
        known: dict[str, Any] = {}  # each dataset read once, every config pinned
        for config in configs:
            await check_references(session, config, project.project_id, settings, prefix="base.", known=known)
        await runtime.quota.check(project.project_id, len(configs), queued_limit(project.quota, settings.max_queued_per_project), counter(session))
        public, queued = await session.run_sync(_create, project.project_id, body, configs, settled)
    runtime.quota.added(project.project_id, len(queued))
    runtime.metrics.submissions.inc(len(queued))
    await runtime.enqueue_after_commit(queued)
    return public


def _blame_grid(exc: ApiError, point: dict[str, Any]) -> ApiError:
    """An error at a field the grid sets is the grid's, not the base's."""
    path = sweeps.grid_path_of((exc.field or "").removeprefix("base."), point)
    if path is None:
        return exc
    return Invalid(f"grid.{path}", f"value {point[path]!r}: {exc.message.split(': ', 1)[-1]}")


def _early_stop(body: SweepCreate, configs: list[JobConfig]) -> dict[str, Any] | None:
    """The body's early_stop checked against every job of the sweep, defaults filled in."""
    if body.early_stop is None:
        return None
    try:
        return early_stop.settle(body.early_stop.model_dump(), configs)
    except early_stop.InvalidEarlyStop as exc:
        raise Invalid(exc.field, exc.message) from None


def _create(session, project_id: str, body: SweepCreate, configs, settled: dict[str, Any] | None) -> tuple[SweepPublic, list[tuple[str, int]]]:
    sweep = repo.create_sweep(
        session,
        project_id=project_id,
        base=body.base,
        grid=body.grid,
        seeds=body.seeds,
        max_parallel=body.max_parallel,
        name=body.name,
    )
    if settled is not None:  # (assigning None would store a JSON null, not SQL NULL)
        sweep.early_stop = settled
    queued = []
    for config in configs:
        job, _ = repo.create_job(session, project_id=project_id, sweep_id=sweep.id, **job_fields(config))
        queued.append((job.id, job.priority, project_id))
    if settled is not None:
        queued = early_stop.launch_order(queued, sweeps.base_seed(body.base))
    return _summary(session, sweep), queued


def _summary(session, sweep) -> SweepPublic:
    """The sweep as the API shows it: its jobs one by one, and the comparison table."""
    jobs: list[Job] = repo.list_sweep_jobs(session, sweep.id)
    counts = repo.sweep_state_counts(session, sweep.id)
    # Ranked by what early stopping ranks by, when it does (its metric defaults to the task's).
    metric, goal = (sweep.early_stop["metric"], sweep.early_stop["goal"]) if sweep.early_stop else sweeps.task_metric(sweep.base)
    base_seed = sweeps.get_path(sweep.base, "train.seed")
    now = utcnow()
    rows, outcomes = [], []
    for job in jobs:
        state = JobState(job.state).value
        started = job.started_at is not None
        # A job that never ran has no metrics: skip its queries.
        evaluations = repo.read_series(session, job.id, names=[metric])[metric] if started else []
        latest: dict[str, float | None] = {}
        summary = public_summary(job.id, job.summary)
        if summary is None and started:
            latest = {name: value for name, (_, value) in repo.last_metrics(session, job.id).items()}
            summary = latest
        point = {path: sweeps.get_path(job.config, path) for path in sweep.grid}
        seed = sweeps.get_path(job.config, "train.seed")
        rows.append(
            SweepJob(
                job_id=job.id,
                point=point,
                seed=seed if isinstance(seed, int) else (base_seed or 0),
                state=state,
                progress=job.progress,
                step=job.step,
                summary=summary,
            )
        )
        outcomes.append(
            sweeps.JobOutcome(
                job_id=job.id,
                config=job.config,
                state=state,
                step=job.step,
                started=started,
                summary=public_summary(job.id, job.summary),
                evaluations=evaluations,
                running_s=(now - job.started_at).total_seconds() if started and job.summary is None else None,
                latest=latest,
            )
        )
    summary = sweeps.summarize(sweep.grid, sweep.seeds, outcomes, metric, goal)
    if sweep.early_stop is not None:
        early_stop.annotate(summary, sweep.early_stop, {job.id: job.step for job in jobs})
    return SweepPublic(
        id=sweep.id,
        name=sweep.name,
        state=repo.sweep_state(counts, deciding=db_early_stop.deciding(sweep)),
        created_at=sweep.created_at,
        cancel_requested=sweep.cancel_requested_at is not None,
        base=sweep.base,
        grid=sweep.grid,
        seeds=sweep.seeds,
        max_parallel=sweep.max_parallel,
        early_stop=sweep.early_stop,
        counts={state.value: n for state, n in counts.items()},
        jobs=rows,
        summary=summary,
    )


@router.get(
    "/{sweep_id}",
    response_model=SweepPublic,
    summary="A sweep's state, its jobs, and the summary table: one row per grid point",
    responses={
        **error_responses(401, 404, 422, 503),
        200: {"content": {"text/csv": {"schema": {"type": "string"}}}, "description": "The sweep (JSON), or with format=csv its summary rows"},
    },
)
async def get_sweep(
    sweep_id: SweepId,
    project: ProjectDep,
    runtime: RuntimeDep,
    format: Annotated[Literal["json", "csv"], Query(description="csv: the summary rows as text/csv")] = "json",
):
    async with runtime.sessions() as session:
        public = await session.run_sync(lambda s: _summary(s, repo.get_sweep(s, sweep_id, project.project_id)))
    if format == "csv":
        return Response(
            sweeps.to_csv(public.summary.model_dump()),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{sweep_id}.csv"'},
        )
    return public


@router.post(
    "/{sweep_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=SweepCancelled,
    summary="Cancel every unfinished job of a sweep (idempotent)",
    responses=error_responses(401, 404, 503),
)
async def cancel_sweep(sweep_id: SweepId, project: ProjectDep, runtime: RuntimeDep) -> SweepCancelled:
    async with runtime.sessions() as session, session.begin():
        await session.run_sync(repo.get_sweep, sweep_id, project.project_id)
        cancelled = await session.run_sync(states.cancel_sweep, sweep_id)
        jobs = await session.run_sync(repo.list_sweep_jobs, sweep_id)
        removable = [j.id for j in jobs if j.state == JobState.CANCELLED]
    for job_id in removable:
        try:
            await runtime.queue.remove(job_id)
        except (RedisError, OSError):  # a claim finds the job cancelled anyway
            break
    return SweepCancelled(id=sweep_id, cancelled=cancelled)
