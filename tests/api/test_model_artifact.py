"""A completed job's model artifact over HTTP (issue 15 part 1): shown in the job's summary
with a download URL (never its storage location), downloaded by GET /v1/jobs/{id}/model,
and preferred by the inference routes over the latest checkpoint."""

from __future__ import annotations

import hashlib
import io

import pytest
import torch

from service.store.artifacts import ArtifactStore
from service.store.db import repo, states
from service.store.db.models import JobState
from tests.api.helpers import auth, job
from tests.api.inference_helpers import events, text_checkpoint
from trainer import checkpoint as ckpt

pytestmark = pytest.mark.redis


def as_model(blob: bytes, step: int) -> bytes:
    """The checkpoint's weights as a model artifact of `step` (what a completed run writes)."""
    state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    return ckpt.to_bytes({k: state[k] for k in ("format", "config", "model", "inference")} | {"step": step, "selected": "best", "valid_loss": 1.5})


async def completed_job(client, db, settings, token: str, *, checkpoint_step: int, model_step: int | None) -> str:
    job_id = (await client.post("/v1/jobs", json=job(), headers=auth(token))).json()["id"]
    attempt = states.claim(db, job_id, "w1", 30)
    store = ArtifactStore(settings.artifacts)
    file = store.put_bytes(store.checkpoint_uri(job_id, checkpoint_step, attempt), text_checkpoint())
    repo.add_checkpoint(db, job_id, attempt, step=checkpoint_step, uri=file.uri, bytes=file.bytes, sha256=file.sha256)
    summary = {"steps": checkpoint_step, "stopped": "completed"}
    if model_step is not None:
        model = store.put_bytes(store.model_uri(job_id, attempt), as_model(text_checkpoint(), model_step))
        summary["model"] = {"uri": model.uri, "bytes": model.bytes, "sha256": model.sha256, "step": model_step, "selected": "best", "valid_loss": 1.5}
    assert states.finish(db, job_id, attempt, JobState.SUCCEEDED, summary=summary)
    db.commit()
    return job_id


async def test_the_model_is_listed_downloaded_and_used(client, db, settings, make_token):
    token = make_token()
    job_id = await completed_job(client, db, settings, token, checkpoint_step=30, model_step=10)
    shown = (await client.get(f"/v1/jobs/{job_id}", headers=auth(token))).json()["summary"]["model"]
    assert shown["url"] == f"/v1/jobs/{job_id}/model" and "uri" not in shown and shown["step"] == 10
    # the storage location is in no answer: job lists and comparisons show the URL too
    other = await completed_job(client, db, settings, token, checkpoint_step=30, model_step=None)
    for path in ("/v1/jobs", f"/v1/compare?jobs={job_id},{other}"):
        r = await client.get(path, headers=auth(token))
        assert r.status_code == 200 and "/v1/jobs/" in r.text and settings.artifacts not in r.text, path

    r = await client.get(shown["url"], headers=auth(token))
    assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == shown["sha256"] == r.headers["x-checksum-sha256"]
    assert (await client.get(shown["url"], headers=auth(make_token("other")))).status_code == 404

    # generate runs the model artifact (the best, step 10), not the latest checkpoint (30)
    r = await client.post(f"/v1/jobs/{job_id}/generate", json={"prompt": "the ", "max_tokens": 5, "seed": 1}, headers=auth(token))
    assert events(r.text)[-1]["step"] == 10
    session = await client.post(f"/v1/jobs/{job_id}/sessions", json={}, headers=auth(token))
    assert session.status_code == 201 and session.json()["step"] == 10
    step = await client.post(f"/v1/sessions/{session.json()['id']}/step", json={"inputs": "the"}, headers=auth(token))
    assert step.status_code == 200, step.text


async def test_a_job_without_a_model_is_a_409_and_its_checkpoint_serves(client, db, settings, make_token):
    token = make_token()
    job_id = await completed_job(client, db, settings, token, checkpoint_step=30, model_step=None)
    r = await client.get(f"/v1/jobs/{job_id}/model", headers=auth(token))
    assert r.status_code == 409 and r.json()["error"]["code"] == "no_model"
    r = await client.post(f"/v1/jobs/{job_id}/generate", json={"prompt": "the ", "max_tokens": 5, "seed": 1}, headers=auth(token))
    assert events(r.text)[-1]["step"] == 30
