"""The CLI against `unroll api` run as a real subprocess (uvicorn, real HTTP):
token create, submit (and --wait), status, logs (and -f), cancel, and where the URL and
token come from (flags, environment, the `unroll up` client config)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy.orm import Session

from service.cli.client import Client, read_client_config, write_client_config
from service.store import events
from service.store.db import outbox, repo, states
from service.store.db.migrate import upgrade
from service.store.db.models import JobState
from service.store.db.session import make_engine
from tests.processes import free_port

pytestmark = [pytest.mark.redis, pytest.mark.slow]

UNROLL = [sys.executable, "-m", "service.cli"]


def run(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(UNROLL + args, env=env, capture_output=True, text=True, timeout=timeout, cwd=env["HOME"])


@pytest.fixture
def service(tmp_path: Path, redis_url: str, redis_prefix: str, redis_client):
    """`unroll api` on a fresh SQLite database, and its environment."""
    db_url = f"sqlite:///{tmp_path / 'unroll.db'}"
    upgrade(db_url)
    port = free_port()
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "UNROLL_DATABASE_URL": db_url,
        "UNROLL_REDIS_URL": redis_url,
        "UNROLL_REDIS_PREFIX": redis_prefix,
        "UNROLL_ARTIFACTS": str(tmp_path / "artifacts"),
        "UNROLL_CLIENT_CONFIG": str(tmp_path / "client.json"),
    }
    for name in ("UNROLL_URL", "UNROLL_TOKEN"):
        env.pop(name, None)
    log = open(tmp_path / "api.log", "w")
    process = subprocess.Popen(UNROLL + ["api", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("unroll api did not start:\n" + (tmp_path / "api.log").read_text()[-3000:])
        time.sleep(0.1)
    engine = make_engine(db_url)
    try:
        yield url, env, engine
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
        engine.dispose()


def test_cli_against_a_live_api(service, tmp_path: Path):
    url, env, engine = service
    created = run(["token", "create", "--project", "demo"], env)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip().splitlines()[-1]
    assert token.startswith("unroll_")

    config = tmp_path / "job.yaml"
    config.write_text("model: {cell: gru, hidden_size: 8}\ndata: {kind: recall, length: 200}\ntrain: {max_steps: 20}\nname: cli-job\n")
    submitted = run(["submit", str(config), "--url", url, "--token", token], env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    assert job_id.startswith("job_")

    with_env = {**env, "UNROLL_URL": url, "UNROLL_TOKEN": token}
    table = run(["status"], with_env)
    assert table.returncode == 0 and "STATE" in table.stdout and job_id in table.stdout and "cli-job" in table.stdout
    detail = run(["status", job_id], with_env)
    assert detail.returncode == 0 and "queued" in detail.stdout

    with Session(engine) as db:
        attempt = states.claim(db, job_id, "w1", 30)
        repo.append_logs(db, job_id, attempt, ["hello from the trainer", "step 1"])
        db.commit()
    logs = run(["logs", job_id], with_env)
    assert logs.returncode == 0 and logs.stdout.splitlines() == ["hello from the trainer", "step 1"]

    cancelled = run(["cancel", job_id], with_env)
    assert cancelled.returncode == 0 and "cancel requested" in cancelled.stdout

    # logs -f follows until the job ends
    follower = subprocess.Popen(UNROLL + ["logs", job_id, "-f"], env=with_env, stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    time.sleep(1.5)
    with Session(engine) as db:
        repo.append_logs(db, job_id, attempt, ["late line"])
        states.finish(db, job_id, attempt, JobState.CANCELLED)
        db.commit()
    out, _ = follower.communicate(timeout=30)
    assert follower.returncode == 0 and out.splitlines() == ["hello from the trainer", "step 1", "late line"]

    # the config file `unroll up` writes is the last resort for URL and token
    write_client_config(url, token, env["UNROLL_CLIENT_CONFIG"])
    assert read_client_config(env["UNROLL_CLIENT_CONFIG"]) == {"url": url, "token": token}
    assert oct(os.stat(env["UNROLL_CLIENT_CONFIG"]).st_mode & 0o777) == "0o600"
    from_file = run(["status", job_id], env)
    assert from_file.returncode == 0 and "cancelled" in from_file.stdout

    bad = run(["status", job_id, "--token", "unroll_wrong"], env)
    assert bad.returncode == 1 and "invalid" in bad.stderr


def test_submit_wait_shows_progress_until_done(service, tmp_path: Path):
    url, env, engine = service
    token = run(["token", "create", "--project", "demo"], env).stdout.strip().splitlines()[-1]
    config = tmp_path / "job.json"
    config.write_text('{"data": {"kind": "recall", "length": 200}, "train": {"max_steps": 20}}')

    def finish_soon():
        with Client(url, token) as api:
            deadline = time.monotonic() + 30
            while not api.list()["jobs"] and time.monotonic() < deadline:
                time.sleep(0.1)
            job_id = api.list()["jobs"][0]["id"]
        # a worker's session: what it commits reaches the job's event stream, which --wait follows
        publisher = events.Publisher(redis.Redis.from_url(env["UNROLL_REDIS_URL"]), env["UNROLL_REDIS_PREFIX"])
        with Session(engine, info=outbox.publishing(publisher)) as db:
            attempt = states.claim(db, job_id, "w1", 30)
            repo.insert_metrics(db, job_id, attempt, [("train/loss", 10, 1.25)])
            states.update_progress(db, job_id, attempt, 10)
            db.commit()
            time.sleep(1.5)
            states.finish(db, job_id, attempt, JobState.SUCCEEDED, summary={"steps": 20, "final_train_loss": 0.5})
            db.commit()

    helper = threading.Thread(target=finish_soon)
    helper.start()
    waited = run(["submit", str(config), "--wait", "--url", url, "--token", token], env)
    helper.join()
    assert waited.returncode == 0, waited.stderr
    assert "succeeded" in waited.stdout.splitlines()[-1] and "final_train_loss=0.5" in waited.stdout
    assert "loss=1.2500" in waited.stderr or "step" in waited.stderr  # the progress bar
    assert "polling instead" not in waited.stderr  # it followed the job's event stream


def test_sweep_early_stop_reaches_the_service(service, tmp_path: Path):
    """`unroll sweep --early-stop KEY=V,...` sends the sweep body's early_stop; the service
    fills in the defaults, and a key it does not know is refused naming it."""
    url, env, engine = service
    token = run(["token", "create", "--project", "demo"], env).stdout.strip().splitlines()[-1]
    config = tmp_path / "base.yaml"
    config.write_text("data: {kind: recall, length: 200}\ntrain: {max_steps: 90, eval_every: 10}\n")
    args = ["sweep", str(config), "--grid", "tbptt.k1=4,8", "--url", url, "--token", token]

    made = run([*args, "--early-stop", "min_steps=10,mode=hyperband,resume=false"], env)
    assert made.returncode == 0, made.stderr
    with Client(url, token) as api:
        early = api.get_sweep(made.stdout.splitlines()[0])["early_stop"]
    assert early["min_steps"] == 10 and early["mode"] == "hyperband" and early["resume"] is False
    assert early["reduction_factor"] == 3 and early["max_steps"] == 90  # the defaults, filled in

    unknown = run([*args, "--early-stop", "min_steps=10,patience=3"], env)
    assert unknown.returncode != 0 and "patience" in unknown.stderr
    malformed = run([*args, "--early-stop", "min_steps"], env)
    assert malformed.returncode != 0 and "KEY=VALUE" in malformed.stderr
