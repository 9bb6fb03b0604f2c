"""`unroll delete` and `unroll dataset upload|list|show|delete` against the real API served
by uvicorn on a socket (tests/api/conftest.py's live_server, on SQLite and PostgreSQL), run
as `main([...])`: what a user reads on stdout and stderr, and the exit statuses."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from service.cli.main import main
from tests.api.conftest import app, client, data_root, db, live_server, make_token, settings  # noqa: F401
from tests.api.helpers import auth, job

pytestmark = pytest.mark.redis


def unroll(capsys, server, token: str, *args: str) -> tuple[int, str, str]:
    code = main([*args, "--url", server.url, "--token", token])
    out, err = capsys.readouterr()
    return code, out, err


def test_dataset_and_delete_commands(live_server, make_token, tmp_path: Path, capsys):  # noqa: F811
    token = make_token()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat\n" * 200)
    api = httpx.Client(base_url=live_server.url, headers=auth(token), timeout=30)

    code, out, err = unroll(capsys, live_server, token, "dataset", "upload", str(corpus), "--name", "pets.txt")
    assert code == 0, err
    dataset_id = out.strip().splitlines()[-1]
    assert dataset_id.startswith("ds_") and "pets.txt" in err and f"{corpus.stat().st_size:,} bytes" in err

    code, out, _ = unroll(capsys, live_server, token, "dataset", "list")
    assert code == 0 and out.splitlines()[0].split() == ["ID", "NAME", "BYTES", "CREATED", "SHA256"]
    assert dataset_id in out and "pets.txt" in out

    code, out, _ = unroll(capsys, live_server, token, "dataset", "show", dataset_id)
    assert code == 0 and f"id       {dataset_id}" in out and "name     pets.txt" in out and "sha256" in out

    # a queued job that trains on it holds both back
    job_id = api.post("/v1/jobs", json=job(data={"kind": "text", "dataset": dataset_id})).json()["id"]
    code, _, err = unroll(capsys, live_server, token, "dataset", "delete", dataset_id)
    assert code == 1 and err.startswith("error: ") and job_id in err
    code, _, err = unroll(capsys, live_server, token, "delete", job_id)
    assert code == 1 and "cancel it first" in err

    assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    code, out, _ = unroll(capsys, live_server, token, "delete", job_id)
    assert (code, out) == (0, f"{job_id} deleted\n")
    assert api.get(f"/v1/jobs/{job_id}").status_code == 404
    code, out, _ = unroll(capsys, live_server, token, "dataset", "delete", dataset_id)
    assert (code, out) == (0, f"{dataset_id} deleted\n")
    code, out, _ = unroll(capsys, live_server, token, "dataset", "list")
    assert (code, out) == (0, "no datasets\n")

    code, _, err = unroll(capsys, live_server, token, "dataset", "show", dataset_id)
    assert code == 1 and "not found" in err
    code, _, err = unroll(capsys, live_server, token, "dataset", "upload", str(tmp_path / "missing.txt"))
    assert code == 2 and err == f"error: {tmp_path / 'missing.txt'}: no such file\n"
    api.close()
