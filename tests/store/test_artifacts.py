"""The artifact store on a local directory and on fsspec's in-memory filesystem."""

from __future__ import annotations

import hashlib
import uuid

import pytest

from service.store.artifacts import ArtifactStore, TooLarge


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    root = str(tmp_path / "artifacts") if request.param == "local" else f"memory://unroll-{uuid.uuid4().hex}"
    return ArtifactStore(root)


def test_put_and_read_back(store, tmp_path):
    uri = store.checkpoint_uri("job_1", 500, 2)
    assert uri.endswith("jobs/job_1/checkpoints/step-00000500-a2.pt")
    stored = store.put_stream(uri, iter([b"abc", b"def"]))
    assert stored.bytes == 6 and stored.sha256 == hashlib.sha256(b"abcdef").hexdigest()
    assert store.read_bytes(uri) == b"abcdef"
    assert b"".join(store.iter_bytes(uri)) == b"abcdef"
    assert store.local_path(uri, tmp_path / "cache").read_bytes() == b"abcdef"


def test_size_cap_leaves_nothing_behind(store):
    uri = store.dataset_uri("ds_1", "../../etc/passwd")
    assert "/datasets/ds_1/passwd" in uri  # names cannot climb out of their folder
    with pytest.raises(TooLarge):
        store.put_stream(uri, iter([b"x" * 10, b"y" * 10]), max_bytes=15)
    assert not store.fs.exists(uri.split("://", 1)[-1] if "://" in uri else uri)
    assert store.fs.find(store._base) == []
