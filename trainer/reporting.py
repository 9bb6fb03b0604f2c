"""Run folders on disk: a callback that writes a run's metrics, checkpoints and summary
under one folder, and the lookup of the folder's latest checkpoint to resume from.

A library for anything that trains into a folder (`unroll train`, the data-parallel
workers); it does no argument parsing and prints nothing.

    DIR/metrics.jsonl          one JSON object per update and per evaluation
    DIR/checkpoints/step-N.pt  checkpoints (N zero-padded to 8 digits); the newest
                               `train.keep_checkpoints` are kept, older ones deleted
    DIR/model.pt               a completed run's model: config, weights (train.model: last
                               or best) and the inference section, no training state
    DIR/summary.json           the run's summary, written at the end
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer import checkpoint as ckpt
from trainer.loop import Callback, Summary

CHECKPOINT_GLOB = "step-*.pt"
MODEL_FILE = "model.pt"  # a completed run's model (trainer.checkpoint.model_artifact)


class FileReporter(Callback):
    """Writes metrics.jsonl and checkpoints under the output folder, keeping the newest
    `train.keep_checkpoints` of the run's config (read at the start) as the service does."""

    def __init__(self, out: Path):
        self.out = out
        self.keep: int | None = None  # None: keep every checkpoint (no config seen yet)
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        self._metrics = (out / "metrics.jsonl").open("a", buffering=1 << 16)

    def on_start(self, info: dict[str, Any]) -> None:
        self.keep = info["config"]["train"]["keep_checkpoints"]

    def _write(self, step: int, metrics: dict[str, Any]) -> None:
        self._metrics.write(json.dumps({"step": step, **metrics}) + "\n")

    on_update = on_eval = _write

    def on_checkpoint(self, step: int, checkpoint: dict[str, Any]) -> None:
        self._metrics.flush()
        ckpt.save(self.out / "checkpoints" / f"step-{step:08d}.pt", checkpoint)
        if self.keep is not None:
            # Only after the new one is saved: a crash in between leaves one too many, never none.
            for old in _by_step(self.out)[: -self.keep]:
                old.unlink(missing_ok=True)

    def on_model(self, artifact: dict[str, Any]) -> None:
        ckpt.save(self.out / MODEL_FILE, artifact)

    def on_end(self, summary: Summary) -> None:
        self._metrics.close()
        (self.out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")


def latest_checkpoint(folder: Path) -> Path | None:
    found = _by_step(folder)
    return found[-1] if found else None


def _by_step(folder: Path) -> list[Path]:
    """The folder's checkpoints, oldest first (by step number: past 10^8 steps the names
    have more digits and no longer sort as text)."""
    def step(path: Path) -> int:
        digits = path.stem.removeprefix("step-")
        return int(digits) if digits.isdigit() else -1

    return sorted((folder / "checkpoints").glob(CHECKPOINT_GLOB), key=step)
