"""/v1/jobs: submit, list, inspect, cancel, retry, and a job's metrics, live events, logs
and checkpoints (SPEC §5). Every route acts for the caller's project only: another
project's job id is a 404, exactly like an unknown one."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from redis.exceptions import RedisError

from service.api.deps import ProjectDep, RuntimeDep, bearer_token, caller
from service.api.direct import DirectRoute
from service.api.downloads import BINARY, stored_file
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
    check_references,
    has_references,
    job_fields,
    read_json,
)
from service.store.db import repo, states
from service.store.db.models import JobState
from service.store.quotas import queued_limit

log = logging.getLogger("unroll.api")

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

JobId = Annotated[str, Path(min_length=1, max_length=64, description="A job id (`job_...`)")]
# Bounds that keep every number inside a 64-bit database column.
MAX_STEP = 2**62

# The state transitions routes make (cancel, retry) publish their events when their
# transaction commits (service.store.db.outbox, wired in service.api.runtime).


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
    config = check_config(await read_json(request), settings, quota=project.quota)
    project_id = project.project_id
    # The common submission (no key, no dataset, the quota estimate trusted) touches the
    # database once: the INSERT, committed by itself and batched with concurrent ones
    # (service.api.submit).
    if idempotency_key is not None or has_references(config):
        async with runtime.autocommit() as session:
            if idempotency_key is not None:
                existing = await session.run_sync(repo.get_job_by_idempotency_key, project_id, idempotency_key)
                if existing is not None:
                    return _job_response(existing, status.HTTP_200_OK)
            await check_references(session, config, project_id, settings)
    await runtime.quota.check(project_id, 1, queued_limit(project.quota, settings.max_queued_per_project))
    job, created = await runtime.inserts.insert(_job_values(project_id, config, idempotency_key))
    if not created:  # lost a race with the same key: the winner's job, as a repeat
        return _job_response(job, status.HTTP_200_OK)
    runtime.quota.added(project_id, 1)
    runtime.metrics.submissions.inc()
    await runtime.enqueue_after_commit([(job.id, job.priority, project_id)])
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
        state, public = await session.run_sync(_cancel, job_id, project.project_id)
    if state == JobState.CANCELLED:
        try:
            await runtime.queue.remove(job_id)
        except (RedisError, OSError) as exc:  # a worker that claims it finds it cancelled anyway
            log.warning("removing cancelled job %s from the queue failed: %s", job_id, exc)
    return public


def _cancel(session, job_id: str, project_id: str) -> tuple[JobState, JobPublic]:
    job = repo.get_job(session, job_id, project_id)
    state = states.request_cancel(session, job_id)
    session.refresh(job)
    return state, JobPublic.of(job)


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
        await runtime.quota.check(project.project_id, 1, queued_limit(project.quota, settings.max_queued_per_project), counter(session))
        public = await session.run_sync(_retry, job_id)
    runtime.quota.added(project.project_id, 1)
    await runtime.publisher.flush()  # its `queued` event is in the stream before any claim can be
    await runtime.enqueue_after_commit([(public.id, public.priority, project.project_id)])
    return public


def _retry(session, job_id: str) -> JobPublic:
    states.retry(session, job_id)  # IllegalTransition -> 409
    job = repo.get_job(session, job_id)
    session.refresh(job)
    return JobPublic.of(job)


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete a finished job and everything it produced",
    description="Only a succeeded, failed or cancelled job (409 for a queued or running one: cancel it "
    "first). Its row, attempts, metrics, logs and checkpoint records go in one transaction, then its "
    "checkpoint files. A sweep's job may be deleted: the sweep then counts one job fewer.",
    responses=responses(401, 404, 409, 503),
)
async def delete_job(job_id: JobId, project: ProjectDep, runtime: RuntimeDep) -> Response:
    async with runtime.sessions() as session, session.begin():
        uris = await session.run_sync(repo.delete_job, job_id, project.project_id)  # 404, 409
    try:  # a cancelled job whose removal from the queue failed may still be there
        await runtime.queue.remove(job_id)
    except (RedisError, OSError) as exc:  # a worker that takes it finds no job
        log.warning("removing deleted job %s from the queue failed: %s", job_id, exc)
    # The rows are committed as gone: now the files (what cannot be removed is logged).
    await asyncio.to_thread(runtime.store.discard, uris, [runtime.store.job_folder(job_id)])
    return Response(status_code=status.HTTP_204_NO_CONTENT)


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
        200: {**BINARY, "description": "The checkpoint file (a torch.save dict)"},
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
    return await stored_file(
        runtime, row.uri, size=row.bytes, sha256=row.sha256, filename=f"{job_id}-step-{step}.pt",
        what=("checkpoint file", f"{job_id}@{step}"),
    )


# --- live events ------------------------------------------------------------------------------

_EVENTS_DOC = """Server-Sent Events of one job (docs/operations.md, "Live event streams").

Each event has an `id:` (resume with a `Last-Event-ID` header holding the last one seen), an
`event:` name (its type) and `data:`, a JSON object with `type`, `job_id`, `ts`:

- `state`: the job changed state: `state`, `attempt`, `transition` (claim, lost, hand_back,
  finish, unplaceable, cancel, cancel_requested, retry), `worker`, `error`, `reason`. A fresh
  stream starts with one holding the whole job (`snapshot: true`).
- `progress`: `step`, `max_steps`, `progress`, `loss`. `metrics`: the latest value of each
  series (`values`, `steps`), at most a few a second. `log`: the job's new log lines (`lines`).
- `end`: the stream ends before the job (`reason`: max_duration, after
  UNROLL_STREAM_MAX_SECONDS; slow_consumer); reconnect with Last-Event-ID.
  `error`: Redis broke the stream; reconnect likewise.

The response completes right after the job's final `state` event (at once on a finished
job). A comment (`: keep-alive`) comes every UNROLL_STREAM_KEEPALIVE_SECONDS when idle. At
most UNROLL_MAX_STREAMS_PER_PROJECT streams per project are open on one API process (429)."""


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    summary="Live events (Server-Sent Events), resumable with Last-Event-ID",
    description=_EVENTS_DOC,
    responses={
        200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}, "description": "An event stream"},
        **responses(401, 404, 422, 503),
        429: {**responses(429)[429], "description": "This project has UNROLL_MAX_STREAMS_PER_PROJECT streams open here"},
    },
)
async def job_events_stream(
    job_id: JobId,
    project: ProjectDep,
    runtime: RuntimeDep,
    last_event_id: Annotated[
        str | None, Header(alias="Last-Event-ID", max_length=64, description="The `id:` of the last event seen: resume after it")
    ] = None,
) -> StreamingResponse:
    project_id = project.project_id

    async def snapshot() -> dict[str, Any]:  # NotFound (404) for another project's job
        async with runtime.sessions() as session:
            current = await session.run_sync(_job_detail, job_id, project_id)
        return {"type": "state", "job_id": job_id, "snapshot": True, **current.model_dump(mode="json")}

    async def state() -> str:
        async with runtime.sessions() as session:
            return (await session.run_sync(repo.get_job, job_id, project_id)).state.value

    return await runtime.streams.respond(project_id, job_id, last_event_id, snapshot, state)
