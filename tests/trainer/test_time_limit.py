"""train.max_wall_s: the run stops when its training time, counted across resumes, is used
up, after a final checkpoint, with `stopped: time limit`."""

from __future__ import annotations

from trainer import checkpoint as ckpt
from trainer.loop import Callback, fit

CONFIG = {
    "model": {"hidden_size": 8},
    "data": {"kind": "recall", "vocab": 4, "lag": 2, "length": 100_000, "batch_size": 2, "valid_length": 32},
    "tbptt": {"k1": 5},
    "train": {"max_steps": 1_000_000, "eval_every": 0, "checkpoint_every": 0, "device": "cpu", "max_wall_s": 0.5},
}


class Keep(Callback):
    def __init__(self):
        self.saved: dict[int, dict] = {}

    def on_checkpoint(self, step, state):
        self.saved[step] = ckpt.from_bytes(ckpt.to_bytes(state))


def test_the_run_stops_when_its_time_is_used_up_and_checkpoints_there():
    keep = Keep()
    summary = fit(CONFIG, [keep])
    assert summary.stopped == "time limit" and 0 < summary.steps < 1_000_000
    assert list(keep.saved) == [summary.steps]  # the final checkpoint, at the stopping step
    assert keep.saved[summary.steps]["counters"]["wall_seconds"] >= 0.5


def test_the_time_is_counted_across_resumes():
    keep = Keep()
    first = fit(CONFIG, [keep])
    state = keep.saved[first.steps]
    again = fit(CONFIG, resume=state)  # the same limit: nothing left
    assert again.stopped == "time limit" and again.steps == first.steps
    longer = {**CONFIG, "train": {**CONFIG["train"], "max_wall_s": 1.0}}
    more = fit(longer, resume=state)  # a larger one: it goes on from the checkpoint
    assert more.stopped == "time limit" and more.steps > first.steps


def test_without_a_limit_nothing_stops_early():
    config = {**CONFIG, "train": {**CONFIG["train"], "max_steps": 20, "max_wall_s": None}}
    assert fit(config).stopped == "completed"
