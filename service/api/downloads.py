"""Stored files sent to a client: checkpoints and model artifacts, streamed from the
artifact store in 1 MiB reads (opened off the event loop), with their size and sha256."""

from __future__ import annotations

import asyncio

from fastapi.responses import StreamingResponse

from service.api.runtime import Runtime
from service.store.db.errors import NotFound

BINARY = {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}


async def stored_file(runtime: Runtime, uri: str, *, size: int, sha256: str, filename: str, what: tuple[str, str]) -> StreamingResponse:
    """The object at `uri` as an attachment; a 404 naming `what` when it is gone."""
    try:
        handle = await asyncio.to_thread(runtime.store.open, uri)
    except FileNotFoundError:
        raise NotFound(*what) from None

    def chunks():
        with handle:
            while chunk := handle.read(1 << 20):
                yield chunk

    return StreamingResponse(
        chunks(),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(size),
            "Content-Disposition": f'attachment; filename="{filename}"',
            "X-Checksum-Sha256": sha256,
        },
    )
