"""Reading an upload off the connection into the artifact store: the raw request body, or
the one file of a ``multipart/form-data`` body, chunk by chunk (never held whole).

The artifact store writes in a worker thread (its filesystems block), and that thread pulls
each chunk from the event loop through ``BodyReader.read``, which gives up when the client
has sent nothing for ``UNROLL_UPLOAD_READ_TIMEOUT_S`` (408): a client that stalls holds a
thread and a connection that long, not forever. A multipart body is parsed as it streams
(python-multipart's push parser): its form fields are skipped within small bounds, its file
part goes to the store, and a second file is refused. The caps on size are the store's
(``ArtifactStore.put_stream``): the file's bytes count, not the multipart framing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fastapi import Request
from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header

from service.api.errors import ApiError, Invalid
from service.store.artifacts import ArtifactStore, Stored

# A multipart body: at most this many parts, and this many bytes in all of its form fields
# (the parts without a file name), which are read and dropped.
MAX_PARTS = 16
MAX_FIELD_BYTES = 64 * 1024
# Headers per part, and bytes per header line (python-multipart's own bounds).
MAX_PART_HEADERS = 8
MAX_HEADER_BYTES = 4096
# A dataset's name is a column of this many characters.
MAX_NAME = 255

Read = Callable[[], "bytes | None"]


class UploadTimedOut(ApiError):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            408, "request_timeout",
            f"the client sent nothing for {timeout_s:g} s during the upload (UNROLL_UPLOAD_READ_TIMEOUT_S); nothing was stored",
            headers={"Connection": "close"},
        )


class BadMultipart(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(400, "bad_request", f"multipart body: {message}")


class BodyReader:
    """The request body, one chunk per `read()` from a worker thread; each read waits at
    most `timeout_s` for the client."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self._body = request.stream().__aiter__()
        self._loop = loop
        self._timeout_s = timeout_s

    async def _next(self) -> bytes | None:
        try:
            return await self._body.__anext__()
        except StopAsyncIteration:
            return None

    async def _next_in_time(self) -> bytes | None:
        try:
            return await asyncio.wait_for(self._next(), self._timeout_s)
        except TimeoutError:
            raise UploadTimedOut(self._timeout_s) from None

    def read(self) -> bytes | None:
        """The next non-empty chunk; None at the end of the body. Raises UploadTimedOut, or
        Starlette's ClientDisconnect."""
        while True:
            future = asyncio.run_coroutine_threadsafe(self._next_in_time(), self._loop)
            try:
                # Bounded here too: a loop that stopped (the server shutting down) never
                # completes the future, and this thread must not wait for it forever.
                chunk = future.result(timeout=self._timeout_s + 5)
            except concurrent.futures.TimeoutError:
                future.cancel()
                raise UploadTimedOut(self._timeout_s) from None
            if chunk is None or chunk:
                return chunk


def is_multipart(content_type: str) -> bool:
    return content_type.lower().startswith("multipart/")


def check_name(name: str, field: str) -> str:
    """A dataset's name as given (`name` query parameter, or a multipart file name reduced to
    its last path segment): a file name, never a folder; 422 naming `field` otherwise. The
    store derives its own safe file name from it (ArtifactStore.dataset_uri)."""
    if not name.strip("."):  # "." and ".." name directories, not files
        raise Invalid(field, "must name a file, not . or .. (nor be empty)")
    if "\x00" in name or "/" in name or "\\" in name or len(name) > MAX_NAME:
        raise Invalid(field, f"must be a file name of at most {MAX_NAME} characters, without / \\ or NUL")
    return name


def base_name(filename: str) -> str:
    """The last segment of a client's file name ("C:\\\\x\\\\a.txt", "../../a.txt" -> "a.txt"):
    browsers send only that, other clients sometimes a path, never to be followed."""
    return filename.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


class MultipartFile:
    """The one file part of a multipart/form-data body, parsed as the body streams in."""

    def __init__(self, content_type: str, read: Read) -> None:
        _, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if not boundary:
            raise BadMultipart("the Content-Type names no boundary")
        self._read = read
        self.filename: str | None = None
        self._data: deque[bytes] = deque()  # file bytes parsed and not yet handed on
        self._parts = self._field_bytes = 0
        self._in_file = self._file_done = self._ended = False
        self._headers: dict[bytes, bytes] = {}
        self._field = self._value = b""
        callbacks = {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }
        try:
            self._parser = MultipartParser(
                boundary, callbacks, max_header_count=MAX_PART_HEADERS, max_header_size=MAX_HEADER_BYTES
            )
        except (MultipartParseError, ValueError) as exc:  # e.g. a boundary over 70 characters
            raise BadMultipart(str(exc)) from None

    # -- python-multipart's callbacks ---------------------------------------------------

    def _part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise BadMultipart(f"more than {MAX_PARTS} parts")
        self._headers = {}

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.strip().lower()] = self._value.strip()
        self._field = self._value = b""

    def _headers_finished(self) -> None:
        disposition = self._headers.get(b"content-disposition", b"").decode("latin-1")
        _, params = parse_options_header(disposition)
        if b"filename" not in params:
            return  # a form field
        if self.filename is not None:
            raise Invalid("file", "send one file per upload")
        # parse_options_header decodes as latin-1; browsers send UTF-8.
        self.filename = params[b"filename"].decode("utf-8", errors="replace")
        self._in_file = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self._data.append(bytes(data[start:end]))
            return
        self._field_bytes += end - start
        if self._field_bytes > MAX_FIELD_BYTES:
            raise BadMultipart(f"form fields of more than {MAX_FIELD_BYTES} bytes besides the file")

    def _part_end(self) -> None:
        if self._in_file:
            self._in_file, self._file_done = False, True

    def _end(self) -> None:
        self._ended = True

    # -- reading ------------------------------------------------------------------------

    def _feed(self) -> bool:
        """Parse the next chunk of the body; False at its end."""
        chunk = self._read()
        if chunk is None:
            return False
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise BadMultipart(str(exc)) from None
        return True

    def open(self) -> str:
        """Read up to the file part's headers; its file name as the client sent it."""
        while self.filename is None:
            if self._ended or not self._feed():
                raise Invalid("file", "the multipart body has no file part (a part with a filename)")
        return self.filename

    def chunks(self) -> Iterator[bytes]:
        """The file's bytes, as they arrive. Then the rest of the body is read (bounded) to
        its end, so that a second file is refused; a body that ends inside the file is refused too."""
        while True:
            while self._data:
                yield self._data.popleft()
            if self._ended or not self._feed():
                break
        if not self._file_done:
            raise BadMultipart("the body ended inside the file part")


@dataclass(frozen=True)
class Received:
    name: str
    stored: Stored


def receive(
    store: ArtifactStore, dataset_id: str, name: str | None, content_type: str, read: Read, max_bytes: int
) -> Received:
    """Stream an upload into the store under `dataset_id` (from a worker thread). `name`:
    the `name` query parameter, already checked; a multipart upload without it is named
    by its file part. Raises TooLarge past `max_bytes` (nothing is left in the store),
    UploadTimedOut, ClientDisconnect, or an ApiError for a body that is not an upload."""
    if is_multipart(content_type):
        form = MultipartFile(content_type, read)
        filename = form.open()
        name = name or check_name(base_name(filename), "file")
        chunks: Iterator[bytes] = form.chunks()
    else:
        if name is None:
            raise Invalid("name", "required (the file name) for a raw upload")
        chunks = iter(read, None)
    return Received(name, store.put_stream(store.dataset_uri(dataset_id, name), chunks, max_bytes))
