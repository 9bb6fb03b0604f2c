"""GET /v1/sweeps/{id}: the summary table equals what the jobs' stored metrics say.

Jobs are driven directly in the database as a worker would (claim, insert_metrics,
finish), with known numbers; the expected table is recomputed here with numpy from
those numbers, independently of service.store.sweeps."""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest

from service.store.db import repo, states
from service.store.db.models import JobState
from tests.api.helpers import JOB, auth

pytestmark = pytest.mark.redis

GRID = {"tbptt.k1": [4, 8, 16], "clip.max_norm": [1]}  # 1: the stored config says 1.0
SEEDS = 3
EVAL_STEPS = (10, 20, 30)


def _finished_summary(rng: np.random.Generator) -> dict:
    return {
        "steps": 30,
        "final_train_loss": float(rng.uniform(0.1, 1)),
        "final_valid_loss": float(rng.uniform(0.1, 1)),
        "valid_accuracy": None,  # set from the series below
        "tokens_per_s": float(rng.uniform(1000, 5000)),
        "wall_s": float(rng.uniform(1, 100)),
        "peak_memory_bytes": int(rng.integers(10**6, 10**9)),
        "clipped_fraction": float(rng.uniform(0, 1)),
        "skipped_steps": int(rng.integers(0, 4)),
        "stopped": "completed",
    }


def _run(db, job_id: str, accuracies: list[float | None], summary: dict | None, extra=()) -> int:
    """Claim the job, write its evaluations (and `extra` points), finish it if `summary`."""
    attempt = states.claim(db, job_id, "test-worker", 60)
    assert attempt == 1
    points = [("valid/accuracy", step, value) for step, value in zip(EVAL_STEPS, accuracies)]
    points += [("train/loss", step, 1.0 / step) for step in range(1, 31)]
    repo.insert_metrics(db, job_id, attempt, [*points, *extra])
    states.update_progress(db, job_id, attempt, 30)
    if summary is not None:
        last = accuracies[-1]
        summary["valid_accuracy"] = None if last is None or math.isnan(last) else last  # as the trainer reports it
        assert states.finish(db, job_id, attempt, JobState.SUCCEEDED, summary=summary)
    db.commit()
    return attempt


def _expect_stat(values: list[float | None]) -> dict:
    finite = np.array([v for v in values if v is not None], dtype=float)
    return {
        "mean": float(finite.mean()) if finite.size else None,
        "std": float(finite.std(ddof=1)) if finite.size >= 2 else None,
        "n": int(finite.size),
        "nonfinite": len(values) - int(finite.size),
    }


def _close(got: dict, want: dict) -> None:
    assert got.keys() >= want.keys()
    for key, value in want.items():
        if value is None or isinstance(value, (int, str)) and not isinstance(value, float):
            assert got[key] == value, (key, got[key], value)
        else:
            assert got[key] == pytest.approx(value, rel=1e-9), (key, got[key], value)


async def test_summary_equals_the_stored_metrics(client, make_token, db):
    token = make_token()
    body = {"name": "trunc", "base": {**JOB, "train": {"max_steps": 30}}, "grid": GRID, "seeds": SEEDS}
    r = await client.post("/v1/sweeps", json=body, headers=auth(token))
    assert r.status_code == 201, r.text
    sweep = r.json()
    sweep_id = sweep["id"]
    # Before anything ran: one row per point, nothing measured, no best point.
    assert [row["point"] for row in sweep["summary"]["rows"]] == [{"tbptt.k1": k, "clip.max_norm": 1} for k in (4, 8, 16)]
    assert all(row["jobs_total"] == SEEDS and row["jobs_done"] == 0 and row["final"]["n"] == 0 for row in sweep["summary"]["rows"])
    assert sweep["summary"]["best_point"] is None and sweep["summary"]["metric"] == "valid/accuracy"

    by_point: dict[int, list[str]] = {}
    for job in sweep["jobs"]:
        by_point.setdefault(job["point"]["tbptt.k1"], []).append(job["job_id"])
    rng = np.random.default_rng(7)
    expected: dict[int, dict] = {}

    # k1=4: three finished seeds. k1=8: three finished, one whose last evaluation diverged
    # (null). k1=16: one finished, one running (no summary yet), one still queued.
    plan = {
        4: ["done", "done", "done"],
        8: ["done", "done", "nan"],
        16: ["done", "running", "queued"],
    }
    running_attempt = None
    for k, kinds in plan.items():
        finals, bests, summaries, started = [], [], [], []
        for job_id, kind in zip(by_point[k], kinds):
            if kind == "queued":
                continue
            accuracies = [float(v) for v in rng.uniform(0.2, 1.0, size=len(EVAL_STEPS))]
            if kind == "nan":
                accuracies[-1] = math.nan
            summary = _finished_summary(rng) if kind != "running" else None
            extra = [("train/tokens_per_s", 30, 1234.5)] if kind == "running" else []
            attempt = _run(db, job_id, accuracies, summary, extra)
            if kind == "running":
                running_attempt = (job_id, attempt)
            stored = [None if math.isnan(a) else a for a in accuracies]
            finals.append(stored[-1])
            finite = [a for a in stored if a is not None]
            bests.append(max(finite) if finite else None)
            started.append(kind)
            if summary is not None:
                summaries.append(summary)
        expected[k] = {
            "final": _expect_stat(finals),
            "best": _expect_stat(bests),
            "jobs_done": sum(1 for kind in kinds if kind in ("done", "nan")),
            "summaries": summaries,
            "running": "running" in kinds,
        }

    got = (await client.get(f"/v1/sweeps/{sweep_id}", headers=auth(token))).json()
    assert got["state"] == "running"
    summary = got["summary"]
    assert summary["axes"] == ["tbptt.k1", "clip.max_norm"] and summary["goal"] == "max"
    for row in summary["rows"]:
        k = row["point"]["tbptt.k1"]
        want = expected[k]
        assert sorted(row["job_ids"]) == sorted(by_point[k])
        assert row["jobs_total"] == SEEDS and row["jobs_done"] == want["jobs_done"]
        _close(row["final"], want["final"])
        _close(row["best"], want["best"])
        s = want["summaries"]
        assert row["clipped_fraction"] == pytest.approx(np.mean([x["clipped_fraction"] for x in s]))
        assert row["skipped_steps"] == pytest.approx(np.mean([x["skipped_steps"] for x in s]))
        assert row["peak_memory_bytes"] == max(x["peak_memory_bytes"] for x in s)
        if want["running"]:
            # The running job counts with what it has reported: its steps and tokens/s.
            assert row["steps"] == pytest.approx(30.0)
            assert row["tokens_per_s"] == pytest.approx(np.mean([s[0]["tokens_per_s"], 1234.5]))
            assert row["states"] == {"succeeded": 1, "running": 1, "queued": 1}
        else:
            assert row["steps"] == pytest.approx(30.0)
            assert row["tokens_per_s"] == pytest.approx(np.mean([x["tokens_per_s"] for x in s]))
            assert row["wall_s"] == pytest.approx(np.mean([x["wall_s"] for x in s]))
    assert expected[8]["final"]["nonfinite"] == 1 and summary["rows"][1]["final"]["n"] == 2
    finals = {k: expected[k]["final"]["mean"] for k in expected}
    best_k = max(finals, key=lambda k: finals[k])
    assert summary["best_point"] == {"tbptt.k1": best_k, "clip.max_norm": 1}

    # The CSV holds the same rows.
    r = await client.get(f"/v1/sweeps/{sweep_id}", params={"format": "csv"}, headers=auth(token))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(r.text)))
    assert [int(line["tbptt.k1"]) for line in table] == [4, 8, 16]
    for line, row in zip(table, summary["rows"]):
        assert line["metric"] == "valid/accuracy"
        assert int(line["jobs_done"]) == row["jobs_done"] and int(line["final_n"]) == row["final"]["n"]
        assert float(line["final_mean"]) == pytest.approx(row["final"]["mean"])
        assert float(line["best_mean"]) == pytest.approx(row["best"]["mean"])
        assert int(line["peak_memory_bytes"]) == row["peak_memory_bytes"]
        assert (line["final_std"] == "") == (row["final"]["std"] is None)

    # Cancel: the queued job ends at once, the running one is asked to stop (its worker
    # ends it); then the sweep is cancelled.
    r = await client.post(f"/v1/sweeps/{sweep_id}/cancel", headers=auth(token))
    assert r.status_code == 202 and r.json()["cancelled"] == 2
    got = (await client.get(f"/v1/sweeps/{sweep_id}", headers=auth(token))).json()
    assert got["state"] == "running" and got["summary"]["rows"][2]["states"] == {"succeeded": 1, "running": 1, "cancelled": 1}
    job_id, attempt = running_attempt
    assert states.is_cancel_requested(db, job_id, attempt)
    assert states.finish(db, job_id, attempt, JobState.CANCELLED)
    db.commit()
    got = (await client.get(f"/v1/sweeps/{sweep_id}", headers=auth(token))).json()
    assert got["state"] == "cancelled" and got["counts"] == {"succeeded": 7, "cancelled": 2}
    assert got["summary"]["rows"][2]["jobs_done"] == 3


async def test_csv_and_unknown_sweeps(client, make_token):
    token, other = make_token("a"), make_token("b")
    r = await client.post("/v1/sweeps", json={"base": JOB, "grid": {"model.cell": ["lstm", "gru"]}}, headers=auth(token))
    sweep_id = r.json()["id"]
    text = (await client.get(f"/v1/sweeps/{sweep_id}", params={"format": "csv"}, headers=auth(token))).text
    header, *lines = text.splitlines()
    assert header.startswith("model.cell,jobs_done,jobs_total,metric,final_mean")
    assert [line.split(",")[0] for line in lines] == ["lstm", "gru"]
    bad = await client.get(f"/v1/sweeps/{sweep_id}", params={"format": "xml"}, headers=auth(token))
    assert bad.status_code == 422
    hidden = await client.get(f"/v1/sweeps/{sweep_id}", params={"format": "csv"}, headers=auth(other))
    assert hidden.status_code == 404 and hidden.json()["error"]["code"]
