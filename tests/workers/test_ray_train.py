"""Data-parallel jobs through Ray Train (TorchTrainer, gloo, 2 CPU ranks) on a local Ray
instance: the group equals one process with every stream, and a rank killed mid-run
restarts the group from the last checkpoint and ends with the undisturbed parameters."""

from __future__ import annotations

import json
import secrets
import shutil
from pathlib import Path

import pytest
import torch

from tests.trainer.ranks import run_single
from trainer import checkpoint as ckpt
from tests.workers.sinks import DirSink, KillRank
from trainer.config import JobConfig, parse_config
from workers.ddp import group_is_placeable, train_group

pytestmark = pytest.mark.slow

STEPS = 14


def config(workers: int) -> JobConfig:
    return parse_config({
        "model": {"cell": "lstm", "hidden_size": 16, "num_layers": 1},
        "data": {"kind": "recall", "vocab": 5, "lag": 3, "length": 160, "batch_size": 4, "valid_length": 64},
        "tbptt": {"k1": 6},
        "clip": {"mode": "norm", "max_norm": 0.5},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"max_steps": STEPS, "eval_every": 7, "checkpoint_every": 5, "seed": 2, "device": "cpu"},
        "resources": {"cpus": 1, "workers": workers},
    })


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.train.torch", reason='needs ray[train] (pandas, pyarrow)')
    temp_dir = f"/tmp/ray-ddp-{secrets.token_hex(3)}"
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}})
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def losses(out: Path) -> dict[int, float | None]:
    """Per-step train/loss; the last line of a step wins (a restarted group rewrites the
    steps after its checkpoint)."""
    found: dict[int, float | None] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            found[row["step"]] = row["train/loss"]
    return found


def final_state(out: Path) -> dict:
    return ckpt.load(out / "checkpoints" / f"step-{STEPS:08d}.pt")


@pytest.fixture(scope="module")
def undisturbed(local_ray, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("undisturbed")
    train_group(config(2), DirSink(str(out)), name="undisturbed", storage=str(out / "ray"))
    return out


def test_two_ray_train_ranks_equal_one_process(undisturbed):
    single = run_single(config(1))
    group = losses(undisturbed)
    assert group.keys() == single["losses"].keys() == set(range(1, STEPS + 1))
    for step, value in single["losses"].items():
        assert abs(group[step] - value) <= 1e-5, (step, group[step], value)
    summary = json.loads((undisturbed / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["tokens_per_s"] > 0
    state = final_state(undisturbed)
    assert state["ranks"]["world"] == 2 and state["cursor"]["kept"][0].shape[1] == 4


def test_killed_rank_restarts_group_and_ends_as_undisturbed(undisturbed, tmp_path):
    marker = tmp_path / "killed"
    out = tmp_path / "run"
    train_group(config(2), DirSink(str(out)), name="killed", storage=str(tmp_path / "ray"),
                extra=(KillRank(rank=1, step=7, marker=str(marker)),))
    assert marker.exists()  # rank 1 did die after step 7; the group restarted from step 5
    # The restarted group resumed from the checkpoint of step 5, not from the start.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r].count(1) == 1
    expected, got = final_state(undisturbed)["model"], final_state(out)["model"]
    for name, value in expected.items():
        assert torch.equal(got[name], value), name  # bit for bit: a resume continues the trajectory
    assert losses(out) == losses(undisturbed)


def test_probe_reserves_whole_groups_only(local_ray):
    assert group_is_placeable(1, 0, 2)
    assert not group_is_placeable(1, 0, 3, timeout_s=0.5)  # 3 CPUs on a 2-CPU instance
    assert local_ray.available_resources().get("CPU") == 2  # the probes hold nothing
