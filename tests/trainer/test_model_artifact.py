"""The `model` artifact of a completed run (issue 15 part 1): the config, the weights (the
last, or with train.model: best those of the lowest valid/loss) and the inference section,
no training state; resumed runs choose the same best weights as an uninterrupted one."""

from __future__ import annotations

import torch

from trainer import checkpoint as ckpt
from trainer.inference import load
from trainer.loop import fit
from trainer.reporting import MODEL_FILE, FileReporter, latest_checkpoint
from tests.trainer.test_resume import Recorder, StopAt, config


class Keep(Recorder):
    def __init__(self):
        super().__init__()
        self.model: dict | None = None
        self.valid: dict[int, float] = {}

    def on_eval(self, step, metrics):
        self.valid[step] = metrics["valid/loss"]

    def on_model(self, artifact):
        self.model = ckpt.from_bytes(ckpt.to_bytes(artifact))


def test_the_last_model_is_the_final_weights_without_training_state(tmp_path):
    run = Keep()
    fit(config(40), [FileReporter(tmp_path / "run"), run])
    model = run.model
    assert model["selected"] == "last" and model["step"] == 40
    assert {"optimizer", "rng", "cursor", "counters", "schedule"}.isdisjoint(model)
    last = ckpt.from_bytes(run.checkpoints[40])["model"]
    assert all(torch.equal(model["model"][k], last[k]) for k in last)
    on_disk = tmp_path / "run" / MODEL_FILE
    assert on_disk.stat().st_size < latest_checkpoint(tmp_path / "run").stat().st_size / 2
    assert load(tmp_path / "run").artifact.step == 40  # the folder's model.pt, not its checkpoint


def test_the_best_model_is_the_lowest_validation_and_survives_a_resume():
    # lr 0.1: the lowest valid/loss comes at step 10, before the interruption at 30, so
    # the resumed run knows it only from the checkpoint.
    base = config(60)
    best = {**base, "optim": {**base["optim"], "lr": 0.1}, "train": {**base["train"], "model": "best", "eval_every": 5}}
    whole = Keep()
    fit(best, [whole])
    chosen = min(whole.valid, key=lambda step: (whole.valid[step], step))
    assert chosen != 60, "the test needs a run whose last evaluation is not its best"
    assert whole.model["selected"] == "best" and whole.model["step"] == chosen
    assert whole.model["valid_loss"] == whole.valid[chosen]

    first, resumed = Keep(), Keep()
    fit(best, [first, StopAt(30)])
    fit(best, [resumed], resume=ckpt.from_bytes(first.checkpoints[30]))
    assert resumed.model["step"] == chosen
    assert all(torch.equal(resumed.model["model"][k], whole.model["model"][k]) for k in whole.model["model"])


def test_a_run_that_did_not_complete_writes_no_model():
    run = Keep()
    fit(config(60), [run, StopAt(20)])
    assert run.model is None and 20 in run.checkpoints


