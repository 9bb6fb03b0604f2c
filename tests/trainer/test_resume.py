"""Checkpoints make resume exact: 2N steps in one run equal N, a resume, and N more,
bit for bit, on CPU (losses at every step and the final parameters)."""

from __future__ import annotations

import pytest
import torch

from trainer import checkpoint as ckpt
from trainer.loop import Callback, fit


class Recorder(Callback):
    def __init__(self):
        self.losses: dict[int, float | None] = {}
        self.checkpoints: dict[int, bytes] = {}
        self.final: dict | None = None

    def on_update(self, step, metrics):
        self.losses[step] = metrics["train/loss"]

    def on_checkpoint(self, step, checkpoint):
        # Serialise at once, as a real store would: later updates must not leak in.
        self.checkpoints[step] = ckpt.to_bytes(checkpoint)


def config(steps: int, **tbptt) -> dict:
    return {
        "model": {"cell": "lstm", "hidden_size": 24, "num_layers": 2, "dropout": 0.2},
        "data": {"kind": "recall", "vocab": 5, "lag": 3, "length": 300, "batch_size": 4, "valid_length": 64},
        "tbptt": {"k1": 7, **tbptt},
        "clip": {"mode": "autoclip", "history": 20},
        "optim": {"name": "adamw", "lr": 0.01, "schedule": "cosine", "warmup_steps": 5},
        "train": {"max_steps": steps, "eval_every": 10, "checkpoint_every": 30, "seed": 1, "device": "cpu"},
    }


class StopAt(Callback):
    """Interrupts the run between windows, as a cancellation or a lost worker would."""

    def __init__(self, step: int):
        self.step, self.seen = step, 0

    def on_update(self, step, metrics):
        self.seen = step

    def should_stop(self):
        return self.seen >= self.step


def final_params(blob: bytes) -> dict[str, torch.Tensor]:
    return ckpt.from_bytes(blob)["model"]


@pytest.mark.parametrize(
    "tbptt",
    [
        {},  # k1 = k2
        {"k2": 12},  # the kept state lies k2 - k1 before the boundary
        {"k2": 3},
        {"k1": 12, "k2": 12, "randomize": True},  # the window draws continue
    ],
    ids=["k1=k2", "k2>k1", "k2<k1", "randomized"],
)
def test_resume_is_bit_exact(tbptt):
    # 300 steps per stream / 7 per window: the run crosses epochs, and step 30 is mid-epoch.
    whole = Recorder()
    fit(config(60, **tbptt), [whole])
    first = Recorder()
    fit(config(60, **tbptt), [first, StopAt(30)])
    resumed = Recorder()
    fit(config(60, **tbptt), [resumed], resume=ckpt.from_bytes(first.checkpoints[30]))

    assert min(resumed.losses) == 31
    stitched = {**first.losses, **resumed.losses}
    assert stitched == whole.losses  # exact float equality, every step
    a, b = final_params(whole.checkpoints[60]), final_params(resumed.checkpoints[60])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_different_trajectory():
    first = Recorder()
    fit(config(60), [first, StopAt(30)])
    changed = config(60)
    changed["tbptt"]["k1"] = 9
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match="tbptt"):
        fit(changed, [], resume=ckpt.from_bytes(first.checkpoints[30]))


def test_checkpoint_holds_every_part_of_the_trajectory():
    rec = Recorder()
    fit(config(30, k2=12), [rec])
    state = ckpt.from_bytes(rec.checkpoints[30])
    assert set(state) >= {"config", "model", "optimizer", "schedule", "scaler", "clipper", "rng", "cursor", "counters"}
    assert state["cursor"]["kept_position"] == state["cursor"]["position"] - 5  # k2 - k1 back
    h, c = state["cursor"]["kept"]
    assert h.shape == c.shape == (2, 4, 24)  # every layer, every stream
    assert len(state["clipper"]["history"]) == 20
