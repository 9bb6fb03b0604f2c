"""Each clipping mode against its formula, fp16 clipping on unscaled gradients, and the
non-finite policy (skip leaves everything untouched; fail names the step)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from trainer.clipping import Clipper
from trainer.config import ClipConfig
from trainer.config import parse_config
from trainer.loop import NonFiniteError, Trainer
from trainer.data import load_data


def params_with_grads(seed: int = 0, scale: float = 1.0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 4), (6,), (3, 6), (3,)]
    params = [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale
    return params


def grads(params) -> list[torch.Tensor]:
    return [p.grad.clone() for p in params]


def norm_of(tensors, norm_type=2.0) -> float:
    flat = np.concatenate([t.flatten().numpy() for t in tensors])
    if math.isinf(norm_type):
        return float(np.abs(flat).max())
    return float((np.abs(flat) ** norm_type).sum() ** (1 / norm_type))


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_norm_clipping(norm_type, max_norm):
    params = params_with_grads()
    before = grads(params)
    total = norm_of(before, norm_type)
    result = Clipper(ClipConfig(mode="norm", max_norm=max_norm, norm_type=norm_type)).clip(params)
    coef = min(1.0, max_norm / (total + 1e-6))
    for g0, p in zip(before, params):
        torch.testing.assert_close(p.grad, g0 * coef)
    assert result.norm.item() == pytest.approx(total)
    assert result.clipped_norm.item() == pytest.approx(norm_of(grads(params), norm_type))
    assert bool(result.clipped) == (coef < 1.0)


def test_per_parameter_norm_clipping():
    params = params_with_grads(scale=3.0)
    before = grads(params)
    result = Clipper(ClipConfig(mode="norm", max_norm=1.0, per_parameter=True)).clip(params)
    for g0, p in zip(before, params):
        n = g0.norm().item()
        torch.testing.assert_close(p.grad, g0 * min(1.0, 1.0 / (n + 1e-6)))
    assert result.norm.item() == pytest.approx(norm_of(before))
    assert result.clipped_norm.item() == pytest.approx(norm_of(grads(params)))
    assert bool(result.clipped)


def test_value_clipping():
    params = params_with_grads()
    before = grads(params)
    result = Clipper(ClipConfig(mode="value", value=0.3)).clip(params)
    for g0, p in zip(before, params):
        torch.testing.assert_close(p.grad, g0.clamp(-0.3, 0.3))
    assert bool(result.clipped)
    assert result.clipped_norm.item() == pytest.approx(norm_of(grads(params)))


def test_agc_unitwise():
    params = params_with_grads(scale=0.5)
    before = grads(params)
    Clipper(ClipConfig(mode="agc", agc_factor=0.05, agc_eps=1e-3)).clip(params)
    for g0, p in zip(before, params):
        w = p.detach().numpy()
        g = g0.numpy()
        rows_w = w.reshape(w.shape[0], -1) if w.ndim > 1 else w.reshape(1, -1)
        rows_g = g.reshape(g.shape[0], -1) if g.ndim > 1 else g.reshape(1, -1)
        expected = []
        for rw, rg in zip(rows_w, rows_g):
            limit = max(np.linalg.norm(rw), 1e-3) * 0.05
            gn = np.linalg.norm(rg)
            expected.append(rg if gn < limit else rg * limit / max(gn, 1e-6))
        np.testing.assert_allclose(p.grad.numpy(), np.array(expected).reshape(g.shape), rtol=1e-12)


def test_autoclip_uses_percentile_of_history():
    clipper = Clipper(ClipConfig(mode="autoclip", percentile=25, history=5))
    seen = []
    for i, scale in enumerate([1.0, 2.0, 0.5, 4.0, 3.0, 0.25, 8.0]):
        params = params_with_grads(seed=i, scale=scale)
        before = grads(params)
        total = norm_of(before)
        seen.append(total)
        threshold = np.percentile(seen[-5:], 25)
        result = clipper.clip(params)
        coef = min(1.0, threshold / (total + 1e-6))
        for g0, p in zip(before, params):
            torch.testing.assert_close(p.grad, g0 * coef)
        assert bool(result.clipped) == (coef < 1.0)
    assert len(clipper.history) == 5


def test_none_reports_norm_and_leaves_gradients():
    params = params_with_grads(scale=100.0)
    before = grads(params)
    result = Clipper(ClipConfig(mode="none")).clip(params)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, params))
    assert result.norm.item() == pytest.approx(norm_of(before)) == pytest.approx(result.clipped_norm.item())
    assert not bool(result.clipped)


# -- through the trainer -------------------------------------------------------------


def make_trainer(**overrides) -> Trainer:
    raw = {
        "model": {"hidden_size": 16},
        "data": {"kind": "recall", "vocab": 4, "lag": 2, "length": 2000, "batch_size": 4},
        "tbptt": {"k1": 8},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"max_steps": 100, "device": "cpu"},
    }
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    config = parse_config(raw)
    return Trainer(config, load_data(config.data, config.train.seed), torch.device("cpu"))


def test_fp16_clips_unscaled_gradients():
    fp32 = make_trainer(clip={"mode": "norm", "max_norm": 1e-3})
    fp16 = make_trainer(clip={"mode": "norm", "max_norm": 1e-3}, train={"precision": "fp16"})
    assert fp16.scaler.is_enabled() and fp16.scaler.get_scale() >= 1024
    m32, m16 = fp32.update(), fp16.update()
    # Pre-clip norms agree (the scaled gradients would be `scale` times larger) and the
    # clipped gradients are at the threshold, so clipping saw unscaled values.
    assert m16["train/grad_norm"] == pytest.approx(m32["train/grad_norm"], rel=0.05)
    assert m16["train/clipped"] == 1.0
    assert m16["train/grad_norm_clipped"] == pytest.approx(1e-3, rel=1e-3)


def test_nonfinite_gradient_is_skipped_without_touching_state():
    trainer = make_trainer(clip={"mode": "norm", "on_nonfinite": "skip"})
    for _ in range(3):
        trainer.update()
    params_before = [p.detach().clone() for p in trainer.model.parameters()]
    optim_before = copy.deepcopy(trainer.optimizer.state_dict())
    handle = trainer.model.decoder.weight.register_hook(lambda g: torch.full_like(g, math.inf))
    metrics = trainer.update()
    handle.remove()
    assert metrics["train/skipped"] == 1.0
    assert metrics["train/grad_norm"] is None  # non-finite values are reported as null
    assert trainer.counters.skipped == 1 and trainer.counters.step == 4
    for a, b in zip(params_before, trainer.model.parameters()):
        assert torch.equal(a, b)
    after = trainer.optimizer.state_dict()
    for key, state in optim_before["state"].items():
        for name, value in state.items():
            assert torch.equal(value, after["state"][key][name]), name
    assert trainer.update()["train/skipped"] == 0.0  # training goes on


def test_nonfinite_gradient_fails_with_step_number():
    trainer = make_trainer(clip={"mode": "norm", "on_nonfinite": "fail"})
    trainer.update()
    trainer.model.decoder.weight.register_hook(lambda g: torch.full_like(g, math.nan))
    with pytest.raises(NonFiniteError, match="step 2"):
        trainer.update()
