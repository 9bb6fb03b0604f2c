"""tbptt.mode: unbiased (ARTBP, Tallec & Ollivier 2017): the expected gradient is full BPTT's.

In float64 on a tiny RNN with fixed parameters: the expectation over every truncation
pattern (enumerated with its probability) equals the full-BPTT gradient of the summed loss
to rounding; a Monte Carlo mean of drawn patterns approaches it as 1/sqrt(draws), while
plain TBPTT at the mean length keeps its bias; and the engine's update uses exactly the
drawn window, its compensation and the constant normaliser.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from trainer.config import parse_config
from trainer.data import Streams
from trainer.tbptt import Runner, detach, plan_update
from trainer.truncation import Unbiased, compensation, survival

from tests.trainer.test_tbptt_gradients import VOCAB, make_streams, make_trainer

pytestmark = pytest.mark.usefixtures("float64")


def tbptt(**fields):
    return parse_config({"data": {"kind": "recall", "vocab": VOCAB}, "tbptt": {"mode": "unbiased", **fields}}).tbptt


def grads(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def full_gradient(model, streams: Streams) -> torch.Tensor:
    """∇ of the summed loss over the whole stream (one graph from the zero state)."""
    runner = Runner(model)
    model.zero_grad(set_to_none=True)
    plan = plan_update(0, 0, streams.length, streams.length, streams.length)
    loss, _ = runner.loss(streams.window(0, streams.length), 0, plan, model.initial_state(streams.batch_size, torch.device("cpu")))
    loss.backward()
    return grads(model)


def epoch_gradient(model, streams: Streams, lengths: list[int], tb=None) -> torch.Tensor:
    """Σ over the windows of one pass of ∇(summed loss), windows of the given lengths from
    the zero state, with ARTBP's compensation when `tb` is given (plain TBPTT otherwise)."""
    runner, T = Runner(model), streams.length
    model.zero_grad(set_to_none=True)
    state, p = model.initial_state(streams.batch_size, torch.device("cpu")), 0
    for length in lengths:
        end = min(p + length, T)
        plan = plan_update(p, p, end - p, end - p, T)
        scales = compensation(tb, p, end) if tb is not None else None
        loss, kept = runner.loss(streams.window(p, end), p, plan, detach(state), scales)
        loss.backward()
        state, p = kept, end
    assert p == T
    return grads(model)


def patterns(tb, T: int, p: int = 0):
    """Every sequence of window lengths over (p, T] with its probability under ARTBP's law:
    P(J = j) = S(j − 1) − S(j); the window the stream's end cuts has P(J >= j) = S(j − 1)."""
    if p >= T:
        yield [], 1.0
        return
    S, m = survival(tb), tb.k_min
    j = 1
    while True:
        end = p + j * m
        prob = S(j - 1) if end >= T else S(j - 1) - S(j)
        for rest, q in patterns(tb, T, min(end, T)):
            yield [min(end, T) - p, *rest], prob * q
        if end >= T:
            return
        j += 1


@pytest.mark.parametrize(
    "cell,fields",
    [
        ("rnn_tanh", {"k1": 3}),
        ("rnn_tanh", {"k1": 2, "truncation_schedule": "power"}),
        ("rnn_tanh", {"k1": 4, "k_min": 2}),
        ("lstm", {"k1": 5, "truncation_schedule": "power", "truncation_power": 3.0}),
    ],
    ids=["geometric", "power", "every-2-steps", "lstm-power-3"],
)
def test_expectation_over_every_truncation_pattern_is_full_bptt(cell, fields):
    streams = make_streams(6, 2, seed=4)  # 2^5 patterns at k_min = 1
    model = make_trainer(streams, cell=cell).model
    tb = tbptt(**fields)
    full = full_gradient(model, streams)
    expected, total = torch.zeros_like(full), 0.0
    for lengths, prob in patterns(tb, streams.length):
        expected += prob * epoch_gradient(model, streams, lengths, tb)
        total += prob
    assert total == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(expected, full, rtol=1e-9, atol=1e-12)
    # without the compensation the same windows are biased: the test can tell
    plain = sum(prob * epoch_gradient(model, streams, lengths) for lengths, prob in patterns(tb, streams.length))
    assert (plain - full).norm() > 1e-3 * full.norm()


def test_monte_carlo_mean_converges_while_truncation_stays_biased():
    streams = make_streams(8, 2, seed=1)
    model = make_trainer(streams, cell="rnn_tanh").model
    tb = tbptt(k1=3)
    full = full_gradient(model, streams)
    policy = Unbiased(tb, torch.Generator().manual_seed(0), streams.batch_size)

    def draw_epoch() -> torch.Tensor:
        lengths, p = [], 0
        while p < streams.length:
            length = policy.choose(p, streams.length).k1
            lengths.append(length)
            p += length
        return epoch_gradient(model, streams, lengths, tb)

    draws = torch.stack([draw_epoch() for _ in range(128)])
    scale = full.norm() ** 2

    def mse(n: int) -> float:  # squared error of the mean of n draws, over 128/n disjoint blocks
        means = draws.view(128 // n, n, -1).mean(dim=1)
        return (((means - full) ** 2).sum(dim=1).mean() / scale).item()

    # unbiased: the squared error of a mean of n draws is tr(Cov)/n, i.e. the error ~ 1/sqrt(n)
    per_draw = [mse(n) * n for n in (1, 4, 16)]
    assert max(per_draw) < 2 * min(per_draw)
    assert mse(128) < mse(1) / 30
    # TBPTT(3), the same mean length: its error is its bias, whatever the number of updates
    truncated = ((epoch_gradient(model, streams, [3, 3, 2]) - full).norm() ** 2 / scale).item()
    assert truncated > 20 * mse(128)


def test_engine_update_uses_the_drawn_window_and_its_compensation():
    streams = make_streams(40, 3, seed=6)
    trainer = make_trainer(streams, cell="gru", mode="unbiased", k1=5, k_min=1)
    model = copy.deepcopy(trainer.model)
    tb = trainer.config.tbptt
    metrics = trainer.update()
    length = int(metrics["train/truncation_length"])
    scales = compensation(tb, 0, length)
    assert metrics["train/reweight_max"] == pytest.approx(math.prod(scales.values()))
    assert metrics["train/reweight_max"] == pytest.approx((1 - 1 / 5) ** -(length - 1))
    model.zero_grad(set_to_none=True)
    plan = plan_update(0, 0, length, length, streams.length)
    loss, _ = Runner(model).loss(streams.window(0, length), 0, plan, model.initial_state(3, torch.device("cpu")), scales)
    (loss / (3 * 5)).backward()  # the summed loss over batch_size · k1, not the scored count
    torch.testing.assert_close(grads(trainer.model), grads(model), rtol=1e-9, atol=1e-12)
    # the draws continue: lengths vary, and the next window starts where this one ended
    lengths = {length} | {int(trainer.update()["train/truncation_length"]) for _ in range(12)}
    assert len(lengths) > 2


def test_activation_checkpointing_and_resets_keep_the_update():
    streams = make_streams(40, 3, seed=8, doc_prob=0.1)
    plain = make_trainer(streams, mode="unbiased", k1=6, reset_on="document")
    chunked = make_trainer(streams, mode="unbiased", k1=6, reset_on="document", checkpoint_every=2)
    for _ in range(6):
        assert plain.update()["train/truncation_length"] == chunked.update()["train/truncation_length"]
        torch.testing.assert_close(grads(chunked.model), grads(plain.model), rtol=1e-9, atol=1e-12)


def test_config_rules():
    from trainer.config import ConfigError

    base = {"data": {"kind": "recall"}}
    with pytest.raises(ConfigError, match="tbptt.k2"):
        parse_config({**base, "tbptt": {"mode": "unbiased", "k1": 8, "k2": 16}})
    with pytest.raises(ConfigError, match="tbptt.k1"):
        parse_config({**base, "tbptt": {"mode": "unbiased", "k1": 2, "k_min": 4}})
    with pytest.raises(ConfigError, match="tbptt.randomize"):
        parse_config({**base, "tbptt": {"mode": "unbiased", "randomize": True}})
    with pytest.raises(ConfigError, match="tbptt.truncation_power"):
        parse_config({**base, "tbptt": {"mode": "unbiased", "truncation_power": 1.0}})
    assert parse_config({**base, "tbptt": {"mode": "unbiased", "k1": 8}}).tbptt.k2 == 8
