"""POST/GET /v1/sweeps (grid x seeds, all-or-nothing) and /v1/datasets (streamed upload)."""

from __future__ import annotations

import hashlib
import os

import pytest

from service.store.keys import Keys
from tests.api.helpers import JOB, auth

pytestmark = pytest.mark.redis


async def test_sweep_expands_grid_times_seeds(client, make_token, settings, redis_client):
    token = make_token()
    body = {"name": "k", "base": JOB, "grid": {"tbptt.k1": [4, 8, 16], "clip.max_norm": [0.5, 1.0]}, "seeds": 2, "max_parallel": 3}
    r = await client.post("/v1/sweeps", json=body, headers=auth(token))
    assert r.status_code == 201, r.text
    sweep = r.json()
    assert sweep["state"] == "queued" and sweep["counts"] == {"queued": 12} and len(sweep["jobs"]) == 12
    points = {(row["point"]["tbptt.k1"], row["point"]["clip.max_norm"], row["seed"]) for row in sweep["jobs"]}
    assert points == {(k, c, s) for k in (4, 8, 16) for c in (0.5, 1.0) for s in (0, 1)}
    assert await redis_client.hlen(Keys(settings.redis_prefix).queue_members) == 12

    jobs = (await client.get("/v1/jobs", params={"sweep_id": sweep["id"], "limit": 100}, headers=auth(token))).json()["jobs"]
    assert len(jobs) == 12 and all(j["sweep_id"] == sweep["id"] for j in jobs)
    assert {j["config"]["train"]["seed"] for j in jobs} == {0, 1}

    got = (await client.get(f"/v1/sweeps/{sweep['id']}", headers=auth(token))).json()
    assert got["max_parallel"] == 3 and got["grid"] == body["grid"]
    cancel = await client.post(f"/v1/sweeps/{sweep['id']}/cancel", headers=auth(token))
    assert cancel.status_code == 202 and cancel.json()["cancelled"] == 12
    got = (await client.get(f"/v1/sweeps/{sweep['id']}", headers=auth(token))).json()
    assert got["state"] == "cancelled" and got["cancel_requested"] is True
    assert await redis_client.hlen(Keys(settings.redis_prefix).queue_members) == 0


async def test_sweep_is_all_or_nothing(client, make_token, db):
    token = make_token()
    body = {"base": JOB, "grid": {"tbptt.k1": [4, 0, 8]}}
    r = await client.post("/v1/sweeps", json=body, headers=auth(token))
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "grid.tbptt.k1" and "value 0" in r.json()["error"]["message"]
    bad_base = await client.post("/v1/sweeps", json={"base": {**JOB, "bogus": 1}, "grid": {}}, headers=auth(token))
    assert bad_base.status_code == 422 and bad_base.json()["error"]["field"] == "base.bogus"
    not_a_section = await client.post("/v1/sweeps", json={"base": JOB, "grid": {"name.x": [1]}}, headers=auth(token))
    assert not_a_section.status_code == 422 and not_a_section.json()["error"]["field"] == "grid.name.x"
    assert (await client.get("/v1/jobs", headers=auth(token))).json()["jobs"] == []


async def test_sweep_limits(client, make_token, settings):
    token = make_token()
    settings.max_sweep_jobs = 5
    r = await client.post("/v1/sweeps", json={"base": JOB, "grid": {"tbptt.k1": [1, 2, 3]}, "seeds": 2}, headers=auth(token))
    assert r.status_code == 422 and r.json()["error"]["field"] == "grid"
    settings.max_queued_per_project = 2
    r = await client.post("/v1/sweeps", json={"base": JOB, "grid": {"tbptt.k1": [1, 2, 3]}}, headers=auth(token))
    assert r.status_code == 429
    r = await client.post("/v1/sweeps", json={"base": JOB, "grid": {}, "seeds": 0}, headers=auth(token))
    assert r.status_code == 422 and r.json()["error"]["field"] == "seeds"


async def test_upload_streams_with_sha256_and_cap(client, make_token, settings, tmp_path):
    token = make_token()
    blob = os.urandom(200_000)
    r = await client.post("/v1/datasets", params={"name": "corpus.bin"}, content=blob, headers=auth(token))
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["bytes"] == len(blob) and ds["sha256"] == hashlib.sha256(blob).hexdigest() and ds["name"] == "corpus.bin"

    async def chunks():  # no Content-Length: the cap applies while streaming
        for _ in range(settings.max_upload_bytes // 65536 + 2):
            yield b"x" * 65536

    too_big = await client.post("/v1/datasets", params={"name": "big"}, content=chunks(), headers=auth(token))
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "too_large"
    declared = await client.post(
        "/v1/datasets", params={"name": "big"}, content=b"x" * (settings.max_upload_bytes + 1), headers=auth(token)
    )
    assert declared.status_code == 413
    # nothing of the refused uploads is left in the store
    stored = [p for p in (tmp_path / "artifacts").rglob("*") if p.is_file()]
    assert len(stored) == 1 and stored[0].read_bytes() == blob

    # multipart/form-data is an upload too (tests/api/test_data_lifecycle.py): named by `name` here
    multipart = await client.post("/v1/datasets", params={"name": "m"}, files={"file": b"abc"}, headers=auth(token))
    assert multipart.status_code == 201 and multipart.json()["name"] == "m" and multipart.json()["bytes"] == 3
    no_name = await client.post("/v1/datasets", content=b"abc", headers=auth(token))
    assert no_name.status_code == 422 and no_name.json()["error"]["field"] == "name"

    listed = (await client.get("/v1/datasets", headers=auth(token))).json()["datasets"]
    assert [d["id"] for d in listed] == [multipart.json()["id"], ds["id"]]
    assert (await client.get("/v1/datasets", headers=auth(make_token("other")))).json()["datasets"] == []


async def test_uploads_are_pinned_by_sha256_in_the_config(client, make_token):
    """data.dataset and data.valid_dataset name uploads; the job's config records their sha256
    (a rerun proves it trained on the same bytes) and a wrong pin is refused, naming it."""
    token = make_token()
    train, valid = b"abcabcabc\n\nabcab" * 50, b"cabcab\n\nbca" * 10
    ids = []
    for name, blob in (("train.txt", train), ("valid.txt", valid)):
        r = await client.post("/v1/datasets", params={"name": name}, content=blob, headers=auth(token))
        ids.append(r.json()["id"])
    text = {"kind": "text", "dataset": ids[0], "valid_dataset": ids[1]}
    r = await client.post("/v1/jobs", json={**JOB, "data": text}, headers=auth(token))
    assert r.status_code == 201, r.text
    data = r.json()["config"]["data"]
    assert data["sha256"] == hashlib.sha256(train).hexdigest() and data["valid_sha256"] == hashlib.sha256(valid).hexdigest()
    # the same pin again (a rerun of that config) is accepted; another is not
    assert (await client.post("/v1/jobs", json={**JOB, "data": data}, headers=auth(token))).status_code == 201
    wrong = await client.post("/v1/jobs", json={**JOB, "data": {**text, "valid_sha256": "0" * 64}}, headers=auth(token))
    assert wrong.status_code == 422 and wrong.json()["error"]["field"] == "data.valid_sha256"
    missing = await client.post("/v1/jobs", json={**JOB, "data": {**text, "valid_dataset": "ds_nope"}}, headers=auth(token))
    assert missing.status_code == 422 and missing.json()["error"]["field"] == "data.valid_dataset"
    both = await client.post("/v1/jobs", json={**JOB, "data": {**text, "valid_path": "v.txt"}}, headers=auth(token))
    assert both.status_code == 422 and both.json()["error"]["field"] == "data.valid_path"
    # a sweep pins every grid point, not only the first that names a dataset
    sweep = await client.post("/v1/sweeps", json={"base": {**JOB, "data": text}, "grid": {"tbptt.k1": [4, 8]}}, headers=auth(token))
    assert sweep.status_code == 201, sweep.text
    for point in sweep.json()["jobs"]:
        config = (await client.get(f"/v1/jobs/{point['job_id']}", headers=auth(token))).json()["config"]
        assert config["data"]["sha256"] == data["sha256"]
