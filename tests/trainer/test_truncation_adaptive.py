"""tbptt.mode: adaptive (Aicher, Foti & Fox 2019): k2 from the measured gradient decay.

The per-lag norms φ_k of one backward pass equal a brute-force computation (one backward
per lag from a fresh leaf); on a linear RNN with spectral radius ρ the fitted decay is ρ
and the chosen k2 is the analytic one; the loop applies it.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.trainer.test_tbptt_gradients import make_streams, make_trainer
from trainer.data import IGNORE, Streams
from trainer.tbptt import detach, map_state
from trainer.truncation import choose_k2, fit_decay, lag_norms, relative_bias

pytestmark = pytest.mark.usefixtures("float64")


def brute_force_phi(model, streams, start: int, end: int, state) -> list[float]:
    """φ_k by definition: for each stream b (its last scored step t_b in the window) and
    lag k, rerun steps t_b − k .. t_b from the state at t_b − k made a leaf, and take the
    norm of ∂ℓ_{t_b}/∂h_{t_b − k} for that stream; mean over the streams that reach lag k."""
    states = {start: detach(state)}
    with torch.no_grad():
        h = states[start]
        for t in range(start, end):
            _, h = model.recur(streams.inputs[t : t + 1], h)
            states[t + 1] = h
    n, per_lag = end - start, {}
    for b in range(streams.batch_size):
        rows = streams.scored[start:end, b].nonzero().flatten()
        if len(rows) == 0:
            continue
        t = start + int(rows[-1])
        for k in range(0, t - start + 1):
            leaf = map_state(lambda s: s.clone().requires_grad_(True), states[t - k])
            out, _ = model.recur(streams.inputs[t - k : t + 1], leaf)
            logits = model.head(out[-1])
            loss = F.cross_entropy(logits[b : b + 1], streams.targets[t, b : b + 1], ignore_index=IGNORE, reduction="sum")
            leaves = leaf if isinstance(leaf, tuple) else (leaf,)
            grads = torch.autograd.grad(loss, leaves)
            norm = math.sqrt(sum(float(g[:, b].pow(2).sum()) for g in grads))
            per_lag.setdefault(k, []).append(norm)
    return [sum(per_lag[k]) / len(per_lag[k]) if k in per_lag else math.nan for k in range(n)]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_lag_norms_equal_brute_force(cell):
    streams = make_streams(30, 3, seed=3)
    trainer = make_trainer(streams, cell=cell)
    model, runner = trainer.model, trainer.runner
    state = model.initial_state(3, torch.device("cpu"))
    with torch.no_grad():  # a carried state that is not zero
        _, state = model.recur(streams.inputs[:5], state)
    phi = lag_norms(runner, streams.window(5, 15), 5, 5, 15, state)
    expected = brute_force_phi(model, streams, 5, 15, state)
    assert len(phi) == 10
    torch.testing.assert_close(phi, torch.tensor(expected), rtol=1e-9, atol=1e-14, equal_nan=True)
    assert fit_decay(phi) == pytest.approx(fit_decay(torch.tensor(expected)), rel=1e-9)


def test_fit_recovers_a_geometric_decay_and_stops_at_a_cut():
    phi = torch.tensor([3.0 * 0.7**k for k in range(12)])
    assert fit_decay(phi) == pytest.approx(0.7, rel=1e-12)
    phi[6:] = 0.0  # no gradient past a document start: the fit uses lags 1..5
    assert fit_decay(phi) == pytest.approx(0.7, rel=1e-12)
    assert fit_decay(torch.tensor([1.0, 0.5, math.nan])) is None  # one usable lag


def linear_trainer(rho: float, k1: int, delta: float):
    """rnn_relu with W_hh = ρ·I and a large bias: every unit stays active, so the
    recurrence is linear, h_{t+1} = ρ h_t + (input terms), and ∂h_{t+1}/∂h_t = ρ I."""
    base = make_streams(200, 4, seed=2)
    # every step scored: each stream's last step is the window's, so every lag averages
    # the same streams and φ_k = ρ^k φ_0 exactly
    streams = Streams(base.inputs, base.targets.clamp(min=0), torch.ones_like(base.scored), base.starts)
    trainer = make_trainer(streams, cell="rnn_tanh", mode="adaptive", k1=k1, k_min=2, k_max=60, delta=delta, adapt_every=5)
    # one layer: with two, the joint Jacobian [[ρI, 0], [ρW, ρI]] is not normal and its
    # powers decay as k·ρ^k, not ρ^k
    trainer.model.rnn = torch.nn.RNN(4, 6, 1, nonlinearity="relu")
    trainer.model.rnn.double()
    trainer.model.num_layers = 1
    with torch.no_grad():
        trainer.model.rnn.weight_hh_l0.copy_(rho * torch.eye(6))
        trainer.model.rnn.bias_hh_l0.fill_(50.0)
    trainer.model.rnn.requires_grad_(False)  # training moves the head only: ρ stays, and
    trainer.model.encoder.requires_grad_(False)  # every unit active
    trainer.cursor.kept = trainer.model.initial_state(4, torch.device("cpu"))
    trainer.params = list(trainer.model.parameters())
    trainer.optimizer = torch.optim.SGD(trainer.params, lr=0.5)
    return trainer


def analytic_k2(rho: float, k1: int, delta: float, k_min: int = 2) -> int:
    """The smallest k2 >= k_min whose dropped share, averaged over the loss steps j < k1
    (each reaching k2 − j back), Σ_j ρ^(k2−j) / k1 = ρ^(k2−k1+1) (1 − ρ^k1) / (k1 (1 − ρ)),
    is at most delta (k2 >= k1 here)."""
    k2 = k_min
    while rho ** (k2 - k1 + 1) * (1 - rho**k1) / (k1 * (1 - rho)) > delta:
        k2 += 1
    return k2


@pytest.mark.parametrize("rho,k1,delta", [(0.8, 1, 0.05), (0.8, 4, 0.05), (0.6, 3, 0.01), (0.9, 2, 0.2)])
def test_linear_rnn_gets_the_analytic_k2(rho, k1, delta):
    trainer = linear_trainer(rho, k1, delta)
    metrics = trainer.update()
    assert metrics["train/decay_rate"] == pytest.approx(rho, rel=1e-9)
    assert metrics["train/k2"] == analytic_k2(rho, k1, delta)
    assert metrics["train/bias"] <= delta < relative_bias(rho, k1, int(metrics["train/k2"]) - 1)
    if k1 == 1:
        assert metrics["train/k2"] == math.ceil(math.log(delta) / math.log(rho))


def test_choose_k2_keeps_to_its_range():
    assert choose_k2(0.99, 4, 2, 10, 0.01) == (10, relative_bias(0.99, 4, 10))  # cannot reach delta
    assert choose_k2(0.01, 4, 3, 10, 0.5)[0] == 3  # k_min even when fewer would do
    assert choose_k2(1.5, 4, 2, 10, 0.1) == (10, 1.0)  # growing gradients: k_max


def test_the_loop_measures_every_adapt_every_updates_and_applies_k2():
    trainer = linear_trainer(0.8, 4, 0.05)
    seen = [trainer.update() for _ in range(12)]
    assert [m["train/k2"] for m in seen] == [analytic_k2(0.8, 4, 0.05)] * 12
    # the graph of a later update reaches k2 back (after the carried state caught up)
    plan = trainer.plan().segments
    assert plan.end - plan.graph == analytic_k2(0.8, 4, 0.05)
    assert 0 < seen[-1]["train/adapt_cost"] < 1
    # a new decay is picked up at the next measurement (update 10, 15, ...)
    with torch.no_grad():
        trainer.model.rnn.weight_hh_l0.copy_(0.5 * torch.eye(6))
    seen = [trainer.update() for _ in range(5)]  # updates 13 .. 17: 16 measures again
    assert [m["train/k2"] for m in seen] == [analytic_k2(0.8, 4, 0.05)] * 3 + [analytic_k2(0.5, 4, 0.05)] * 2
    assert seen[-1]["train/decay_rate"] == pytest.approx(0.5, rel=1e-9)


def test_config_rules():
    from trainer.config import ConfigError, parse_config

    base = {"data": {"kind": "recall"}}
    config = parse_config({**base, "tbptt": {"mode": "adaptive", "k1": 8}}).tbptt
    assert (config.k_min, config.k_max) == (1, 32)
    with pytest.raises(ConfigError, match="tbptt.k2"):
        parse_config({**base, "tbptt": {"mode": "adaptive", "k2": 16}})
    with pytest.raises(ConfigError, match="tbptt.k_max"):
        parse_config({**base, "tbptt": {"mode": "adaptive", "k_min": 8, "k_max": 4}})
    with pytest.raises(ConfigError, match="tbptt.delta"):
        parse_config({**base, "tbptt": {"mode": "adaptive", "delta": 1.0}})
    with pytest.raises(ConfigError, match="tbptt.adapt_every"):
        parse_config({**base, "tbptt": {"mode": "adaptive", "adapt_every": 0}})
