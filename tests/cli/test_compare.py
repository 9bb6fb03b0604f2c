"""`unroll compare`, `unroll retry`, the WAITING column of `unroll status` and `unroll logs -f`
against the real API served by uvicorn (tests/api/conftest.py's live_server, on SQLite and
PostgreSQL), run as `main([...])`; and `logs -f`'s use of the event stream with a fake
client (it reads lines when an event says so, and never polls while the stream works)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import redis
from sqlalchemy.orm import Session

from service.cli import main as cli
from service.cli.main import main
from service.store import events
from service.store.db import outbox, repo, states
from service.store.db.models import Job, JobState
from tests.api.conftest import (  # noqa: F401
    app,
    client,
    data_root,
    db,
    live_server,
    make_token,
    settings,
)
from tests.api.helpers import JOB, auth, job

pytestmark = pytest.mark.redis


def unroll(capsys, server, token: str, *args: str) -> tuple[int, str, str]:
    code = main([*args, "--url", server.url, "--token", token])
    out, err = capsys.readouterr()
    return code, out, err


def _run(session, job_id: str, points, summary=None) -> int:
    attempt = states.claim(session, job_id, "test-worker", 60)
    repo.insert_metrics(session, job_id, attempt, points)
    if summary is not None:
        assert states.finish(session, job_id, attempt, JobState.SUCCEEDED, summary=summary)
    session.commit()
    return attempt


def test_compare_prints_final_metrics_and_the_config_difference(live_server, make_token, db, capsys):  # noqa: F811
    token = make_token()
    api = httpx.Client(base_url=live_server.url, headers=auth(token), timeout=30)
    sweep = api.post("/v1/sweeps", json={"base": JOB, "grid": {"tbptt.k1": [4]}}).json()
    a = sweep["jobs"][0]["job_id"]
    b = api.post("/v1/jobs", json=job(name="solo", tbptt={"k1": 16}, optim={"lr": 0.01})).json()["id"]
    _run(db, a, [("train/loss", 10, 0.75), ("valid/accuracy", 10, 0.5)], summary={"steps": 10})
    _run(db, b, [("train/loss", 5, 1.25), ("valid/accuracy", 5, float("nan"))])

    code, out, err = unroll(capsys, live_server, token, "compare", a, b)
    assert code == 0, err
    metrics, config = out.split("\n\n")
    rows = {line.split()[0]: line.split()[1:] for line in metrics.splitlines()[1:]}
    assert metrics.splitlines()[0].split() == [a, b]
    assert rows["state"] == ["succeeded", "running"] and rows["sweep"] == [sweep["id"], "-"]
    assert rows["train/loss"] == ["0.75", "@", "10", "1.25", "@", "5"]
    assert rows["valid/accuracy"] == ["0.5", "@", "10", "non-finite", "@", "5"]
    assert rows["valid/loss"] == ["-", "-"]
    diff = {line.split()[0]: line.split()[1:] for line in config.strip().splitlines()}
    assert diff["config"] == [a, b]
    assert diff["tbptt.k1"] == ["4", "16"] and diff["optim.lr"] == ["0.003", "0.01"] and "model.cell" not in diff

    code, out, _ = unroll(capsys, live_server, token, "compare", a, b, "--json", "--metrics", "train/loss")
    assert code == 0 and json.loads(out) == api.get("/v1/compare", params={"jobs": f"{a},{b}", "metrics": "train/loss"}).json()

    code, out, err = unroll(capsys, live_server, token, "compare", a, "job_unknown")
    assert (code, out) == (1, "") and err.startswith("error: ") and "not found" in err
    code, _, err = unroll(capsys, live_server, token, "compare", a, "../x")
    assert code == 1 and "(jobs)" in err


def test_retry_requeues_a_failed_job_or_runs_its_config_as_a_new_one(live_server, make_token, db, capsys):  # noqa: F811
    token = make_token()
    api = httpx.Client(base_url=live_server.url, headers=auth(token), timeout=30)
    original = api.post("/v1/jobs", json=job(name="flaky", tags=["demo", "retry-of:job_older"])).json()["id"]
    attempt = states.claim(db, original, "test-worker", 60)
    assert states.finish(db, original, attempt, JobState.FAILED, error="boom")
    db.commit()

    code, out, err = unroll(capsys, live_server, token, "retry", original)
    assert code == 0, err
    assert out.startswith(f"{original} queued: it resumes from its last checkpoint")
    assert api.get(f"/v1/jobs/{original}").json()["state"] == "queued"
    # A queued job cannot be requeued: the API's 409, and how to run it anew.
    code, _, err = unroll(capsys, live_server, token, "retry", original)
    assert code == 1 and f"unroll retry {original} --new" in err

    code, out, err = unroll(capsys, live_server, token, "retry", original, "--new")
    assert code == 0, err
    new_id = out.strip().splitlines()[-1]
    assert new_id.startswith("job_") and new_id != original and f"a retry of {original}" in err
    old, new = api.get(f"/v1/jobs/{original}").json(), api.get(f"/v1/jobs/{new_id}").json()
    assert new["state"] == "queued" and new["step"] == 0 and new["tags"] == ["demo", f"retry-of:{original}"]
    assert {**new["config"], "tags": None} == {**old["config"], "tags": None}

    code, _, err = unroll(capsys, live_server, token, "retry", "job_nothere")
    assert code == 1 and "not found" in err


def test_status_shows_why_queued_jobs_wait(live_server, make_token, db, capsys):  # noqa: F811
    token = make_token()
    api = httpx.Client(base_url=live_server.url, headers=auth(token), timeout=30)
    waiting = api.post("/v1/jobs", json=job(name="waits")).json()["id"]
    plain = api.post("/v1/jobs", json=job(name="plain")).json()["id"]
    db.get(Job, waiting).pending_reason = "project quota: 2 of 2 jobs running"
    db.commit()

    code, out, _ = unroll(capsys, live_server, token, "status")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split()[-1] == "WAITING"
    by_id = {row.split()[0]: row for row in rows}
    assert by_id[waiting].endswith("project quota: 2 of 2 jobs running") and by_id[plain].endswith("plain")
    code, out, _ = unroll(capsys, live_server, token, "status", waiting)
    assert "waiting   project quota: 2 of 2 jobs running" in out
    db.get(Job, waiting).pending_reason = None
    db.commit()
    code, out, _ = unroll(capsys, live_server, token, "status")
    assert "WAITING" not in out


def test_logs_follow_prints_lines_as_their_events_arrive_until_the_job_ends(
    live_server, make_token, db, redis_url, redis_prefix, capsys  # noqa: F811
):
    token = make_token()
    job_id = httpx.post(f"{live_server.url}/v1/jobs", json=JOB, headers=auth(token)).json()["id"]
    publisher = events.Publisher(redis.Redis.from_url(redis_url), redis_prefix)
    worker = Session(db.get_bind(), info=outbox.publishing(publisher))  # what it commits is published
    attempt = states.claim(worker, job_id, "test-worker", 60)
    repo.append_logs(worker, job_id, attempt, ["before -f"])
    worker.commit()

    def log(*lines: str) -> None:  # as workers.reporter flushes them: the lines and their event
        repo.append_logs(worker, job_id, attempt, list(lines))
        outbox.add(worker, job_id, {"type": "log", "attempt": attempt, "lines": [{"line": line} for line in lines]})
        worker.commit()

    printed: list[str] = []
    result: dict[str, int] = {}
    follower = threading.Thread(target=lambda: result.update(code=main(["logs", job_id, "-f", "--url", live_server.url, "--token", token])))
    follower.start()
    try:
        _wait_for_output(capsys, printed, "before -f")
        log("one", "two")
        # Printed while the job runs: the stream's `log` event, not the job's end, made it read.
        _wait_for_output(capsys, printed, "two")
        log("three")
        assert states.finish(worker, job_id, attempt, JobState.SUCCEEDED, summary={"steps": 10})
        worker.commit()
        follower.join(timeout=30)
        assert not follower.is_alive() and result["code"] == 0
    finally:
        if follower.is_alive():  # a failed check: end the job, so that the follower ends too
            states.finish(worker, job_id, attempt, JobState.CANCELLED)
            worker.commit()
            follower.join(timeout=30)
        worker.close()
    printed.extend(capsys.readouterr().out.splitlines())
    assert printed == ["before -f", "one", "two", "three"]


def _wait_for_output(capsys, printed: list[str], line: str, timeout: float = 10.0) -> None:
    """Until `line` has been printed: well within the stream's keep-alive (15 s), after
    which an idle stream would look at the job itself."""
    deadline = time.monotonic() + timeout
    while line not in printed:
        printed.extend(capsys.readouterr().out.splitlines())
        if line in printed:
            return
        assert time.monotonic() < deadline, f"{line!r} not printed; got {printed}"
        time.sleep(0.05)


class FakeApi:
    """A job that logs a line per `log` event; `logs` serves what has been logged so far."""

    def __init__(self, stream: list[dict], broken: Exception | None = None) -> None:
        self.stream, self.broken = stream, broken
        self.lines: list[str] = []
        self.reads = 0
        self.gets = 0

    def follow(self, job_id: str):
        if self.broken is not None:
            raise self.broken
        for event in self.stream:
            self.lines.extend(event.get("new", []))
            yield event

    def logs(self, job_id: str, *, after: int = 0, limit: int = 1000) -> dict:
        self.reads += 1
        page = [{"id": i + 1, "line": text} for i, text in enumerate(self.lines)][after : after + limit]
        return {"lines": page, "next_after": page[-1]["id"] if page else after}

    def get(self, job_id: str) -> dict:
        self.gets += 1
        self.lines.append(f"poll {self.gets}")
        return {"state": "succeeded" if self.gets > 1 else "running"}


def test_follow_logs_reads_on_log_and_state_events_and_never_polls(capsys):
    api = FakeApi([
        {"type": "state", "snapshot": True, "state": "running"},
        {"type": "log", "new": ["a", "b"]},
        {"type": "progress", "step": 3, "new": ["c"]},  # a line whose event is still to come
        {"type": "metrics", "values": {}},
        {"type": "log", "new": ["d"]},
        {"type": "state", "state": "succeeded"},
    ])
    after = cli._follow_logs(api, "job_1", 0)
    assert capsys.readouterr().out.splitlines() == ["a", "b", "c", "d"]
    assert after == 4 and api.gets == 0 and api.reads == 4  # snapshot, two logs, the end


def test_follow_logs_polls_when_the_stream_cannot_be_had(capsys):
    from service.cli.client import ApiError

    api = FakeApi([], broken=ApiError(503, "unavailable", "Redis is unavailable"))
    api.lines = ["x"]
    cli._follow_logs(api, "job_1", 0)
    out, err = capsys.readouterr()
    assert out.splitlines() == ["x", "poll 1"] and "polling instead" in err
    with pytest.raises(ApiError):  # not for a job it may not see
        cli._follow_logs(FakeApi([], broken=ApiError(404, "not_found", "no such job")), "job_1", 0)
