"""Every tensor the trainer's update path makes names its device (issue 18); and
`train.deterministic` holds for its run, and no longer.

On a GPU, a tensor made without `device=` lands on the CPU, and the update then mixes
devices (`torch.stack` of a CUDA norm and a CPU flag raises). CPU-only machines cannot see
that by running, so the tests here run updates under a TorchFunctionMode that raises on a
tensor factory called from the trainer without `device=` (a `*_like` inherits its device
and passes). Each clip mode, per-parameter clipping, the non-finite paths, fp32, bf16 and
fp16, and every TBPTT mode is covered; the `meta` device would not do, since the
non-finite checks need values.

Only the trainer's own calls are checked: torch's are its business. trainer/data.py and
trainer/filedata.py build windows on the host on purpose (the update copies each window
to the device once: `Window.to`), so they are left out.
"""

from __future__ import annotations

import math
import os
import sys
import typing
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import trainer
from trainer.config import TBPTTConfig, parse_config
from trainer.data import load_data
from trainer.loop import Callback, NonFiniteError, Trainer, fit

FACTORIES = frozenset({
    torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange,
    torch.rand, torch.randn, torch.randint, torch.normal,
})
PACKAGE = Path(trainer.__file__).resolve().parent
HOST_SIDE = frozenset({PACKAGE / "data.py", PACKAGE / "filedata.py"})


class ImplicitDevice(AssertionError):
    """A tensor factory called from the trainer without `device=`."""


class DeviceNamed(TorchFunctionMode):
    """Raise on a tensor factory called from the trainer's update path without `device=`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            caller = sys._getframe(1)  # the frame that called the factory
            where = Path(caller.f_code.co_filename).resolve()
            if where.is_relative_to(PACKAGE) and where not in HOST_SIDE:
                raise ImplicitDevice(f"torch.{func.__name__} without device= at {where.name}:{caller.f_lineno}")
        return func(*args, **kwargs)


RECALL = {"kind": "recall", "vocab": 4, "lag": 2, "length": 120, "batch_size": 3, "valid_length": 16}


def make_trainer(data: dict | None = None, **overrides) -> Trainer:
    raw = {
        "model": {"hidden_size": 8, "num_layers": 2, "embedding_dim": 4},
        "data": data or RECALL,
        "tbptt": {"k1": 6},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"max_steps": 100, "device": "cpu"},
    }
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    config = parse_config(raw)
    return Trainer(config, load_data(config.data, config.train.seed), torch.device("cpu"))


def updates(trainer: Trainer, n: int = 2) -> list[dict]:
    with DeviceNamed():
        return [trainer.update() for _ in range(n)]


CLIPS = {
    "none": {"mode": "none"},
    "norm": {"mode": "norm", "max_norm": 1e-3},
    "per_parameter": {"mode": "norm", "max_norm": 1e-3, "per_parameter": True},
    "value": {"mode": "value", "value": 1e-4},
    "agc": {"mode": "agc", "agc_factor": 1e-4},
    "autoclip": {"mode": "autoclip", "percentile": 50},
}
PRECISIONS = ["fp32", "bf16", "fp16"]


def test_the_guard_raises_on_a_trainer_call_without_device():
    # A call compiled as if written in the trainer's own files; the guard must see it.
    call = compile("torch.zeros(())", str(PACKAGE / "clipping.py"), "eval")
    with DeviceNamed(), pytest.raises(ImplicitDevice, match="zeros without device= at clipping.py"):
        eval(call, {"torch": torch})
    with DeviceNamed():
        eval(compile("torch.zeros((), device='cpu')", str(PACKAGE / "clipping.py"), "eval"), {"torch": torch})
        torch.zeros(())  # a test's own call is not the trainer's


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("clip", list(CLIPS))
def test_every_clip_mode_names_its_devices(clip, precision):
    metrics = updates(make_trainer(clip=CLIPS[clip], train={"precision": precision}))
    assert all(m["train/grad_norm"] is not None for m in metrics)
    if clip in ("norm", "per_parameter", "value", "agc"):  # thresholds small enough to act
        assert all(m["train/clipped"] == 1.0 for m in metrics)


def poison_gradients(trainer: Trainer) -> None:
    trainer.model.decoder.weight.register_hook(lambda g: torch.full_like(g, math.nan))


def poison_loss(trainer: Trainer) -> None:
    trainer.model.decoder.register_forward_hook(lambda module, args, out: out * math.nan)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("clip", ["none", "norm", "per_parameter", "value", "agc", "autoclip"])
@pytest.mark.parametrize("poison", [poison_gradients, poison_loss], ids=["nan_gradients", "nan_loss"])
def test_nonfinite_updates_are_skipped_on_the_devices_they_met(poison, clip, precision):
    trainer = make_trainer(clip=CLIPS[clip], train={"precision": precision})
    updates(trainer, 1)
    poison(trainer)
    metrics = updates(trainer, 1)[0]
    assert metrics["train/skipped"] == 1.0 and metrics["train/grad_norm"] is None


@pytest.mark.parametrize("poison", [poison_gradients, poison_loss], ids=["nan_gradients", "nan_loss"])
def test_nonfinite_fail_policy_raises_its_own_error(poison):
    trainer = make_trainer(clip={"mode": "value", "value": 0.1, "on_nonfinite": "fail"})
    poison(trainer)
    with pytest.raises(NonFiniteError):
        updates(trainer, 1)


def tbptt_cases() -> list[tuple[str, dict, dict]]:
    """(id, tbptt section, data section) for every mode the config accepts, and the
    variants of `truncated` that take other paths (k2 < k1 advances without a graph,
    k2 > k1 recomputes, document resets, activation checkpointing, random windows)."""
    adding = {"kind": "adding", "length": 10, "episodes": 12, "valid_episodes": 3, "batch_size": 3}
    modes = typing.get_args(TBPTTConfig.model_fields["mode"].annotation)
    cases = [(mode, {"mode": mode}, {}) for mode in modes]
    cases += [
        ("adaptive-measuring", {"mode": "adaptive", "adapt_every": 1}, {}) if "adaptive" in modes else None,
        ("k2<k1", {"k1": 8, "k2": 3}, {}),
        ("k2>k1", {"k1": 3, "k2": 8}, {}),
        ("randomize", {"k1": 12, "randomize": True}, {}),
        ("reset_each_epoch", {"k1": 50, "reset_each_epoch": True}, {}),
        ("documents", {"k1": 7, "k2": 9, "reset_on": "document"}, adding),
        ("checkpoint_every", {"k1": 8, "k2": 11, "reset_on": "document", "checkpoint_every": 3}, adding),
    ]
    return [case for case in cases if case is not None]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("tbptt,data", [pytest.param(t, d, id=name) for name, t, d in tbptt_cases()])
def test_every_tbptt_mode_names_its_devices(tbptt, data, precision):
    trainer = make_trainer(data or None, tbptt=tbptt, train={"precision": precision})
    updates(trainer, 3)
    with DeviceNamed():
        assert math.isfinite(trainer.evaluate()["valid/loss"])


# -- train.deterministic ---------------------------------------------------------------------


class Flags(Callback):
    """What the process's determinism settings are while the run trains."""

    def __init__(self, fail: bool = False):
        self.seen: list[tuple] = []
        self.fail = fail

    def on_update(self, step, metrics):
        self.seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                          os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
        if self.fail:
            raise RuntimeError("the run breaks")


def deterministic_job(deterministic: bool) -> dict:
    return {"model": {"hidden_size": 8}, "data": RECALL, "tbptt": {"k1": 6},
            "train": {"max_steps": 3, "eval_every": 0, "device": "cpu", "deterministic": deterministic}}


@pytest.mark.parametrize("deterministic", [True, False])
def test_deterministic_algorithms_hold_for_the_run_and_no_longer(deterministic, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    flags = Flags()
    fit(deterministic_job(deterministic), [flags])
    workspace = ":4096:8" if deterministic else None
    assert flags.seen == [(deterministic, deterministic, workspace)] * 3
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic


def test_deterministic_settings_come_back_when_the_run_fails(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with pytest.raises(RuntimeError, match="the run breaks"):
        fit(deterministic_job(True), [Flags(fail=True)])
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
