"""The truncation bias, shown by the product itself on `recall` with lag 8 (SPEC §2):
learnable only when the gradient reaches 8 steps back."""

from __future__ import annotations

import pytest

from trainer.loop import fit

LAG = 8


def run(k1: int, k2: int, steps: int) -> float:
    summary = fit({
        "model": {"cell": "lstm", "hidden_size": 128},
        "data": {"kind": "recall", "vocab": 4, "lag": LAG, "length": 100_000, "batch_size": 32, "valid_length": 2048},
        "tbptt": {"k1": k1, "k2": k2},
        "clip": {"mode": "norm", "max_norm": 1.0},
        "optim": {"name": "adam", "lr": 0.003},
        "train": {"max_steps": steps, "eval_every": 0, "seed": 0, "device": "cpu"},
    })
    return summary.valid_accuracy


@pytest.mark.slow
def test_window_of_twice_the_lag_learns():
    assert run(2 * LAG, 2 * LAG, 1000) > 0.95


@pytest.mark.slow
def test_window_shorter_than_the_lag_stays_at_chance():
    assert run(4, 4, 1000) < 0.35  # chance is 0.25


@pytest.mark.slow
def test_gradient_window_longer_than_the_lag_learns_with_short_updates():
    # k1 < lag < k2: the loss covers 4 steps but the gradient flows back 16.
    assert run(4, 2 * LAG, 1500) > 0.9
