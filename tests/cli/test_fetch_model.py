"""The Python client's `fetch_model` / `load(job_id)` against the real API on a socket:
a completed job's model artifact when it has one (downloaded once, checked by sha256),
else its latest checkpoint."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from service.cli.client import Client
from service.store.artifacts import ArtifactStore
from service.store.db import repo, states
from service.store.db.models import JobState
from tests.api.conftest import app, client, data_root, db, live_server, make_token, settings  # noqa: F401
from tests.api.helpers import auth, job
from tests.api.inference_helpers import text_checkpoint
from tests.api.test_model_artifact import as_model

pytestmark = pytest.mark.redis


def finished(live_server, db, settings, token: str, *, with_model: bool) -> str:  # noqa: F811
    job_id = httpx.post(f"{live_server.url}/v1/jobs", json=job(), headers=auth(token)).json()["id"]
    attempt = states.claim(db, job_id, "w1", 30)
    store = ArtifactStore(settings.artifacts)
    file = store.put_bytes(store.checkpoint_uri(job_id, 30, attempt), text_checkpoint())
    repo.add_checkpoint(db, job_id, attempt, step=30, uri=file.uri, bytes=file.bytes, sha256=file.sha256)
    summary: dict = {"steps": 30}
    if with_model:
        model = store.put_bytes(store.model_uri(job_id, attempt), as_model(text_checkpoint(), 10))
        summary["model"] = {"uri": model.uri, "bytes": model.bytes, "sha256": model.sha256, "step": 10, "selected": "best", "valid_loss": 1.5}
    assert states.finish(db, job_id, attempt, JobState.SUCCEEDED, summary=summary)
    db.commit()
    return job_id


def test_the_client_loads_the_model_artifact_once(live_server, db, settings, make_token, tmp_path: Path):  # noqa: F811
    token = make_token()
    api = Client(live_server.url, token)
    with_model = finished(live_server, db, settings, token, with_model=True)
    path = api.fetch_model(with_model, tmp_path)
    assert path.name.startswith("model-") and api.load(with_model, folder=tmp_path).artifact.step == 10
    before = path.stat().st_mtime_ns
    assert api.fetch_model(with_model, tmp_path) == path and path.stat().st_mtime_ns == before  # not fetched again
    path.write_bytes(b"damaged")  # a file whose sha256 differs is fetched again
    assert api.load(with_model, folder=tmp_path).artifact.step == 10

    without = finished(live_server, db, settings, token, with_model=False)
    assert api.fetch_model(without, tmp_path).name == "30.pt"
