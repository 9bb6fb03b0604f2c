"""Tiny trained models for the tests of trainer.load / trainer.export: trained in-process
with trainer.loop.fit into a run folder, as `unroll train` does."""

from __future__ import annotations

import argparse
import csv
import math
import random
from pathlib import Path
from typing import Any

from trainer import use_cli
from trainer.loop import Callback, fit
from trainer.reporting import FileReporter, latest_checkpoint

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away"]


class LastEval(Callback):
    def __init__(self):
        self.metrics: dict[str, Any] = {}

    def on_eval(self, step, metrics):
        self.metrics = metrics


def text(documents: int, seed: int) -> str:
    rng = random.Random(seed)
    docs = []
    for _ in range(documents):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))) for _ in range(rng.randint(1, 3))]
        docs.append("\n".join(lines))
    return "\n\n".join(docs) + "\n"


def train(folder: Path, config: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Train `config` into folder/run; (its latest checkpoint, the last evaluation)."""
    last = LastEval()
    fit(config, [FileReporter(folder / "run"), last])
    return latest_checkpoint(folder / "run"), last.metrics


def text_config(folder: Path, tokenizer: str = "char", **model: Any) -> dict[str, Any]:
    (folder / "train.txt").write_text(text(150, seed=1))
    (folder / "valid.txt").write_text(text(60, seed=2))  # > 512 steps a stream: windows carry state
    return {
        "model": {"cell": "lstm", "hidden_size": 16, "embedding_dim": 8, "dropout": 0.1, **model},
        "data": {"kind": "text", "path": str(folder / "train.txt"), "valid_path": str(folder / "valid.txt"), "tokenizer": tokenizer, "batch_size": 4},
        # resets and activation-checkpoint cuts: evaluation must cut windows as training did
        "tbptt": {"k1": 12, "reset_on": "document", "checkpoint_every": 5},
        "optim": {"lr": 0.01},
        "train": {"max_steps": 20, "eval_every": 10, "checkpoint_every": 0, "device": "cpu", "seed": 3},
    }


def series_rows(n: int, seed: int) -> list[dict[str, float]]:
    """A level around 1000 (std ~5) driven by a covariate: far from z-scored units."""
    rng = random.Random(seed)
    return [{"load": 1000 + 5 * math.sin(t / 4) + rng.gauss(0, 0.5), "temp": 20 + 3 * math.cos(t / 4), "day": t % 7} for t in range(n)]


def write_csv(path: Path, rows: list[dict[str, float]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def series_config(folder: Path, columns: list[str], cell: str = "gru", steps: int = 20) -> dict[str, Any]:
    write_csv(folder / "series.csv", series_rows(400, seed=5))
    return {
        "model": {"cell": cell, "hidden_size": 12},
        "data": {"kind": "timeseries", "path": str(folder / "series.csv"), "columns": columns, "target": "load", "batch_size": 4, "valid_fraction": 0.25},
        "tbptt": {"k1": 10},
        "optim": {"lr": 0.01},
        "train": {"max_steps": steps, "eval_every": 0, "checkpoint_every": 0, "device": "cpu"},
    }


def recall_config(cell: str) -> dict[str, Any]:
    return {
        "model": {"cell": cell, "hidden_size": 8, "num_layers": 2, "embedding_dim": 4},
        "data": {"kind": "recall", "vocab": 6, "lag": 2, "length": 200, "valid_length": 40, "batch_size": 2},
        "tbptt": {"k1": 8},
        "train": {"max_steps": 3, "eval_every": 0, "checkpoint_every": 0, "device": "cpu"},
    }


def run_cli(argv: list[str]) -> int:
    """`unroll generate|predict|evaluate|export ...` as trainer.use_cli defines them."""
    parser = argparse.ArgumentParser(prog="unroll")
    use_cli.add_parser(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    return args.func(args)
