"""/v1/datasets: files uploaded for jobs to train on (``data.dataset`` in a job config).

An upload is the raw request body (any Content-Type except multipart; the file name comes
in the `name` query parameter), e.g. ``curl --data-binary @corpus.txt
'.../v1/datasets?name=corpus.txt'``. It is streamed to the artifact store chunk by chunk,
never held in memory, hashed on the way, and refused with 413 past
``UNROLL_MAX_UPLOAD_BYTES`` (a partial file is removed).
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, Request, status
from starlette.requests import ClientDisconnect

from service.api.deps import ProjectDep, RuntimeDep
from service.api.errors import ApiError, Invalid, PayloadTooLarge, responses
from service.api.schemas import DatasetList, DatasetPublic
from service.store.artifacts import TooLarge
from service.store.db import repo
from service.store.db.base import new_id

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

UPLOAD_PATH = "/v1/datasets"


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetPublic,
    summary="Upload a dataset (raw request body, streamed)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
    responses=responses(400, 401, 413, 422, 503),
)
async def upload_dataset(
    request: Request,
    project: ProjectDep,
    runtime: RuntimeDep,
    name: Annotated[str, Query(min_length=1, max_length=255, pattern=r"^[^\x00/\\]+$", description="File name")],
) -> DatasetPublic:
    cap = runtime.settings.max_upload_bytes
    if not name.strip("."):  # "." and ".." name directories, not files
        raise Invalid("name", "must name a file, not . or ..")
    if request.headers.get("content-type", "").startswith("multipart/"):
        raise ApiError(415, "unsupported_media_type", "send the file as the raw request body, not multipart")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > cap:
        raise PayloadTooLarge(cap, "the upload")
    uri = runtime.store.dataset_uri(new_id("dataset"), name)
    loop = asyncio.get_running_loop()
    body = request.stream().__aiter__()

    def chunks():
        # The store writes in a worker thread; each chunk is fetched from the event loop.
        while True:
            try:
                chunk = asyncio.run_coroutine_threadsafe(body.__anext__(), loop).result()
            except StopAsyncIteration:
                return
            if chunk:
                yield chunk

    try:
        stored = await asyncio.to_thread(runtime.store.put_stream, uri, chunks(), cap)
    except TooLarge:
        raise PayloadTooLarge(cap, "the upload") from None
    except ClientDisconnect:
        raise ApiError(400, "bad_request", "the client went away during the upload") from None
    async with runtime.sessions() as session, session.begin():
        row = await session.run_sync(
            lambda s: repo.create_dataset(
                s, project_id=project.project_id, name=name, sha256=stored.sha256, bytes=stored.bytes, uri=stored.uri
            )
        )
    return DatasetPublic.of(row)


@router.get("", response_model=DatasetList, summary="The project's datasets, newest first", responses=responses(401, 422, 503))
async def list_datasets(
    project: ProjectDep, runtime: RuntimeDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> DatasetList:
    async with runtime.sessions() as session:
        rows = await session.run_sync(lambda s: repo.list_datasets(s, project.project_id, limit=limit))
    return DatasetList(datasets=[DatasetPublic.of(r) for r in rows])
