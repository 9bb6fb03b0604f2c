"""The trainer on a GPU (issue 18): every clip mode and non-finite policy, fp16 with its
GradScaler and bf16, the per-update gradient reference in float64, exact resume with
`train.deterministic`, activation checkpointing, and the fused cuDNN call per segment with
per-document resets. Marked `cuda`: skipped with a reason where no GPU is visible."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tests.gpu.common import DEVICE, ON_CUDA, make_trainer, trainer_on
from tests.trainer.test_device_factories import (
    CLIPS,
    PRECISIONS,
    DeviceNamed,
    poison_gradients,
    poison_loss,
)
from tests.trainer.test_resume import Recorder, StopAt, final_params
from tests.trainer.test_resume import config as resume_config
from tests.trainer.test_tbptt_gradients import (
    VOCAB,
    Reference,
    assert_same,
    make_streams,
)
from trainer import checkpoint as ckpt
from trainer.data import Data, Streams, Task
from trainer.loop import NonFiniteError, fit

pytestmark = pytest.mark.cuda


def on_device(trainer) -> None:
    assert next(trainer.model.parameters()).device.type == DEVICE.type


# -- clipping and non-finite values ------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("clip", list(CLIPS))
def test_every_clip_mode_updates_on_the_gpu(clip, precision):
    trainer = make_trainer(clip=CLIPS[clip], train={"precision": precision})
    on_device(trainer)
    with DeviceNamed():
        metrics = [trainer.update() for _ in range(3)]
    assert all(m["train/grad_norm"] is not None and m["train/skipped"] == 0.0 for m in metrics)
    if clip in ("norm", "per_parameter", "value", "agc"):  # thresholds small enough to act
        assert all(m["train/clipped"] == 1.0 for m in metrics)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("poison", [poison_gradients, poison_loss], ids=["nan_gradients", "nan_loss"])
def test_skip_policy_leaves_parameters_and_optimizer_alone(poison, clip, precision):
    trainer = make_trainer(clip={**CLIPS[clip], "on_nonfinite": "skip"}, train={"precision": precision})
    trainer.update()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    poison(trainer)
    with DeviceNamed():
        metrics = trainer.update()
    assert metrics["train/skipped"] == 1.0 and metrics["train/grad_norm"] is None
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    kept = trainer.cursor.kept
    assert all(torch.isfinite(s).all() for s in (kept if isinstance(kept, tuple) else (kept,)))


@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("poison", [poison_gradients, poison_loss], ids=["nan_gradients", "nan_loss"])
def test_fail_policy_names_the_step(poison, clip):
    trainer = make_trainer(clip={**CLIPS[clip], "on_nonfinite": "fail"})
    trainer.update()
    poison(trainer)
    with DeviceNamed(), pytest.raises(NonFiniteError, match="step 2"):
        trainer.update()


# -- mixed precision ---------------------------------------------------------------------


def test_fp16_clips_unscaled_gradients_and_recovers_from_overflow():
    fp32 = make_trainer(clip={"mode": "norm", "max_norm": 1e-3})
    fp16 = make_trainer(clip={"mode": "norm", "max_norm": 1e-3, "on_nonfinite": "fail"}, train={"precision": "fp16"})
    assert fp16.scaler.is_enabled()
    m32, m16 = fp32.update(), fp16.update()
    # clipping saw unscaled gradients: the pre-clip norms agree, the clipped one is the bound
    assert m16["train/grad_norm"] == pytest.approx(m32["train/grad_norm"], rel=0.05)
    assert m16["train/grad_norm_clipped"] == pytest.approx(1e-3, rel=1e-2)
    # an overflow of the scaled gradients is the scaler's business (lower the scale), not a
    # non-finite failure, even with on_nonfinite: fail
    fp16.scaler.update(new_scale=2.0**40)  # scaled gradients overflow fp16 (max 65504)
    with DeviceNamed():
        overflow = fp16.update()
    assert overflow["train/skipped"] == 1.0 and fp16.scaler.get_scale() == 2.0**39
    after = [fp16.update() for _ in range(60)]  # each overflow halves the scale
    assert any(m["train/skipped"] == 0.0 and math.isfinite(m["train/loss"]) for m in after)


def test_bf16_follows_fp32():
    fp32, bf16 = make_trainer(), make_trainer(train={"precision": "bf16"})
    assert not bf16.scaler.is_enabled()  # bf16 has fp32's range: no scaler
    m32, m16 = fp32.update(), bf16.update()
    assert m16["train/loss"] == pytest.approx(m32["train/loss"], rel=0.02)
    assert m16["train/grad_norm"] == pytest.approx(m32["train/grad_norm"], rel=0.1)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # master weights stay fp32
    losses = [bf16.update()["train/loss"] for _ in range(30)]
    assert all(math.isfinite(x) for x in losses)


# -- gradients against the per-step reference (float64) ----------------------------------


class DeviceReference(Reference):
    """tests/trainer/test_tbptt_gradients.py's reference, on DEVICE."""

    def __init__(self, model, streams: Streams, k1: int, k2: int, reset: bool = False):
        moved = Streams(*(t.to(DEVICE) for t in (streams.inputs, streams.targets, streams.scored, streams.starts)))
        super().__init__(model, moved, k1, k2, reset)
        self.states = {0: model.initial_state(streams.batch_size, DEVICE)}


def reference_trainer(streams: Streams, cell: str = "lstm", **tbptt):
    documents = tbptt.get("reset_on") == "document"
    config = {
        "model": {"cell": cell, "hidden_size": 6, "num_layers": 2, "embedding_dim": 4},
        "data": {"kind": "text", "path": "unused"} if documents else {"kind": "recall", "vocab": VOCAB},
        "tbptt": tbptt,
        "clip": {"mode": "none"},
        "optim": {"name": "sgd", "lr": 0.5},
        "train": {"max_steps": 1000, "device": DEVICE.type, "seed": 3},
        "resources": {"gpus": 1 if ON_CUDA else 0},
    }
    task = Task(vocab=VOCAB, features=None, classes=VOCAB, metric="accuracy")
    return trainer_on(config, Data(task, streams, streams))


def engine_grads(trainer) -> list[torch.Tensor]:
    trainer.update()
    return [p.grad.clone() for p in trainer.model.parameters()]


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("k1,k2,length", [(4, 4, 24), (3, 7, 24), (6, 2, 24), (5, 8, 23)])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_updates_match_the_per_step_reference(cell, k1, k2, length):
    streams = make_streams(length, 3, seed=k1 * 10 + k2)
    trainer = reference_trainer(streams, cell=cell, k1=k1, k2=k2)
    reference = DeviceReference(copy.deepcopy(trainer.model), streams, k1, k2)
    for n in range(2 * -(-length // k1) + 1):  # two epochs and a bit
        assert_same(engine_grads(trainer), reference.update(), f"update {n + 1}")


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("k1,k2,every", [(8, 8, 3), (4, 10, 2), (10, 4, 3)])
def test_activation_checkpointing_changes_nothing(k1, k2, every):
    streams = make_streams(24, 3, seed=2, doc_prob=0.1)
    plain = reference_trainer(streams, k1=k1, k2=k2, reset_on="document")
    chunked = reference_trainer(streams, k1=k1, k2=k2, reset_on="document", checkpoint_every=every)
    for n in range(8):
        assert_same(engine_grads(chunked), engine_grads(plain), f"update {n + 1}")


# -- the fused cuDNN path with per-document resets ---------------------------------------


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("k1,k2", [(4, 4), (3, 8), (8, 3)])
def test_document_resets_match_the_reference(k1, k2):
    streams = make_streams(24, 4, seed=7, doc_prob=0.15)
    trainer = reference_trainer(streams, k1=k1, k2=k2, reset_on="document")
    reference = DeviceReference(copy.deepcopy(trainer.model), streams, k1, k2, reset=True)
    for n in range(10):
        assert_same(engine_grads(trainer), reference.update(), f"update {n + 1}")


def test_one_fused_call_per_segment_between_document_starts():
    """A window runs as one recurrent call per segment (cut only where a document starts),
    on CUDA the cuDNN kernel: float32, where cuDNN takes the LSTM."""
    streams = make_streams(64, 4, seed=5, doc_prob=0.05)
    trainer = reference_trainer(streams, k1=32, k2=32, reset_on="document")
    plan = trainer.plan()
    segments = len(trainer.runner.cuts(plan.window, plan.segments.graph, plan.segments.end, plan.segments.kept, (plan.segments.keep,))) - 1
    assert segments > 1  # the window holds document starts
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        trainer.step(plan)
    calls = {event.key: event.count for event in prof.key_averages()}
    assert calls.get("aten::lstm") == segments
    if ON_CUDA:
        assert torch.backends.cudnn.enabled and calls.get("aten::_cudnn_rnn") == segments


# -- exact resume with train.deterministic -----------------------------------------------


def deterministic_config(steps: int, model: dict) -> dict:
    config = resume_config(steps, k2=12)
    config["model"].update(model)
    config["train"].update({"device": DEVICE.type, "deterministic": True})
    config["resources"] = {"gpus": 1 if ON_CUDA else 0}
    return config


@pytest.mark.parametrize(
    "model",
    [
        # dropout of nn.Dropout draws from torch's CUDA generator, which checkpoints hold
        {"num_layers": 1, "dropout": 0.2},
        # a cuDNN stack of two layers; no dropout between them: cuDNN keeps the state of that
        # dropout to itself, and no checkpoint can hold it (docs/benchmarks.md, On a GPU)
        {"num_layers": 2, "dropout": 0.0},
    ],
    ids=["dropout", "two-layer-stack"],
)
def test_resume_is_bit_exact_with_deterministic_algorithms(model):
    whole = Recorder()
    fit(deterministic_config(60, model), [whole])
    first = Recorder()
    fit(deterministic_config(60, model), [first, StopAt(30)])
    resumed = Recorder()
    fit(deterministic_config(60, model), [resumed], resume=ckpt.from_bytes(first.checkpoints[30]))
    assert min(resumed.losses) == 31
    assert {**first.losses, **resumed.losses} == whole.losses  # exact, every step
    a, b = final_params(whole.checkpoints[60]), final_params(resumed.checkpoints[60])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.are_deterministic_algorithms_enabled()  # the process's setting came back
