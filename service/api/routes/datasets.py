"""/v1/datasets: files uploaded for jobs to train on (``data.dataset`` in a job config).

An upload is either the raw request body, named by the `name` query parameter (``curl
--data-binary @corpus.txt '.../v1/datasets?name=corpus.txt'``), or a ``multipart/form-data``
body with one file part, named by its file name unless `name` is given (``curl -F
file=@corpus.txt .../v1/datasets``). Either way it is streamed to the artifact store chunk
by chunk (service.api.uploads), never held in memory, hashed on the way, and refused, with
nothing left in the store:

- 413 past ``UNROLL_MAX_UPLOAD_BYTES`` (one file);
- 429 past ``UNROLL_MAX_DATASET_BYTES_PER_PROJECT`` (all the project's datasets together):
  checked before the body is read, while it streams, and again when the record is written
  under a lock of the project's storage, so concurrent uploads cannot both pass;
- 408 when the client sends nothing for ``UNROLL_UPLOAD_READ_TIMEOUT_S``.

A dataset is deleted (row, then file) only while no queued or running job of the project
trains on it (409 otherwise).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response, status
from starlette.requests import ClientDisconnect

from service.api.deps import ProjectDep, RuntimeDep
from service.api.errors import ApiError, PayloadTooLarge, responses
from service.api.runtime import Runtime
from service.api.schemas import DatasetList, DatasetPublic
from service.api.uploads import BodyReader, Received, check_name, is_multipart, receive
from service.store.artifacts import TooLarge
from service.store.db import repo
from service.store.db.base import new_id

log = logging.getLogger("unroll.api")

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

UPLOAD_PATH = "/v1/datasets"

DatasetId = Annotated[str, Path(min_length=1, max_length=64, description="A dataset id (`ds_...`)")]


class StorageQuota(ApiError):
    def __init__(self, quota: int, used: int) -> None:
        super().__init__(
            429,
            "over_quota",
            f"the project's datasets would take more than its storage quota of {quota} bytes"
            f" (UNROLL_MAX_DATASET_BYTES_PER_PROJECT; {used} in use): delete some first (DELETE /v1/datasets/{{id}})",
        )


_BINARY = {"schema": {"type": "string", "format": "binary"}}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetPublic,
    summary="Upload a dataset (raw request body or multipart/form-data, streamed)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": _BINARY,
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}, "required": ["file"]}
                },
            },
        }
    },
    responses=responses(400, 401, 408, 413, 422, 429, 503),
)
async def upload_dataset(
    request: Request,
    project: ProjectDep,
    runtime: RuntimeDep,
    name: Annotated[
        str | None,
        Query(min_length=1, max_length=255, pattern=r"^[^\x00/\\]+$", description="File name (multipart: default, the file's)"),
    ] = None,
) -> DatasetPublic:
    settings = runtime.settings
    cap, quota = settings.max_upload_bytes, settings.max_dataset_bytes_per_project
    if name is not None:
        check_name(name, "name")
    content_type = request.headers.get("content-type", "")
    async with runtime.sessions() as session:
        used = await session.run_sync(repo.dataset_bytes, project.project_id)
    room = quota - used
    length = request.headers.get("content-length", "")
    declared = int(length) if length.isdigit() and not is_multipart(content_type) else 0
    if declared > cap:
        raise PayloadTooLarge(cap, "the upload")
    if room < 0 or declared > room:
        raise StorageQuota(quota, used)
    limit = min(cap, room)
    dataset_id = new_id("dataset")
    reader = BodyReader(request, asyncio.get_running_loop(), settings.upload_read_timeout_s)
    try:
        received = await asyncio.to_thread(
            receive, runtime.store, dataset_id, name, content_type, reader.read, limit
        )
    except BaseException as exc:
        # put_stream removed its partial file; the dataset's folder goes too.
        await asyncio.to_thread(runtime.store.discard, [], [runtime.store.dataset_folder(dataset_id)])
        if isinstance(exc, TooLarge):
            raise (PayloadTooLarge(cap, "the upload") if limit == cap else StorageQuota(quota, used)) from None
        if isinstance(exc, ClientDisconnect):
            raise ApiError(400, "bad_request", "the client went away during the upload") from None
        raise
    try:
        row = await _record(runtime, project.project_id, dataset_id, received, quota)
    except BaseException:
        await asyncio.to_thread(runtime.store.discard, [received.stored.uri], [runtime.store.dataset_folder(dataset_id)])
        raise
    return DatasetPublic.of(row)


async def _record(runtime: Runtime, project_id: str, dataset_id: str, received: Received, quota: int):
    """The dataset's row, if the project's datasets still fit its quota with it (other
    uploads may have finished meanwhile): counted after the insert, under the lock."""
    stored = received.stored

    def insert(session):
        repo.lock_project_storage(session, project_id)
        row = repo.create_dataset(
            session, project_id=project_id, name=received.name, sha256=stored.sha256, bytes=stored.bytes,
            uri=stored.uri, dataset_id=dataset_id,
        )
        used = repo.dataset_bytes(session, project_id)
        if used > quota:
            raise StorageQuota(quota, used - stored.bytes)
        return row

    async with runtime.sessions() as session, session.begin():
        return await session.run_sync(insert)


@router.get("", response_model=DatasetList, summary="The project's datasets, newest first", responses=responses(401, 422, 503))
async def list_datasets(
    project: ProjectDep, runtime: RuntimeDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> DatasetList:
    async with runtime.sessions() as session:
        rows = await session.run_sync(lambda s: repo.list_datasets(s, project.project_id, limit=limit))
    return DatasetList(datasets=[DatasetPublic.of(r) for r in rows])


@router.get("/{dataset_id}", response_model=DatasetPublic, summary="One dataset", responses=responses(401, 404, 503))
async def get_dataset(dataset_id: DatasetId, project: ProjectDep, runtime: RuntimeDep) -> DatasetPublic:
    async with runtime.sessions() as session:
        row = await session.run_sync(repo.get_dataset, dataset_id, project.project_id)
    return DatasetPublic.of(row)


@router.delete(
    "/{dataset_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete a dataset no queued or running job uses",
    description="409 while a queued or running job of the project names it in `data.dataset` "
    "(cancel those, or wait for them to end). The record goes first, then the file; a finished job "
    "that named it keeps its results but can no longer be retried.",
    responses=responses(401, 404, 409, 503),
)
async def delete_dataset(dataset_id: DatasetId, project: ProjectDep, runtime: RuntimeDep) -> Response:
    async with runtime.sessions() as session, session.begin():
        uri = await session.run_sync(repo.delete_dataset, dataset_id, project.project_id)
    await asyncio.to_thread(runtime.store.discard, [uri], [runtime.store.dataset_folder(dataset_id)])
    return Response(status_code=status.HTTP_204_NO_CONTENT)
