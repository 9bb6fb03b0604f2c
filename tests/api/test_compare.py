"""GET /v1/compare: jobs of any sweep and any state side by side. The expected config
difference and aligned tables are rebuilt here from what the test wrote (the configs as
submitted, the points as inserted), independently of service.api.routes.compare.

Jobs are driven in the database as a worker would (claim, insert_metrics, finish)."""

from __future__ import annotations

import math

import pytest

from service.store import limits
from service.store.db import repo, states
from service.store.db.models import JobState
from tests.api.helpers import JOB, auth, job

pytestmark = pytest.mark.redis


def _run(db, job_id: str, points: list[tuple[str, int, float]], summary: dict | None = None) -> None:
    attempt = states.claim(db, job_id, "test-worker", 60)
    repo.insert_metrics(db, job_id, attempt, points)
    states.update_progress(db, job_id, attempt, max(step for _, step, _ in points))
    if summary is not None:
        assert states.finish(db, job_id, attempt, JobState.SUCCEEDED, summary=summary)
    db.commit()


def _leaves(node, prefix=""):
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix, node


async def _submit(client, token, body) -> dict:
    r = await client.post("/v1/jobs", json=body, headers=auth(token))
    assert r.status_code == 201, r.text
    return r.json()


async def test_two_jobs_of_different_sweeps_compare_config_and_aligned_series(client, make_token, db):
    token = make_token()
    sweeps = []
    for k1 in (4, 16):  # two sweeps, one job each (a sweep over lr with one value)
        body = {"name": f"s{k1}", "base": {**JOB, "tbptt": {"k1": k1}, "train": {"max_steps": 30}}, "grid": {"optim.lr": [0.001 * k1]}}
        r = await client.post("/v1/sweeps", json=body, headers=auth(token))
        assert r.status_code == 201, r.text
        sweeps.append(r.json())
    a, b = (s["jobs"][0]["job_id"] for s in sweeps)
    # a: evaluations at 10, 20, 30, the last diverged; b: at 15, 30 and still running.
    _run(db, a, [("train/loss", s, 2.0 / s) for s in range(1, 31)]
         + [("valid/accuracy", 10, 0.4), ("valid/accuracy", 20, 0.6), ("valid/accuracy", 30, math.nan)],
         summary={"steps": 30, "final_train_loss": 2.0 / 30})
    _run(db, b, [("train/loss", s, 3.0 / s) for s in range(1, 21)] + [("valid/accuracy", 15, 0.5), ("valid/loss", 15, 1.5)])

    r = await client.get("/v1/compare", params={"jobs": f"{a},{b}", "max_points": 1000}, headers=auth(token))
    assert r.status_code == 200, r.text
    got = r.json()
    assert [j["id"] for j in got["jobs"]] == [a, b]
    assert [j["sweep_id"] for j in got["jobs"]] == [s["id"] for s in sweeps]
    assert [j["state"] for j in got["jobs"]] == ["succeeded", "running"]
    assert got["jobs"][0]["summary"]["steps"] == 30 and got["jobs"][1]["summary"] is None

    # The config difference: exactly the paths whose stored values differ.
    configs = {j: (await client.get(f"/v1/jobs/{j}", headers=auth(token))).json()["config"] for j in (a, b)}
    flat = {j: dict(_leaves(c)) for j, c in configs.items()}
    want = {p: {j: flat[j][p] for j in (a, b) if p in flat[j]} for p in flat[a].keys() | flat[b].keys()
            if p not in flat[a] or p not in flat[b] or flat[a][p] != flat[b][p]}
    diff = {row["key"]: row["values"] for row in got["config_diff"]}
    assert diff == want
    assert diff["tbptt.k1"] == {a: 4, b: 16} and diff["optim.lr"] == {a: 0.004, b: 0.016}
    assert "model.cell" not in diff and "data.kind" not in diff

    # Default series: train/loss, valid/loss and the task's metric, aligned by step.
    assert got["metrics"] == ["train/loss", "valid/loss", "valid/accuracy"]
    assert got["available_metrics"] == ["train/loss", "valid/accuracy", "valid/loss"]
    acc = got["series"]["valid/accuracy"]
    assert acc["steps"] == [10, 15, 20, 30]
    assert acc["values"] == {a: [0.4, None, 0.6, None], b: [None, 0.5, None, None]}
    assert acc["nonfinite"] == {a: [30]}
    loss = got["series"]["train/loss"]
    assert loss["steps"] == list(range(1, 31))
    assert loss["values"][a] == pytest.approx([2.0 / s for s in range(1, 31)])
    assert loss["values"][b] == pytest.approx([3.0 / s for s in range(1, 21)] + [None] * 10)
    assert got["series"]["valid/loss"] == {"steps": [15], "values": {a: [None], b: [1.5]}, "nonfinite": {}}

    # The final value of each series: its latest point.
    final_a, final_b = (j["final"] for j in got["jobs"])
    assert final_a["valid/accuracy"] == {"step": 30, "value": None}
    assert final_a["train/loss"]["step"] == 30 and final_a["train/loss"]["value"] == pytest.approx(2.0 / 30)
    assert "valid/loss" not in final_a and final_b["valid/loss"] == {"step": 15, "value": 1.5}

    # Chosen series, each once, in the order asked.
    r = await client.get("/v1/compare", params=[("jobs", b), ("jobs", a), ("metrics", "valid/loss,train/loss,valid/loss")], headers=auth(token))
    assert r.status_code == 200, r.text
    assert r.json()["metrics"] == ["valid/loss", "train/loss"] and [j["id"] for j in r.json()["jobs"]] == [b, a]


async def test_max_points_bounds_each_aligned_table_like_the_metrics_route(client, make_token, db):
    token = make_token()
    a = (await _submit(client, token, job(name="a", train__max_steps=1000)))["id"]
    b = (await _submit(client, token, job(name="b", train__max_steps=1000)))["id"]
    _run(db, a, [("train/loss", s, math.sin(s / 7.0)) for s in range(1, 1001)])
    _run(db, b, [("train/loss", s, math.cos(s / 5.0)) for s in range(1, 801)])
    r = await client.get("/v1/compare", params={"jobs": f"{a},{b}", "metrics": "train/loss", "max_points": 100}, headers=auth(token))
    assert r.status_code == 200, r.text
    table = r.json()["series"]["train/loss"]
    assert len(table["steps"]) <= 100
    for job_id in (a, b):  # each job downsampled to 100 / 2 points, as GET .../metrics does
        own = (await client.get(f"/v1/jobs/{job_id}/metrics", params={"names": "train/loss", "max_points": 50}, headers=auth(token))).json()
        kept = [[s, v] for s, v in zip(table["steps"], table["values"][job_id]) if v is not None]
        assert kept == own["series"]["train/loss"] and 0 < len(kept) <= 50
    # Only the configs' names differ; a queued job (never ran) compares with no points.
    c = (await _submit(client, token, job(name="c")))["id"]
    got = (await client.get("/v1/compare", params={"jobs": f"{a},{c}"}, headers=auth(token))).json()
    assert [row["key"] for row in got["config_diff"]] == ["name", "train.max_steps"]
    assert got["series"]["train/loss"]["values"][c] == [None] * len(got["series"]["train/loss"]["steps"])
    assert got["jobs"][1]["final"] == {} and got["jobs"][1]["state"] == "queued"


async def test_default_metrics_follow_each_jobs_task(client, make_token, db):
    token = make_token()
    recall = (await _submit(client, token, JOB))["id"]
    adding = (await _submit(client, token, job(data={"kind": "adding", "length": 20, "episodes": 50})))["id"]
    got = (await client.get("/v1/compare", params={"jobs": f"{recall},{adding}"}, headers=auth(token))).json()
    assert got["metrics"] == ["train/loss", "valid/loss", "valid/accuracy", "valid/mse"]
    assert {"data.kind", "data.vocab"} <= {row["key"] for row in got["config_diff"]}


async def test_bad_lists_are_422_naming_the_field_and_other_projects_jobs_404(client, make_token, db):
    mine, theirs = make_token("mine"), make_token("theirs")
    a = (await _submit(client, mine, JOB))["id"]
    other = (await _submit(client, theirs, JOB))["id"]

    async def status(params, token=mine):
        r = await client.get("/v1/compare", params=params, headers=auth(token))
        return r.status_code, r.json().get("error", {}).get("field")

    assert await status({"jobs": f"{a},{other}"}) == (404, None)
    assert await status({"jobs": f"{a},job_doesnotexist"}) == (404, None)
    assert await status({"jobs": a}, theirs) == (404, None)
    assert await status({}) == (422, "jobs")
    assert await status({"jobs": ""}) == (422, "jobs")
    assert await status({"jobs": f"{a},,{a}"}) == (422, "jobs")
    assert await status({"jobs": "../etc/passwd"}) == (422, "jobs")
    assert await status({"jobs": "j" * 65}) == (422, "jobs")
    too_many = ",".join(f"job_{i:04d}" for i in range(limits.MAX_COMPARE_JOBS + 1))
    assert await status({"jobs": too_many}) == (422, "jobs")
    assert await status([("jobs", f"job_{i}") for i in range(limits.MAX_COMPARE_JOBS + 1)]) == (422, "jobs")
    # The same job twice counts once.
    assert await status({"jobs": f"{a},{a}"}) == (200, None)
    names = ",".join(f"m/{i}" for i in range(limits.MAX_COMPARE_METRICS + 1))
    assert await status({"jobs": a, "metrics": names}) == (422, "metrics")
    assert await status({"jobs": a, "metrics": "x" * 201}) == (422, "metrics")
    assert await status({"jobs": a, "metrics": ","}) == (422, "metrics")
    assert await status({"jobs": a, "max_points": 0}) == (422, "max_points")
    assert await status({"jobs": a, "max_points": limits.MAX_COMPARE_POINTS + 1}) == (422, "max_points")
    r = await client.get("/v1/compare", params={"jobs": a})
    assert r.status_code == 401
