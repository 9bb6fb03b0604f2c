"""Trained models registered as jobs, for the tests of the inference routes: a tiny model
trained in-process once per test run (tests/trainer/usage.py), then recorded as a succeeded
job of a project with its checkpoint in the test's artifact store."""

from __future__ import annotations

import functools
import io
import tempfile
from pathlib import Path
from typing import Any

import torch

from service.cli.client import parse_sse
from service.store.artifacts import ArtifactStore
from service.store.db import repo, states
from service.store.db.models import JobState
from tests.api.helpers import auth, job
from tests.trainer.usage import series_config, text_config, train


@functools.cache
def text_checkpoint() -> bytes:
    """A char-level LSTM's checkpoint (20 steps of training), as bytes."""
    folder = Path(tempfile.mkdtemp(prefix="unroll-text-model-"))
    path, _ = train(folder, text_config(folder))
    return path.read_bytes()


@functools.cache
def series_checkpoint() -> bytes:
    folder = Path(tempfile.mkdtemp(prefix="unroll-series-model-"))
    path, _ = train(folder, series_config(folder, ["load", "temp"]))
    return path.read_bytes()


def without_inference(blob: bytes) -> bytes:
    """The checkpoint as a format-1 one: no inference section."""
    state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    state.pop("inference")
    state["format"] = 1
    out = io.BytesIO()
    torch.save(state, out)
    return out.getvalue()


async def trained_job(client, db, settings, token: str, blob: bytes | None, step: int = 20) -> str:
    """A succeeded job of the token's project whose checkpoint (of `step`) is `blob`
    (None: a job that finished without writing one)."""
    made = await client.post("/v1/jobs", json=job(), headers=auth(token))
    assert made.status_code == 201, made.text
    job_id = made.json()["id"]
    attempt = states.claim(db, job_id, "w1", 30)
    if blob is not None:
        store = ArtifactStore(settings.artifacts)
        file = store.put_bytes(store.checkpoint_uri(job_id, step, attempt), blob)
        repo.add_checkpoint(db, job_id, attempt, step=step, uri=file.uri, bytes=file.bytes, sha256=file.sha256)
    assert states.finish(db, job_id, attempt, JobState.SUCCEEDED)
    db.commit()
    return job_id


def events(body: str) -> list[dict[str, Any]]:
    return list(parse_sse(iter(body.splitlines())))
