"""Test scaffolding for data-parallel groups without the service: a sink that reads and
writes a folder as `unroll train --out` does, and a callback that kills one rank."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from trainer import checkpoint as ckpt
from trainer.loop import Callback
from trainer.reporting import FileReporter, latest_checkpoint
from workers.ddp import RankTrainer


def world_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@dataclass(frozen=True)
class KillRank(Callback):
    """Rank `rank` dies (os._exit) after update `step`, once (the marker file remembers),
    as a lost node would."""

    rank: int
    step: int
    marker: str

    def on_update(self, step, metrics):
        if step == self.step and world_rank() == self.rank and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)


@dataclass(frozen=True)
class DirSink:
    """A folder, as `unroll train --out` writes it (metrics.jsonl, checkpoints/,
    summary.json)."""

    out: str

    def train_rank0(self, train: RankTrainer) -> None:
        out = Path(self.out)
        path = latest_checkpoint(out) if (out / "checkpoints").is_dir() else None
        train([FileReporter(out)], ckpt.load(path) if path else None)

    def train_other(self, train: RankTrainer) -> None:
        train([], None)
