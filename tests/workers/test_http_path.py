"""The whole path with the two long-running roles as separate processes:
HTTP (`unroll api`) → database → Redis → `unroll worker` → Ray → trainer → database → HTTP."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx

from service.cli.client import Client
from tests.processes import free_port

CONFIG = {
    "name": "http-path",
    "model": {"hidden_size": 16},
    "data": {"kind": "recall", "vocab": 4, "lag": 2, "length": 4000, "batch_size": 4, "valid_length": 64},
    "tbptt": {"k1": 8},
    "train": {"max_steps": 40, "eval_every": 20, "checkpoint_every": 20, "device": "cpu"},
}


def test_http_to_worker_and_back(stack, tmp_path):
    env = stack.env()
    token = subprocess.run(
        [sys.executable, "-m", "service.cli", "token", "create", "--project", "http"], env=env,
        capture_output=True, text=True, check=True,
    ).stdout.strip().splitlines()[-1]
    port = free_port()
    log = (tmp_path / "api.log").open("w")
    api = subprocess.Popen([sys.executable, "-m", "service.cli", "api", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    stack.workers.append(api)  # stopped with the stack
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    stack.start_worker()
    client = Client(url, token)

    job = client.submit(CONFIG)
    assert job["state"] == "queued"
    seen = list(_events_until_done(client, job["id"]))
    states = [event.get("state") for event in seen]
    assert states[0] in ("queued", "running") and states[-1] == "succeeded"

    done = client.get(job["id"])  # the final event is published after the commit it reports
    assert done["state"] == "succeeded" and done["attempt"] == 1 and done["progress"] == 1.0, (done, seen, stack.worker_logs())
    series = client.metrics(job["id"], names=["train/loss", "valid/accuracy"])
    assert set(series) >= {"train/loss", "valid/accuracy"}
    assert [c["step"] for c in client.checkpoints(job["id"])] == [20, 40]
    blob = tmp_path / "ckpt.pt"
    with blob.open("wb") as fh:
        assert client.download_checkpoint(job["id"], 40, fh) > 0
    assert any("eval @ 40" in line["line"] for line in client.logs(job["id"])["lines"])
    ready = httpx.get(f"{url}/readyz")
    assert ready.status_code == 200, ready.text  # the dispatcher's heartbeat says Ray answers
    assert ready.json()["checks"] == {"database": "ok", "redis": "ok", "ray": "ok"}


def _events_until_done(client: Client, job_id: str):
    for event in client.events(job_id, timeout=120):
        if event.get("type") == "state":
            yield event
            if event.get("state") in ("succeeded", "failed", "cancelled"):
                return

