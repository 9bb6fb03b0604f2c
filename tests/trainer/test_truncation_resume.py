"""Modes adaptive and unbiased resume bit-exactly (the pattern of test_resume.py): ARTBP's
draws come from the checkpointed window generator, the adaptive k2 and decay from the
checkpoint's `truncation` section; with dropout, autoclip, k2 > k1 and epochs crossed."""

from __future__ import annotations

import pytest
import torch

from tests.trainer.test_resume import Recorder, StopAt, config, final_params
from trainer import checkpoint as ckpt
from trainer.loop import fit


class Metrics(Recorder):
    def __init__(self):
        super().__init__()
        self.metrics: dict[int, dict] = {}

    def on_update(self, step, metrics):
        super().on_update(step, metrics)
        self.metrics[step] = metrics


MODES = {
    "unbiased": {"mode": "unbiased", "k1": 7},
    "unbiased-power": {"mode": "unbiased", "k1": 6, "k_min": 2, "truncation_schedule": "power"},
    # measures at updates 0, 5, 10, ...: 15 and 20 after the resume at 12
    "adaptive": {"mode": "adaptive", "k1": 5, "k_min": 2, "k_max": 16, "adapt_every": 5, "delta": 0.2},
}


@pytest.mark.parametrize("tbptt", list(MODES.values()), ids=list(MODES))
def test_resume_is_bit_exact(tbptt):
    whole = Metrics()
    fit(config(24, **tbptt), [whole])
    first = Metrics()
    fit(config(24, **tbptt), [first, StopAt(12)])
    resumed = Metrics()
    fit(config(24, **tbptt), [resumed], resume=ckpt.from_bytes(first.checkpoints[12]))

    assert min(resumed.losses) == 13
    assert {**first.losses, **resumed.losses} == whole.losses  # exact float equality, every step
    key = "train/k2" if tbptt["mode"] == "adaptive" else "train/truncation_length"
    series = [whole.metrics[s][key] for s in sorted(whole.metrics)]
    assert [resumed.metrics[s][key] for s in sorted(resumed.metrics)] == series[12:]
    assert len(set(series)) > 1  # the draws, or the chosen k2, really vary
    a, b = final_params(whole.checkpoints[24]), final_params(resumed.checkpoints[24])
    assert all(torch.equal(a[k], b[k]) for k in a)
    if tbptt["mode"] == "adaptive":
        state = ckpt.from_bytes(first.checkpoints[12])["truncation"]
        assert state["k2"] == first.metrics[12]["train/k2"] and state["beta"] == first.metrics[12]["train/decay_rate"]
