"""`unroll train` as a user runs it: a real subprocess, files on disk, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

CONFIG = {
    "name": "cli-recall",
    "model": {"hidden_size": 32},
    "data": {"kind": "recall", "vocab": 4, "lag": 2, "length": 20_000, "batch_size": 8, "valid_length": 256},
    "tbptt": {"k1": 8},
    "optim": {"lr": 0.01},
    "train": {"max_steps": 40, "eval_every": 20, "checkpoint_every": 20, "device": "cpu"},
}


def unroll(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )


def write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_train_writes_metrics_checkpoints_and_summary(tmp_path):
    out = tmp_path / "run"
    result = unroll("train", str(write(tmp_path, CONFIG)), "--out", str(out), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("steps", "final_train_loss", "final_valid_loss", "valid_accuracy", "tokens_per_s", "wall_s",
                "peak_memory_bytes", "clipped_fraction", "skipped_steps"):
        assert key in summary, key
    assert summary["steps"] == 40 and 0 <= summary["valid_accuracy"] <= 1
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if "train/loss" in m]
    assert [m["step"] for m in train] == list(range(1, 41))
    assert {"train/grad_norm", "train/grad_norm_clipped", "train/clipped", "train/skipped", "train/lr",
            "train/tokens_per_s", "train/k1"} <= set(train[0])
    assert [m["step"] for m in lines if "valid/loss" in m] == [20, 40]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000020.pt", "step-00000040.pt"]
    assert json.loads((out / "summary.json").read_text())["steps"] == 40
    assert "step 40/40" in result.stderr  # progress lines go to stderr with --json


def test_resume_continues_from_the_latest_checkpoint(tmp_path):
    out = tmp_path / "run"
    config = write(tmp_path, CONFIG)
    assert unroll("train", str(config), "--out", str(out), "--max-steps", "20", cwd=tmp_path).returncode == 0
    result = unroll("train", str(config), "--resume", str(out), "--max-steps", "40", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["steps"] == 40
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in line]
    assert steps == list(range(1, 41))


def test_config_error_names_the_field_without_a_traceback(tmp_path):
    bad = dict(CONFIG, tbptt={"k1": 8, "k2": 0})
    result = unroll("train", str(write(tmp_path, bad)), cwd=tmp_path)
    assert result.returncode == 2
    assert "error: tbptt.k2: must be >= 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_data_file_is_reported(tmp_path):
    bad = dict(CONFIG, data={"kind": "text", "path": "missing.txt"})
    result = unroll("train", str(write(tmp_path, bad)), cwd=tmp_path)
    assert result.returncode == 2
    assert "error: data.path: no such file" in result.stderr and "Traceback" not in result.stderr
