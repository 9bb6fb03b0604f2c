"""Deletion and uploads against a hostile caller, one test per case: another project's job
or dataset (404, and it stays), a running job (409), a dataset in use (409), an upload over
the project's storage quota (refused, nothing stored), a client that stalls mid-upload
(408, nothing stored), and multipart file names that try to leave the store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import sqlalchemy as sa

from service.store.db import states
from service.store.db.models import Dataset, Job
from tests.api.helpers import LiveServer, auth, job
from tests.api.test_data_lifecycle import files_under, stalled_upload

pytestmark = pytest.mark.redis


def count(db, model, **where) -> int:
    db.rollback()  # a fresh snapshot: the API committed in another connection
    stmt = sa.select(sa.func.count()).select_from(model)
    for column, value in where.items():
        stmt = stmt.where(getattr(model, column) == value)
    return db.execute(stmt).scalar_one()


async def test_another_projects_job_cannot_be_deleted(client, db, make_token):
    owner, intruder = make_token("owner"), make_token("intruder")
    job_id = (await client.post("/v1/jobs", json=job(), headers=auth(owner))).json()["id"]
    assert (await client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(owner))).status_code == 202
    r = await client.delete(f"/v1/jobs/{job_id}", headers=auth(intruder))
    unknown = await client.delete("/v1/jobs/job_0123456789abcdef", headers=auth(intruder))
    # what an unknown id answers: nothing is revealed
    assert r.status_code == unknown.status_code == 404 and r.json()["error"]["code"] == unknown.json()["error"]["code"], r.text
    assert count(db, Job, id=job_id) == 1


async def test_another_projects_dataset_cannot_be_deleted(client, db, make_token, settings):
    owner, intruder = make_token("owner"), make_token("intruder")
    dataset = (await client.post("/v1/datasets", params={"name": "a.txt"}, content=b"abc", headers=auth(owner))).json()
    for method in ("GET", "DELETE"):
        r = await client.request(method, f"/v1/datasets/{dataset['id']}", headers=auth(intruder))
        assert r.status_code == 404, r.text
    assert count(db, Dataset, id=dataset["id"]) == 1
    assert len(files_under(Path(settings.artifacts) / "datasets" / dataset["id"])) == 1


async def test_a_running_job_cannot_be_deleted(client, db, make_token):
    token = make_token()
    job_id = (await client.post("/v1/jobs", json=job(), headers=auth(token))).json()["id"]
    states.claim(db, job_id, "w1", 30)
    db.commit()
    r = await client.delete(f"/v1/jobs/{job_id}", headers=auth(token))
    assert r.status_code == 409 and "cancel it first" in r.json()["error"]["message"], r.text
    assert count(db, Job, id=job_id) == 1


async def test_a_dataset_in_use_cannot_be_deleted(client, db, make_token, settings):
    token = make_token()
    dataset = (await client.post("/v1/datasets", params={"name": "a.txt"}, content=b"abc " * 100, headers=auth(token))).json()
    job_id = (await client.post("/v1/jobs", json=job(data={"kind": "text", "dataset": dataset["id"]}), headers=auth(token))).json()["id"]
    states.claim(db, job_id, "w1", 30)  # running: it reads the file now
    db.commit()
    r = await client.delete(f"/v1/datasets/{dataset['id']}", headers=auth(token))
    assert r.status_code == 409 and job_id in r.json()["error"]["message"], r.text
    assert count(db, Dataset, id=dataset["id"]) == 1
    assert len(files_under(Path(settings.artifacts) / "datasets" / dataset["id"])) == 1


async def test_an_upload_over_the_storage_quota_is_refused_and_nothing_is_stored(client, db, make_token, settings):
    token = make_token()
    settings.max_dataset_bytes_per_project = 100_000
    assert (await client.post("/v1/datasets", params={"name": "a"}, content=os.urandom(60_000), headers=auth(token))).status_code == 201

    async def flood():  # no Content-Length: only the running total can stop it
        for _ in range(4):
            yield os.urandom(30_000)

    r = await client.post("/v1/datasets", params={"name": "b"}, content=flood(), headers=auth(token))
    assert r.status_code == 429 and "100000" in r.json()["error"]["message"], r.text
    multipart = await client.post("/v1/datasets", files={"file": ("c", os.urandom(60_000))}, headers=auth(token))
    assert multipart.status_code == 429, multipart.text
    assert count(db, Dataset) == 1 and len(files_under(Path(settings.artifacts))) == 1


def test_a_stalled_upload_is_a_408_and_nothing_is_stored(settings, make_token, db, redis_client):
    # The multipart form: stalled inside the file part, after its headers were read.
    from service.api.app import create_app

    settings.upload_read_timeout_s = 0.3
    token = make_token()
    start = b'--b\r\nContent-Disposition: form-data; name="file"; filename="slow.txt"\r\n\r\nthe first bytes'
    with LiveServer(create_app(settings)) as server:
        answer = stalled_upload(server.port, token, "/v1/datasets", start, "multipart/form-data; boundary=b")
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert files_under(Path(settings.artifacts)) == [] and count(db, Dataset) == 0


@pytest.mark.parametrize(("filename", "stored_as"), [
    ("../../../../escaped.txt", "escaped.txt"),
    ("..\\..\\..\\escaped.txt", "escaped.txt"),
    ("/etc/cron.d/escaped", "escaped"),
    ("C:\\Windows\\escaped.ini", "escaped.ini"),
    ("..", None),
    ("../..", None),
    ("a/b/", "b"),
    ("", None),
])
async def test_a_multipart_file_name_cannot_escape_the_store(client, db, make_token, settings, tmp_path, filename, stored_as):
    body = (f'--b\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n\r\n'.encode()
            + b"payload\r\n--b--\r\n")
    r = await client.post("/v1/datasets", content=body, headers={**auth(make_token()), "Content-Type": "multipart/form-data; boundary=b"})
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    if stored_as is None:
        assert r.status_code == 422 and r.json()["error"]["field"] == "file", r.text
        assert files == []
        return
    assert r.status_code == 201, r.text
    dataset = r.json()
    assert dataset["name"] == stored_as
    # the one file written anywhere under the test's folder is inside the dataset's own folder
    assert files == [Path(settings.artifacts) / "datasets" / dataset["id"] / stored_as]
    assert files[0].read_bytes() == b"payload"
