"""train.keep_checkpoints in a run folder (`unroll train`, trainer.reporting.FileReporter):
after each checkpoint only the newest N stay, and a resume from them continues the very
trajectory of an undisturbed run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from service.cli.main import main
from trainer.config import ConfigError, parse_config
from trainer.loop import Callback, fit
from trainer.reporting import latest_checkpoint

CONFIG = {
    "model": {"hidden_size": 8},
    "data": {"kind": "recall", "vocab": 4, "lag": 2, "length": 400, "batch_size": 2, "valid_length": 32},
    "tbptt": {"k1": 5},
    "train": {"max_steps": 9, "eval_every": 0, "checkpoint_every": 2, "keep_checkpoints": 2, "device": "cpu"},
}


class Losses(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_update(self, step, metrics):
        self.losses[step] = metrics["train/loss"]


def names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_unroll_train_keeps_the_newest_checkpoints_and_resumes_from_them(tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / "run"
    assert main(["train", str(config), "--out", str(out), "--json"]) == 0
    assert names(out) == ["step-00000008.pt", "step-00000009.pt"]  # of 2, 4, 6, 8, 9

    assert main(["train", str(config), "--resume", str(out), "--max-steps", "13", "--json"]) == 0
    assert names(out) == ["step-00000012.pt", "step-00000013.pt"]  # of 10, 12, 13
    written = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    resumed = {m["step"]: m["train/loss"] for m in written if "train/loss" in m}
    undisturbed = Losses()
    fit({**CONFIG, "train": {**CONFIG["train"], "max_steps": 13}}, [undisturbed])
    assert resumed == undisturbed.losses  # bit for bit, as SPEC §1 asks of a resume on CPU


def test_the_newest_checkpoint_is_found_by_its_number_past_ten_to_the_eighth(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    for step in (99_999_999, 100_000_000):
        (tmp_path / "checkpoints" / f"step-{step:08d}.pt").write_bytes(b"")
    assert latest_checkpoint(tmp_path).name == "step-100000000.pt"  # as text it sorts first


def test_keep_checkpoints_defaults_to_three_and_is_at_least_one():
    assert parse_config({"data": {"kind": "recall"}}).train.keep_checkpoints == 3
    with pytest.raises(ConfigError) as raised:
        parse_config({"data": {"kind": "recall"}, "train": {"keep_checkpoints": 0}})
    assert raised.value.first_field == "train.keep_checkpoints"
