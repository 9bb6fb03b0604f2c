"""trainer.reporting, the library the CLI and the data-parallel workers train into a
folder with: metrics.jsonl, checkpoints/step-N.pt, summary.json, and the latest
checkpoint to resume from."""

from __future__ import annotations

import json

from trainer import checkpoint as ckpt
from trainer.loop import fit
from trainer.reporting import FileReporter, latest_checkpoint

CONFIG = {
    "model": {"hidden_size": 8},
    "data": {"kind": "recall", "vocab": 4, "lag": 2, "length": 400, "batch_size": 2, "valid_length": 32},
    "tbptt": {"k1": 5},
    "train": {"max_steps": 6, "eval_every": 3, "checkpoint_every": 4, "device": "cpu"},
}


def test_file_reporter_writes_the_run_folder(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    summary = fit(CONFIG, [FileReporter(tmp_path)])
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "train/loss" in m] == [1, 2, 3, 4, 5, 6]
    assert [m["step"] for m in lines if "valid/loss" in m] == [3, 6]
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000004.pt", "step-00000006.pt"]
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary.to_dict()))
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step-00000006.pt"
    assert ckpt.load(latest)["step"] == 6


def test_the_cli_uses_the_library():
    from trainer import cli, reporting

    assert cli.FileReporter is reporting.FileReporter and cli.latest_checkpoint is reporting.latest_checkpoint
