"""/v1/jobs: submit, list, inspect, cancel, retry, and a job's metrics, live events, logs
and checkpoints (SPEC §5). Every route acts for the caller's project only: another
project's job id is a 404, exactly like an unknown one."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from redis.exceptions import RedisError

from service.api.deps import ProjectDep, RuntimeDep, bearer_token, caller
from service.api.direct import DirectRoute
from service.api.errors import ApiError, Invalid, responses
from service.api.quota import counter
from service.api.runtime import Runtime
from service.api.schemas import (
    CheckpointList,
    CheckpointPublic,
    JobList,
    JobPublic,
    LogLinePublic,
    LogPage,
    MetricSeries,
    StateName,
)
from service.api.submission import (
    check_config,
    check_dataset,
    data_field,
    job_fields,
    read_json,
)
from service.store import events as job_events
from service.store.db import repo, states
from service.store.db.errors import NotFound
from service.store.db.models import JobState

log = logging.getLogger("unroll.api")

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

JobId = Annotated[str, Path(min_length=1, max_length=64, description="A job id (`job_...`)")]
# Bounds that keep every number inside a 64-bit database column.
MAX_STEP = 2**62

# Sent on an idle event stream so proxies and clients see it is alive.
KEEPALIVE_S = 15.0


async def publish(runtime: Runtime, job_id: str, event: dict[str, Any]) -> None:
    """Tell live subscribers about a change the API made (best effort: the database has it)."""
    try:
        await job_events.publish(runtime.redis, job_id, event, prefix=runtime.settings.redis_prefix)
    except (RedisError, OSError) as exc:
        log.warning("publishing %s for %s failed: %s", event.get("type"), job_id, exc)


# --- submit and list --------------------------------------------------------------------------

_IDEMPOTENCY_KEY = "Idempotency-Key"
_MAX_KEY = 255

_SUBMIT_DOCS = {
    "requestBody": {
        "required": True,
        "description": "A job configuration (SPEC §2), validated by the trainer's own schema.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobConfig"}}},
    },
    "parameters": [
        {
            "name": _IDEMPOTENCY_KEY,
            "in": "header",
            "required": False,
            "schema": {"type": "string", "minLength": 1, "maxLength": _MAX_KEY},
            "description": "Repeats with the same key (per project) return the first job with 200",
        }
    ],
    "security": [{"HTTPBearer": []}],
}


async def submit_job(request: Request) -> Response:
    # The hottest route, a DirectRoute (service.api.direct): it reads the caller, the key
    # and the body itself and answers a finished Response.
    project = await caller(request, bearer_token(request))
    idempotency_key = request.headers.get(_IDEMPOTENCY_KEY)
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= _MAX_KEY:
        raise Invalid(_IDEMPOTENCY_KEY, f"must be 1 to {_MAX_KEY} characters")
    runtime: Runtime = request.app.state.runtime
    settings = runtime.settings
    config = check_config(await read_json(request), settings)
    project_id = project.project_id
    # The common submission (no key, no dataset, the quota estimate trusted) touches the
    # database once: the INSERT, committed by itself and batched with concurrent ones
    # (service.api.submit).
    if idempotency_key is not None or data_field(config, "dataset") is not None:
        async with runtime.autocommit() as session:
            if idempotency_key is not None:
                existing = await session.run_sync(repo.get_job_by_idempotency_key, project_id, idempotency_key)
                if existing is not None:
                    return _job_response(existing, status.HTTP_200_OK)
            await check_dataset(session, config, project_id)
    await runtime.quota.check(project_id, 1, settings.max_queued_per_project)
    job, created = await runtime.inserts.insert(_job_values(project_id, config, idempotency_key))
    if not created:  # lost a race with the same key: the winner's job, as a repeat
        return _job_response(job, status.HTTP_200_OK)
    runtime.quota.added(project_id, 1)
    runtime.metrics.submissions.inc()
    await runtime.enqueue_after_commit([(job.id, job.priority)])
    return _job_response(job, status.HTTP_201_CREATED)


router.add_api_route(
    "",
    submit_job,
    methods=["POST"],
    route_class_override=DirectRoute,
    status_code=status.HTTP_201_CREATED,
    response_model=JobPublic,
    summary="Submit a job",
    openapi_extra=_SUBMIT_DOCS,
    responses={
        200: {"model": JobPublic, "description": "A repeat of an earlier submission with the same Idempotency-Key"},
        **responses(400, 401, 413, 422, 429, 503),
    },
)


def _job_response(job, status_code: int) -> Response:
    return Response(JobPublic.of(job).model_dump_json(), status_code=status_code, media_type="application/json")


def _job_values(project_id: str, config, idempotency_key: str | None) -> dict[str, Any]:
    return repo.new_job_values(project_id=project_id, idempotency_key=idempotency_key, **job_fields(config))


@router.get("", response_model=JobList, summary="List jobs, newest first", responses=responses(400, 401, 422, 503))
async def list_jobs(
    project: ProjectDep,
    runtime: RuntimeDep,
    state: StateName | None = None,
    sweep_id: Annotated[str | None, Query(max_length=64)] = None,
    tag: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    cursor: Annotated[str | None, Query(max_length=512, description="`next_cursor` of the previous page")] = None,
) -> JobList:
    async with runtime.sessions() as session:
        try:
            jobs, next_cursor = await session.run_sync(
                lambda s: repo.list_jobs(
                    s, project.project_id, state=state, sweep_id=sweep_id, tag=tag, limit=limit, cursor=cursor
                )
            )
        except ValueError:
            raise ApiError(400, "invalid_cursor", "cursor: not a cursor returned by this API", "cursor") from None
    return JobList(jobs=[JobPublic.of(j) for j in jobs], next_cursor=next_cursor)


# --- one job ----------------------------------------------------------------------------------


@router.get("/{job_id}", response_model=JobPublic, summary="One job", responses=responses(401, 404, 503))
async def get_job(job_id: JobId, project: ProjectDep, runtime: RuntimeDep) -> JobPublic:
    async with runtime.sessions() as session:
        return await session.run_sync(_job_detail, job_id, project.project_id)


def _job_detail(session, job_id: str, project_id: str) -> JobPublic:
    job = repo.get_job(session, job_id, project_id)
    return JobPublic.of(job, repo.last_metrics(session, job_id), states.list_attempts(session, job_id))


@router.post(
    "/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobPublic,
    summary="Cancel a queued or running job (idempotent)",
    description="A queued job is cancelled at once; a running one is asked to stop and ends "
    "`cancelled` when its attempt observes the request (within about a second). "
    "Cancelling a finished job changes nothing.",
    responses=responses(401, 404, 503),
)
async def cancel_job(job_id: JobId, project: ProjectDep, runtime: RuntimeDep) -> JobPublic:
    async with runtime.sessions() as session, session.begin():
        state, first_request, public = await session.run_sync(_cancel, job_id, project.project_id)
    if state == JobState.CANCELLED:
        try:
            await runtime.queue.remove(job_id)
        except (RedisError, OSError) as exc:  # a worker that claims it finds it cancelled anyway
            log.warning("removing cancelled job %s from the queue failed: %s", job_id, exc)
    if first_request:
        await publish(runtime, job_id, {"type": "state", "state": state.value, "cancel_requested": True})
    return public


def _cancel(session, job_id: str, project_id: str) -> tuple[JobState, bool, JobPublic]:
    job = repo.get_job(session, job_id, project_id)
    first_request = job.cancel_requested_at is None and not JobState(job.state).terminal
    state = states.request_cancel(session, job_id)
    session.refresh(job)
    return state, first_request, JobPublic.of(job)


@router.post(
    "/{job_id}/retry",
    response_model=JobPublic,
    summary="Requeue a failed or cancelled job; it resumes from its last checkpoint",
    description="409 for a job that is queued, running or succeeded.",
    responses=responses(401, 404, 409, 429, 503),
)
async def retry_job(job_id: JobId, project: ProjectDep, runtime: RuntimeDep) -> JobPublic:
    settings = runtime.settings
    async with runtime.sessions() as session, session.begin():
        await session.run_sync(repo.get_job, job_id, project.project_id)
        await runtime.quota.check(project.project_id, 1, settings.max_queued_per_project, counter(session))
        public = await session.run_sync(_retry, job_id)
    runtime.quota.added(project.project_id, 1)
    await runtime.enqueue_after_commit([(public.id, public.priority)])
    await publish(runtime, job_id, {"type": "state", "state": "queued", "attempt": public.attempt})
    return public


def _retry(session, job_id: str) -> JobPublic:
    states.retry(session, job_id)  # IllegalTransition -> 409
    job = repo.get_job(session, job_id)
    session.refresh(job)
    return JobPublic.of(job)


# --- what a job produced ----------------------------------------------------------------------


@router.get(
    "/{job_id}/metrics",
    response_model=MetricSeries,
    summary="Metric series, optionally downsampled",
    description="With `max_points`, a longer series is cut into buckets and each keeps its "
    "minimum and maximum (and first non-finite point), so spikes stay visible.",
    responses=responses(401, 404, 422, 503),
)
async def job_metrics(
    job_id: JobId,
    project: ProjectDep,
    runtime: RuntimeDep,
    names: Annotated[
        list[str] | None,
        Query(description="Series to read (repeat, or comma-separated); default: all", max_length=100),
    ] = None,
    since_step: Annotated[int | None, Query(ge=0, le=MAX_STEP)] = None,
    max_points: Annotated[int | None, Query(ge=1, le=100_000)] = None,
) -> MetricSeries:
    wanted = None
    if names:
        wanted = [n for item in names for n in item.split(",") if n][:100] or None
    async with runtime.sessions() as session:
        await session.run_sync(repo.get_job, job_id, project.project_id)
        series = await session.run_sync(repo.read_series, job_id, wanted, since_step, max_points)
    return MetricSeries(series=series)


@router.get(
    "/{job_id}/logs",
    response_model=LogPage,
    summary="The job's log lines, in order",
    description="Pass the returned `next_after` as `after` to get only newer lines (that is how `unroll logs -f` follows).",
    responses=responses(401, 404, 422, 503),
)
async def job_logs(
    job_id: JobId,
    project: ProjectDep,
    runtime: RuntimeDep,
    after: Annotated[int, Query(ge=0, le=MAX_STEP, description="Return lines with id > after")] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> LogPage:
    async with runtime.sessions() as session:
        await session.run_sync(repo.get_job, job_id, project.project_id)
        rows = await session.run_sync(lambda s: repo.read_logs(s, job_id, after_id=after, limit=limit))
    return LogPage(lines=[LogLinePublic.of(r) for r in rows], next_after=rows[-1].id if rows else after)


@router.get(
    "/{job_id}/checkpoints",
    response_model=CheckpointList,
    summary="The job's checkpoints",
    responses=responses(401, 404, 503),
)
async def job_checkpoints(job_id: JobId, project: ProjectDep, runtime: RuntimeDep) -> CheckpointList:
    async with runtime.sessions() as session:
        await session.run_sync(repo.get_job, job_id, project.project_id)
        rows = await session.run_sync(repo.list_checkpoints, job_id)
    return CheckpointList(checkpoints=[CheckpointPublic.of(r) for r in rows])


@router.get(
    "/{job_id}/checkpoints/{step}",
    response_class=StreamingResponse,
    summary="Download one checkpoint",
    responses={
        200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
              "description": "The checkpoint file (a torch.save dict)"},
        **responses(401, 404, 422, 503),
    },
)
async def download_checkpoint(
    job_id: JobId,
    step: Annotated[int, Path(ge=0, le=MAX_STEP)],
    project: ProjectDep,
    runtime: RuntimeDep,
) -> StreamingResponse:
    async with runtime.sessions() as session:
        await session.run_sync(repo.get_job, job_id, project.project_id)
        row = await session.run_sync(repo.get_checkpoint, job_id, step)
    try:
        handle = await asyncio.to_thread(runtime.store.open, row.uri)
    except FileNotFoundError:
        raise NotFound("checkpoint file", f"{job_id}@{step}") from None

    def chunks():
        with handle:
            while chunk := handle.read(1 << 20):
                yield chunk

    return StreamingResponse(
        chunks(),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(row.bytes),
            "Content-Disposition": f'attachment; filename="{job_id}-step-{step}.pt"',
            "X-Checksum-Sha256": row.sha256,
        },
    )


# --- live events ------------------------------------------------------------------------------


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n"


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    summary="Live events (Server-Sent Events)",
    description="First one `state` event with the whole job as it is now (from the database), "
    "then live events as they happen: `state`, `progress`, `metrics`, `log` (each a JSON object "
    "with `type`, `job_id`, `ts`). Comments (`: keep-alive`) every 15 s when idle. The stream "
    "ends after the job reaches a final state.",
    responses={
        200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}, "description": "An event stream"},
        **responses(401, 404, 503),
    },
)
async def job_events_stream(job_id: JobId, project: ProjectDep, runtime: RuntimeDep) -> StreamingResponse:
    async with runtime.sessions() as session:
        await session.run_sync(repo.get_job, job_id, project.project_id)  # 404 before streaming
    # Subscribe before reading the current state, so no event falls between the two.
    subscription = job_events.subscribe(runtime.redis, job_id, prefix=runtime.settings.redis_prefix)
    await subscription.__aenter__()
    try:
        async with runtime.sessions() as session:
            current = await session.run_sync(_job_detail, job_id, project.project_id)
    except BaseException:
        await subscription.aclose()
        raise

    async def stream() -> AsyncIterator[str]:
        snapshot = {"type": "state", "job_id": job_id, "snapshot": True, **current.model_dump(mode="json")}
        try:
            async for event in job_events.follow(subscription, snapshot, KEEPALIVE_S):
                yield ": keep-alive\n\n" if event is None else sse(str(event.get("type") or "message"), event)
        except (RedisError, OSError) as exc:
            yield sse("error", {"type": "error", "message": f"event stream interrupted: {exc}"})
        finally:
            await subscription.aclose()

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
