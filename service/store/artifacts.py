"""The artifact store: checkpoints and uploaded datasets under `UNROLL_ARTIFACTS`.

A local directory or any fsspec URL (s3://, gs://, memory://, ...). Objects are written
to a temporary name and then moved into place where the filesystem allows it, so a
reader never sees a torn file. Every object's URI is recorded in the database.

Deleting goes the other way: the database rows first, then the files (``discard``). A file
that cannot be removed is logged as an orphan and left; a row never points at nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import fsspec
from fsspec.core import url_to_fs

CHUNK = 1 << 20

log = logging.getLogger("unroll.artifacts")


@dataclass(frozen=True)
class Stored:
    uri: str
    bytes: int
    sha256: str


class ArtifactStore:
    def __init__(self, root: str):
        if "://" not in root:
            root = str(Path(root).resolve())
        self.root = root.rstrip("/")
        self.fs, self._base = url_to_fs(self.root)

    def uri(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def checkpoint_uri(self, job_id: str, step: int, attempt: int) -> str:
        """Where attempt `attempt` of a job keeps its checkpoint of `step`: per attempt, so a
        stale attempt never overwrites the file the current one recorded."""
        return self.uri("jobs", job_id, "checkpoints", f"step-{step:08d}-a{attempt}.pt")

    def model_uri(self, job_id: str, attempt: int) -> str:
        """A completed run's model artifact (per attempt, as checkpoints are)."""
        return self.uri("jobs", job_id, f"model-a{attempt}.pt")

    def dataset_uri(self, dataset_id: str, filename: str) -> str:
        return self.uri("datasets", dataset_id, _safe_name(filename))

    def job_folder(self, job_id: str) -> str:
        """Everything stored for one job (its checkpoints of every attempt)."""
        return self.uri("jobs", job_id)

    def dataset_folder(self, dataset_id: str) -> str:
        return self.uri("datasets", dataset_id)

    def remove(self, uri: str, *, recursive: bool = False) -> None:
        """Delete an object (or, recursive, a folder and all in it); one already gone is fine."""
        fs, path = url_to_fs(uri)
        try:
            fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass

    def discard(self, uris: Iterable[str], folders: Iterable[str] = ()) -> list[str]:
        """Remove files whose database records are already deleted (and committed), then the
        folders that held them. Never raises: what cannot be removed is logged as an orphan
        (to delete by hand) and returned."""
        orphans = []
        for uri, recursive in [*((u, False) for u in uris), *((f, True) for f in folders)]:
            try:
                self.remove(uri, recursive=recursive)
            except Exception as exc:  # noqa: BLE001 - the rows are gone either way
                log.warning("orphan left in the artifact store: %s (%s)", uri, exc)
                orphans.append(uri)
        return orphans

    def put_bytes(self, uri: str, data: bytes) -> Stored:
        return self.put_stream(uri, iter([data]))

    def put_stream(self, uri: str, chunks: Iterator[bytes], max_bytes: int | None = None) -> Stored:
        """Write chunks to `uri`; raise TooLarge (and leave nothing) past max_bytes."""
        fs, path = url_to_fs(uri)
        parent = path.rsplit("/", 1)[0]
        fs.makedirs(parent, exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        digest, size = hashlib.sha256(), 0
        try:
            with fs.open(tmp, "wb") as out:
                for chunk in chunks:
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise TooLarge(max_bytes)
                    digest.update(chunk)
                    out.write(chunk)
            fs.mv(tmp, path)
        except BaseException:
            if fs.exists(tmp):
                fs.rm(tmp)
            raise
        return Stored(uri=uri, bytes=size, sha256=digest.hexdigest())

    def open(self, uri: str) -> BinaryIO:
        return fsspec.open(uri, "rb").open()

    def read_bytes(self, uri: str) -> bytes:
        with self.open(uri) as fh:
            return fh.read()

    def iter_bytes(self, uri: str) -> Iterator[bytes]:
        with self.open(uri) as fh:
            while chunk := fh.read(CHUNK):
                yield chunk

    def local_path(self, uri: str, cache_dir: str | os.PathLike) -> Path:
        """A local file with the object's content (the object itself when it is local)."""
        fs, path = url_to_fs(uri)
        if "file" in _protocols(fs):
            return Path(path)
        target = Path(cache_dir) / hashlib.sha256(uri.encode()).hexdigest()[:16] / Path(path).name
        if not target.exists():
            # Into a file of this call's own, then renamed: a concurrent caller (the API's
            # threads, a worker's attempts) never opens a half-written copy.
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.part")
            try:
                fs.get(path, str(partial))
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
        return target


class TooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"larger than {limit} bytes")
        self.limit = limit


def _protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return protocol if isinstance(protocol, tuple) else (protocol,)


def _safe_name(name: str) -> str:
    base = os.path.basename(name.replace("\\", "/"))
    if not base.strip("."):  # "", "." and ".." would name a folder, not a file in it
        base = "data"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in base)[:128]
