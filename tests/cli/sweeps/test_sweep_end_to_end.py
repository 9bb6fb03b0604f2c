"""Sweeps through the real service: `unroll sweep` → `unroll api` → PostgreSQL → Redis →
`unroll worker` → Ray → trainer, and the summary read back over HTTP."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import yaml

from service.cli.client import Client

pytestmark = [pytest.mark.redis, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


@pytest.mark.timeout(600)
def test_recall_truncation_sweep_shows_the_learnability_threshold(service, tmp_path: Path):
    """examples/recall-truncation.yaml, reduced: k = 4 (below the lag of 8) stays at chance,
    k = 16 (twice the lag) learns the task. One seed, 600 updates per point (k = 16
    passes 0.95 after ~500 on its own)."""
    config = yaml.safe_load((EXAMPLES / "recall-truncation.yaml").read_text())
    config["tbptt"]["k2"] = 24  # not used: k2 follows the swept k1 (service/store/sweeps.py)
    config["train"].update(max_steps=600, eval_every=200, checkpoint_every=300)
    config["data"]["valid_length"] = 512
    path = tmp_path / "recall.yaml"
    path.write_text(yaml.safe_dump(config))

    started = time.monotonic()
    result = service.cli("sweep", str(path), "--grid", "tbptt.k1=16,4", "--max-parallel", "2", "--wait", "--interval", "1", timeout=540)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{service.tails()}"
    assert "k2 follows" in result.stderr
    sweep_id = result.stdout.splitlines()[0]
    # The live table (stderr is not a terminal: printed again on each change), then the
    # final one on stdout, sorted by the first axis.
    assert result.stderr.count("final accuracy") >= 2
    table = result.stdout.splitlines()[1:]
    assert table[0].split()[:2] == ["tbptt.k1", "done"]
    assert [line.split()[0] for line in table[1:3]] == ["4", "16"]
    assert table[-1] == f"{sweep_id} succeeded; best: tbptt.k1=16"

    with Client(service.url, service.token) as api:
        sweep = api.get_sweep(sweep_id)
    assert sweep["state"] == "succeeded" and sweep["counts"] == {"succeeded": 2}
    rows = {row["point"]["tbptt.k1"]: row for row in sweep["summary"]["rows"]}
    assert all(job["summary"]["steps"] == 600 and set(job["point"]) == {"tbptt.k1"} and job["seed"] == 0 for job in sweep["jobs"])
    low, high = rows[4], rows[16]
    print(f"sweep took {time.monotonic() - started:.0f}s; accuracy k=4 {low['final']['mean']:.3f}, k=16 {high['final']['mean']:.3f}")
    assert low["jobs_done"] == high["jobs_done"] == 1
    assert low["final"]["mean"] < 0.35 and low["best"]["mean"] < 0.35  # chance is 0.25
    assert high["final"]["mean"] > 0.9
    assert sweep["summary"]["best_point"] == {"tbptt.k1": 16}
    for row in (low, high):
        assert row["steps"] == 600 and row["wall_s"] > 0 and row["tokens_per_s"] > 0 and row["peak_memory_bytes"] > 0
        assert 0 <= row["clipped_fraction"] <= 1 and row["skipped_steps"] == 0


def test_cancel_stops_every_job_of_a_sweep(service):
    """Queued jobs end at once; the running one stops through its worker."""
    base = yaml.safe_load((EXAMPLES / "recall-truncation.yaml").read_text())
    base = copy.deepcopy(base)
    base["model"]["hidden_size"] = 16
    base["train"].update(max_steps=1_000_000, eval_every=50, checkpoint_every=0)
    with Client(service.url, service.token) as api:
        sweep = api.create_sweep(base, {"tbptt.k1": [4, 8, 12]}, max_parallel=1, name="to-cancel")
        deadline = time.monotonic() + 90
        while True:
            sweep = api.get_sweep(sweep["id"])
            running = [job for job in sweep["jobs"] if job["state"] == "running" and job["step"] > 10]
            if running:
                break
            assert time.monotonic() < deadline, f"no job started\n{service.tails()}"
            time.sleep(0.5)
        assert sweep["counts"] == {"running": 1, "queued": 2} and sweep["state"] == "running"

        assert api.cancel_sweep(sweep["id"])["cancelled"] == 3
        sweep = api.get_sweep(sweep["id"])
        assert sweep["counts"].get("cancelled") == 2 and sweep["cancel_requested"]
        deadline = time.monotonic() + 30
        while sweep["state"] != "cancelled":
            assert time.monotonic() < deadline, f"the running job did not stop\n{service.tails()}"
            time.sleep(0.5)
            sweep = api.get_sweep(sweep["id"])
        assert sweep["counts"] == {"cancelled": 3}
        stopped = next(job for job in sweep["jobs"] if job["job_id"] == running[0]["job_id"])
        assert stopped["step"] >= running[0]["step"] and stopped["step"] < 1_000_000
        assert sum(row["jobs_done"] for row in sweep["summary"]["rows"]) == 3
