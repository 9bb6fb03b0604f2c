"""service.store.sweeps, the domain of sweeps: expansion (the grid's product, seeds, k2
following k1) and the summary table's arithmetic and renderings."""

from __future__ import annotations

import csv
import io

import pytest

from service.store.sweeps import InvalidGrid, JobOutcome, expand, grid_size, k2_follows_k1, render_table, sorted_rows, stat, summarize, task_metric, to_csv


def test_k2_follows_k1_unless_swept_too():
    base = {"tbptt": {"k1": 24, "k2": 24}}
    assert k2_follows_k1(base, {"tbptt.k1": [8, 16]}) and base == {"tbptt": {"k1": 24, "k2": 24}}  # a question only
    assert [job.config["tbptt"] for job in expand(base, {"tbptt.k1": [8, 16]}, 1)] == [{"k1": 8}, {"k1": 16}]
    assert base == {"tbptt": {"k1": 24, "k2": 24}}  # expand leaves the caller's base alone
    base = {"tbptt": {"k1": 24, "k2": 48}}
    assert not k2_follows_k1(base, {"tbptt.k1": [8], "tbptt.k2": [8, 16]})
    assert [job.config["tbptt"] for job in expand(base, {"tbptt.k1": [8], "tbptt.k2": [8, 16]}, 1)] == [
        {"k1": 8, "k2": 8}, {"k1": 8, "k2": 16}
    ]
    assert not k2_follows_k1({"tbptt": {"k2": 4}}, {"clip.max_norm": [1.0]})


def test_expand_is_the_product_times_seeds_in_grid_order():
    grid = {"tbptt.k1": [4, 8], "model.cell": ["lstm", "gru"]}
    jobs = expand({"train": {"seed": 3}}, grid, 2)
    assert grid_size(grid, 2) == len(jobs) == 8
    assert [(j.point["tbptt.k1"], j.point["model.cell"], j.seed) for j in jobs[:3]] == [(4, "lstm", 3), (4, "lstm", 4), (4, "gru", 3)]
    assert jobs[1].config == {"train": {"seed": 4}, "tbptt": {"k1": 4}, "model": {"cell": "lstm"}}
    assert grid_size({"a": [1] * 1000, "b": [1] * 1000, "c": [1] * 1000, "d": [1] * 1000}, 3) == 3 * 10**12
    for bad in ({"": [1]}, {"a..b": [1]}, {"tbptt.k1": []}):
        with pytest.raises(InvalidGrid):
            expand({}, bad, 1)
    with pytest.raises(InvalidGrid, match="grid.tbptt.k1.x"):
        expand({"tbptt": {"k1": 4}}, {"tbptt.k1.x": [1]}, 1)


def test_task_metrics_and_goals():
    assert task_metric({"data": {"kind": "recall"}}) == ("valid/accuracy", "max")
    assert task_metric({"data": {"kind": "text"}}) == ("valid/ppl", "min")
    assert task_metric({"data": {"kind": "adding"}}) == ("valid/mse", "min")
    assert task_metric({"data": {"kind": "timeseries"}}) == ("valid/mse", "min")


def test_stat_is_mean_and_sample_std_over_finite_values():
    assert stat([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3, "nonfinite": 0}
    assert stat([4.0, None]) == {"mean": 4.0, "std": None, "n": 1, "nonfinite": 1}
    assert stat([]) == {"mean": None, "std": None, "n": 0, "nonfinite": 0}


def _job(job_id, clip, seed, ppl, state="succeeded", **summary):
    config = {"data": {"kind": "text"}, "clip": {"max_norm": clip}, "train": {"seed": seed}}
    evaluations = [(100 * (i + 1), v) for i, v in enumerate(ppl)]
    done = state in ("succeeded", "failed", "cancelled")
    return JobOutcome(
        job_id=job_id, config=config, state=state, step=len(ppl) * 100, started=True,
        summary={"steps": len(ppl) * 100, "wall_s": 10.0, "tokens_per_s": 100.0, "peak_memory_bytes": 2**20,
                 "clipped_fraction": 0.5, "skipped_steps": 0, **summary} if done else None,
        evaluations=evaluations, running_s=None if done else 3.0, latest={"train/tokens_per_s": 50.0},
    )


def test_summary_for_a_min_metric_picks_the_lowest_and_renders():
    grid = {"clip.max_norm": [4, 0.25, 1]}
    jobs = [
        _job("a", 4.0, 0, [3.0, 2.0, 2.5]), _job("b", 4.0, 1, [3.0, 2.2, None]),  # b diverged at the end
        _job("c", 0.25, 0, [2.0, 1.5]), _job("d", 0.25, 1, [2.0, 1.7], state="running"),
        _job("e", 1.0, 0, [2.0, 1.4], peak_memory_bytes=2**30), _job("f", 1.0, 1, [1.9, 1.6]),
    ]
    summary = summarize(grid, 2, jobs, "valid/ppl", "min")
    rows = {row["point"]["clip.max_norm"]: row for row in summary["rows"]}
    assert [row["point"]["clip.max_norm"] for row in summary["rows"]] == [4, 0.25, 1]  # grid order
    assert rows[4]["final"] == {"mean": 2.5, "std": None, "n": 1, "nonfinite": 1}
    assert rows[4]["best"]["mean"] == pytest.approx(2.1) and rows[4]["best"]["n"] == 2
    assert rows[0.25]["jobs_done"] == 1 and rows[0.25]["states"] == {"succeeded": 1, "running": 1}
    assert rows[0.25]["final"]["mean"] == pytest.approx(1.6) and rows[0.25]["wall_s"] == pytest.approx(6.5)
    assert rows[0.25]["tokens_per_s"] == pytest.approx(75.0) and rows[0.25]["clipped_fraction"] == 0.5
    assert rows[1]["final"]["mean"] == pytest.approx(1.5) and rows[1]["peak_memory_bytes"] == 2**30
    assert summary["best_point"] == {"clip.max_norm": 1}

    table = render_table(summary, sort=True).splitlines()
    assert table[0].split()[:4] == ["clip.max_norm", "done", "final", "ppl"]
    assert [line.split()[0] for line in table[1:]] == ["0.25", "1", "4"]
    assert table[2].rstrip().endswith("<- best") and "(1 nan)" in table[3]
    assert [r["point"]["clip.max_norm"] for r in sorted_rows(summary)] == [0.25, 1, 4]

    parsed = list(csv.DictReader(io.StringIO(to_csv(summary))))
    assert [p["clip.max_norm"] for p in parsed] == ["4", "0.25", "1"]
    assert parsed[0]["final_std"] == "" and parsed[0]["best_n"] == "2" and parsed[2]["peak_memory_bytes"] == str(2**30)


def test_jobs_are_matched_to_points_by_value_and_bools_are_not_numbers():
    grid = {"tbptt.randomize": [True, False], "tbptt.k1": [8]}
    jobs = [
        JobOutcome(job_id=f"j{i}", config={"tbptt": {"randomize": r, "k1": 8.0}}, state="queued")
        for i, r in enumerate([False, True])
    ]
    summary = summarize(grid, 1, jobs, "valid/accuracy", "max")
    assert [row["job_ids"] for row in summary["rows"]] == [["j1"], ["j0"]]
    assert summary["best_point"] is None and summary["rows"][0]["steps"] is None
    assert summarize({}, 2, jobs, "valid/accuracy", "max")["rows"][0]["jobs_total"] == 2
