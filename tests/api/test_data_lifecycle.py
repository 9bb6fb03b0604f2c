"""Deletion and retention over HTTP (docs/operations.md, "Retention and deletion"):
DELETE /v1/jobs/{id} (rows of every table, then files, then the queue), DELETE and GET
/v1/datasets/{id}, the per-project storage quota, multipart uploads, and a stalled upload
refused with 408. On SQLite and PostgreSQL, with real Redis and a real artifact store."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from pathlib import Path

import pytest
import sqlalchemy as sa

from service.store.artifacts import ArtifactStore
from service.store.db import repo, states
from service.store.db.models import Attempt, Checkpoint, Dataset, Job, JobLog, JobState, Metric, MetricBlock
from service.store.keys import Keys
from tests.api.helpers import auth, job

pytestmark = pytest.mark.redis

PER_JOB_TABLES = (Job, Attempt, Checkpoint, JobLog, Metric, MetricBlock)


def rows_of(db, job_id: str) -> dict[str, int]:
    """Rows that mention the job, per table (the job's own row under "jobs")."""
    db.rollback()  # a fresh snapshot: the API committed in another connection
    counts = {}
    for model in PER_JOB_TABLES:
        column = model.id if model is Job else model.job_id
        counts[model.__tablename__] = db.execute(sa.select(sa.func.count()).where(column == job_id)).scalar_one()
    return counts


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


async def finished_job(client, db, settings, token: str, state: JobState = JobState.SUCCEEDED, **config) -> str:
    """A job that ran: an attempt, 100 metric points (two metric blocks), log lines, two
    checkpoint files and their records, and a final state."""
    made = await client.post("/v1/jobs", json=job(**config), headers=auth(token))
    assert made.status_code == 201, made.text
    job_id = made.json()["id"]
    store = ArtifactStore(settings.artifacts)
    attempt = states.claim(db, job_id, "w1", 30)
    repo.insert_metrics(db, job_id, attempt, [("train/loss", step, 1.0 / step) for step in range(1, 101)])
    repo.append_logs(db, job_id, attempt, ["hello", "bye"])
    for step in (50, 100):
        file = store.put_bytes(store.checkpoint_uri(job_id, step, attempt), os.urandom(64))
        repo.add_checkpoint(db, job_id, attempt, step=step, uri=file.uri, bytes=file.bytes, sha256=file.sha256)
    assert states.finish(db, job_id, attempt, state)
    db.commit()
    return job_id


# --- DELETE /v1/jobs/{id} -----------------------------------------------------------------


async def test_deleting_a_job_removes_every_row_and_file_of_it_and_nothing_else(client, db, settings, make_token):
    token = make_token()
    doomed = await finished_job(client, db, settings, token)
    kept = await finished_job(client, db, settings, token, JobState.FAILED)
    jobs_root = Path(settings.artifacts) / "jobs"
    assert all(rows_of(db, doomed)[table] > 0 for table in ("jobs", "attempts", "checkpoints", "job_logs", "metrics", "metric_blocks"))
    before_kept = rows_of(db, kept)

    r = await client.delete(f"/v1/jobs/{doomed}", headers=auth(token))
    assert r.status_code == 204 and r.content == b"", r.text
    assert set(rows_of(db, doomed).values()) == {0}
    assert not (jobs_root / doomed).exists()  # its files and its folder
    assert rows_of(db, kept) == before_kept and len(files_under(jobs_root / kept)) == 2
    assert (await client.get(f"/v1/jobs/{doomed}", headers=auth(token))).status_code == 404
    again = await client.delete(f"/v1/jobs/{doomed}", headers=auth(token))
    assert again.status_code == 404 and again.json()["error"]["code"] == "not_found"


async def test_a_queued_or_running_job_is_a_409_that_says_cancel_it_first(client, db, make_token, settings, redis_client):
    token = make_token()
    queued = (await client.post("/v1/jobs", json=job(), headers=auth(token))).json()["id"]
    running = (await client.post("/v1/jobs", json=job(), headers=auth(token))).json()["id"]
    states.claim(db, running, "w1", 30)
    db.commit()
    for job_id in (queued, running):
        r = await client.delete(f"/v1/jobs/{job_id}", headers=auth(token))
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "conflict" and "cancel it first" in r.json()["error"]["message"]
        assert rows_of(db, job_id)["jobs"] == 1

    # cancelled (a queued job at once), it can go, and the queue no longer holds it
    keys = Keys(settings.redis_prefix)
    assert (await client.post(f"/v1/jobs/{queued}/cancel", headers=auth(token))).json()["state"] == "cancelled"
    await redis_client.hset(keys.queue_members, queued, 0)  # as if the cancel's removal had failed
    assert (await client.delete(f"/v1/jobs/{queued}", headers=auth(token))).status_code == 204
    assert not await redis_client.hexists(keys.queue_members, queued)


async def test_a_sweeps_job_can_be_deleted_and_the_sweep_counts_one_fewer(client, db, make_token):
    token = make_token()
    made = await client.post("/v1/sweeps", json={"base": job(), "grid": {"tbptt.k1": [4, 8]}}, headers=auth(token))
    sweep = made.json()
    assert (await client.post(f"/v1/sweeps/{sweep['id']}/cancel", headers=auth(token))).status_code == 202
    first, second = (row["job_id"] for row in sweep["jobs"])
    assert (await client.delete(f"/v1/jobs/{first}", headers=auth(token))).status_code == 204
    after = (await client.get(f"/v1/sweeps/{sweep['id']}", headers=auth(token))).json()
    assert [row["job_id"] for row in after["jobs"]] == [second] and after["counts"] == {"cancelled": 1}
    assert (await client.delete(f"/v1/jobs/{second}", headers=auth(token))).status_code == 204
    empty = await client.get(f"/v1/sweeps/{sweep['id']}", headers=auth(token))  # still there, with no jobs
    assert empty.status_code == 200 and empty.json()["jobs"] == [] and empty.json()["counts"] == {}, empty.text


async def test_files_that_cannot_be_removed_are_logged_and_no_row_is_left(client, db, settings, make_token, app, monkeypatch, caplog):
    """Rows go first: a store that fails to delete leaves orphan files (logged), never rows
    that point at nothing."""
    token = make_token()
    job_id = await finished_job(client, db, settings, token)
    store = app.state.runtime.store

    def broken(uri, *, recursive=False):
        raise PermissionError(f"cannot remove {uri}")

    monkeypatch.setattr(store, "remove", broken)
    logger = logging.getLogger("unroll.artifacts")
    logger.addHandler(caplog.handler)
    try:
        r = await client.delete(f"/v1/jobs/{job_id}", headers=auth(token))
    finally:
        logger.removeHandler(caplog.handler)
    assert r.status_code == 204, r.text
    assert set(rows_of(db, job_id).values()) == {0}
    assert len(files_under(Path(settings.artifacts) / "jobs" / job_id)) == 2  # the orphans
    orphans = {record.getMessage() for record in caplog.records if "orphan" in record.getMessage()}
    assert len(orphans) == 3  # two files and their folder, each named


# --- datasets -----------------------------------------------------------------------------


async def upload(client, token, data: bytes, name: str = "corpus.txt"):
    return await client.post("/v1/datasets", params={"name": name}, content=data, headers=auth(token))


async def test_a_dataset_is_deleted_once_no_active_job_uses_it(client, db, settings, make_token):
    token = make_token()
    dataset = (await upload(client, token, b"hello world\n" * 100)).json()
    other = (await upload(client, token, b"another")).json()
    shown = await client.get(f"/v1/datasets/{dataset['id']}", headers=auth(token))
    assert shown.status_code == 200 and shown.json() == dataset
    text = {"kind": "text", "dataset": dataset["id"]}
    user = (await client.post("/v1/jobs", json=job(data=text), headers=auth(token))).json()["id"]
    stranger = (await client.post("/v1/jobs", json=job(data={"kind": "text", "dataset": other["id"]}), headers=auth(token))).json()["id"]

    r = await client.delete(f"/v1/datasets/{dataset['id']}", headers=auth(token))
    assert r.status_code == 409 and user in r.json()["error"]["message"] and stranger not in r.json()["error"]["message"], r.text
    folder = Path(settings.artifacts) / "datasets" / dataset["id"]
    assert len(files_under(folder)) == 1

    assert (await client.post(f"/v1/jobs/{user}/cancel", headers=auth(token))).status_code == 202
    assert (await client.delete(f"/v1/datasets/{dataset['id']}", headers=auth(token))).status_code == 204
    assert not folder.exists()
    assert (await client.get(f"/v1/datasets/{dataset['id']}", headers=auth(token))).status_code == 404
    assert [d["id"] for d in (await client.get("/v1/datasets", headers=auth(token))).json()["datasets"]] == [other["id"]]
    assert (await client.delete(f"/v1/datasets/{dataset['id']}", headers=auth(token))).status_code == 404


async def test_the_storage_quota_counts_all_of_a_projects_datasets(client, settings, make_token, tmp_path):
    token, neighbour = make_token(), make_token("neighbour")
    settings.max_dataset_bytes_per_project = 300_000  # the per-file cap is 256 KiB
    first = await upload(client, token, os.urandom(200_000))
    assert first.status_code == 201, first.text

    declared = await upload(client, token, os.urandom(150_000))  # refused on Content-Length
    assert declared.status_code == 429, declared.text
    assert "UNROLL_MAX_DATASET_BYTES_PER_PROJECT" in declared.json()["error"]["message"]

    async def chunks():  # no Content-Length: refused while streaming, past 100,000 bytes
        for _ in range(3):
            yield os.urandom(50_000)

    streamed = await client.post("/v1/datasets", params={"name": "s"}, content=chunks(), headers=auth(token))
    assert streamed.status_code == 429 and streamed.json()["error"]["code"] == "over_quota", streamed.text
    assert len(files_under(tmp_path / "artifacts")) == 1  # nothing of either refusal
    assert len(list((tmp_path / "artifacts" / "datasets").iterdir())) == 1  # not even a folder

    assert (await upload(client, neighbour, os.urandom(200_000))).status_code == 201  # per project
    assert (await client.delete(f"/v1/datasets/{first.json()['id']}", headers=auth(token))).status_code == 204
    assert (await upload(client, token, os.urandom(150_000))).status_code == 201  # room again

    settings.max_upload_bytes = 10  # the per-file cap still applies, as a 413
    too_big = await upload(client, token, b"x" * 11)
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "too_large"


async def test_an_upload_past_the_quota_is_refused_as_soon_as_it_passes(client, settings, make_token):
    """The running total is checked while the body streams: the server stops reading the
    body once it is past the room left, not after storing all of it."""
    token = make_token()
    settings.max_dataset_bytes_per_project = 100_000
    pulled = []

    async def chunks():
        for _ in range(20):
            pulled.append(1)
            yield os.urandom(10_000)

    r = await client.post("/v1/datasets", params={"name": "s"}, content=chunks(), headers=auth(token))
    assert r.status_code == 429, r.text
    assert len(pulled) <= 12  # 11 chunks pass 100,000 bytes; the other 9 are never read


async def test_concurrent_uploads_cannot_pass_the_quota_together(client, db, settings, make_token):
    """Each of two uploads fits in the room left when it starts, but not both: the one
    recorded second is refused (the total is counted again, under a lock, with its row)."""
    import asyncio

    token = make_token()
    settings.max_dataset_bytes_per_project = 100_000
    started, release = asyncio.Event(), asyncio.Event()

    async def slow():
        yield os.urandom(30_000)
        started.set()
        await release.wait()
        yield os.urandom(30_000)

    slow_upload = asyncio.create_task(client.post("/v1/datasets", params={"name": "slow"}, content=slow(), headers=auth(token)))
    await started.wait()  # the slow one has begun, with 100,000 bytes of room
    fast = await upload(client, token, os.urandom(60_000), "fast")
    assert fast.status_code == 201, fast.text
    release.set()
    late = await slow_upload
    assert late.status_code == 429 and late.json()["error"]["code"] == "over_quota", late.text
    db.rollback()
    assert db.execute(sa.select(sa.func.count()).select_from(Dataset)).scalar_one() == 1
    assert len(files_under(Path(settings.artifacts))) == 1


# --- multipart ----------------------------------------------------------------------------


async def test_a_multipart_upload_stores_its_one_file(client, make_token, settings):
    token = make_token()
    blob = os.urandom(100_000)
    r = await client.post("/v1/datasets", files={"file": ("corpus.txt", blob, "text/plain")}, data={"note": "x"}, headers=auth(token))
    assert r.status_code == 201, r.text
    dataset = r.json()
    assert dataset["name"] == "corpus.txt" and dataset["bytes"] == len(blob) and dataset["sha256"] == hashlib.sha256(blob).hexdigest()
    [stored] = files_under(Path(settings.artifacts) / "datasets" / dataset["id"])
    assert stored.read_bytes() == blob

    named = await client.post("/v1/datasets", params={"name": "renamed.txt"}, files={"file": ("a.txt", b"abc")}, headers=auth(token))
    assert named.status_code == 201 and named.json()["name"] == "renamed.txt"


@pytest.mark.parametrize(("files", "status", "field"), [
    ({"a": ("a.txt", b"1"), "b": ("b.txt", b"2")}, 422, "file"),  # one file per upload
    ({"file": ("big.bin", b"x" * (256 * 1024 + 1))}, 413, None),  # the per-file cap
])
async def test_a_multipart_upload_is_refused_whole(client, make_token, settings, files, status, field):
    r = await client.post("/v1/datasets", files=files, headers=auth(make_token()))
    assert r.status_code == status, r.text
    assert r.json()["error"].get("field") == field
    assert files_under(Path(settings.artifacts)) == []


def multipart(body: bytes) -> dict[str, str]:
    return {"Content-Type": "multipart/form-data; boundary=b", "Content-Length": str(len(body))}


async def test_a_multipart_body_that_is_not_one_whole_file_is_refused(client, make_token, settings):
    token = make_token()
    no_boundary = await client.post("/v1/datasets", content=b"abc", headers={**auth(token), "Content-Type": "multipart/form-data"})
    assert no_boundary.status_code == 400, no_boundary.text
    fields_only = b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\nx\r\n--b--\r\n'
    r = await client.post("/v1/datasets", content=fields_only, headers={**auth(token), **multipart(fields_only)})
    assert r.status_code == 422 and r.json()["error"]["field"] == "file", r.text
    cut = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n\r\nhalf of the file'
    truncated = await client.post("/v1/datasets", content=cut, headers={**auth(token), **multipart(cut)})
    assert truncated.status_code == 400 and "ended inside" in truncated.json()["error"]["message"], truncated.text
    too_many = b"".join(b'--b\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nx\r\n' % i for i in range(20)) + b"--b--\r\n"
    r = await client.post("/v1/datasets", content=too_many, headers={**auth(token), **multipart(too_many)})
    assert r.status_code == 400 and "parts" in r.json()["error"]["message"], r.text
    assert files_under(Path(settings.artifacts)) == []


# --- a client that stalls -------------------------------------------------------------------


def stalled_upload(port: int, token: str, head: str, body: bytes, content_type: str = "application/octet-stream") -> bytes:
    """Send a request's headers and the start of its body over a real socket, then nothing;
    return what the server answers before it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:  # the timeout only guards the test
        sock.sendall(
            f"POST {head} HTTP/1.1\r\nHost: unroll.test\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: 100000\r\n\r\n".encode() + body
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_a_stalled_raw_upload_is_a_408_and_the_server_goes_on(live_server, make_token, settings, db):
    settings.upload_read_timeout_s = 0.3
    token = make_token()
    answer = stalled_upload(live_server.port, token, "/v1/datasets?name=slow.txt", b"a few bytes")
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"UNROLL_UPLOAD_READ_TIMEOUT_S" in answer
    assert files_under(Path(settings.artifacts)) == []
    db.rollback()
    assert db.execute(sa.select(sa.func.count()).select_from(Dataset)).scalar_one() == 0

    import httpx  # and the server still serves uploads

    ok = httpx.post(f"{live_server.url}/v1/datasets", params={"name": "fast.txt"}, content=b"abc", headers=auth(token), timeout=30)
    assert ok.status_code == 201, ok.text
