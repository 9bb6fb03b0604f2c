"""Truncation that chooses itself: `tbptt.mode: unbiased` and `tbptt.mode: adaptive`.

Both keep `trainer.tbptt.plan_update` the one TBPTT rule: they only choose each window's
(k1, k2) and, for `unbiased`, the gradient weights at the surviving truncation points.

unbiased (ARTBP; Tallec & Ollivier, "Unbiasing Truncated Backpropagation Through Time",
2017, §3): each candidate truncation point (every `k_min` steps) truncates with
probability c_j, j counting candidates since the last truncation; an update runs at each
truncation, over the window since the previous one, and the gradient flowing back past a
surviving point is multiplied by 1 / (1 − c_j). The weight a path from a loss back to a
step receives is then 1 / P(no truncation between them), so E[gradient] = full BPTT's.

adaptive (Aicher, Foti & Fox, "Adaptively Truncating Backpropagation Through Time to
Control Gradient Bias", UAI 2019, §3–4): every `adapt_every` updates, one window of
`k_max` steps is backpropagated from the loss of its last scored step to measure
φ_k = E‖∂ℓ_t/∂h_{t−k}‖ by lag k; a geometric decay φ_k ∝ β^k is fitted; the truncation
drops the lags beyond it, a share β^(reach) of the gradient, and k2 is the smallest value
in [k_min, k_max] whose relative bias, averaged over the window's loss steps, is <= delta.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from trainer.config import TBPTTConfig
from trainer.data import IGNORE, Streams, Window
from trainer.models import State
from trainer.tbptt import Runner, loss_sum, map_state

# -- unbiased: ARTBP -----------------------------------------------------------------------


def survival(tb: TBPTTConfig) -> Callable[[int], float]:
    """S(j) = P(no truncation at the first j candidate points after a truncation)."""
    candidates = tb.k1 / tb.k_min  # the mean window, in candidate points
    if tb.truncation_schedule == "geometric":
        c = 1.0 / candidates  # constant c: lengths are geometric with mean k1
        return lambda j: (1.0 - c) ** j
    # power: S(j) = (1 + j/s)^-α, mean Σ_{j>=0} S(j) ≈ 1/2 + s/(α − 1) = k1/k_min.
    alpha = tb.truncation_power
    s = max((alpha - 1.0) * (candidates - 0.5), 1e-6)
    return lambda j: (1.0 + j / s) ** -alpha


def draw_candidates(tb: TBPTTConfig, u: float) -> int:
    """The window's length in candidate points, from a uniform u in [0, 1): the smallest
    j >= 1 with S(j) <= u, so that P(J > j) = S(j) (inverse transform: one draw a window)."""
    if u <= 0.0:
        return 2**62  # S never reaches 0: the stream's end cuts the window
    if tb.truncation_schedule == "geometric":
        c = tb.k_min / tb.k1
        if c >= 1.0:
            return 1
        return max(1, math.ceil(math.log(u) / math.log1p(-c) - 1e-12))
    alpha = tb.truncation_power
    s = max((alpha - 1.0) * (tb.k1 / tb.k_min - 0.5), 1e-6)
    return max(1, math.ceil(s * (u ** (-1.0 / alpha) - 1.0) - 1e-9))


def compensation(tb: TBPTTConfig, start: int, end: int) -> dict[int, float]:
    """The weights 1 / (1 − c_j) = S(j − 1) / S(j) at the surviving candidate points of the
    window (start, end] that starts at a truncation: positions start + j·k_min < end."""
    S = survival(tb)
    return {start + j * tb.k_min: S(j - 1) / S(j) for j in range(1, -(-(end - start) // tb.k_min))}


# -- adaptive: the measured gradient decay ---------------------------------------------------


def lag_norms(runner: Runner, window: Window, base: int, start: int, end: int, state: State) -> torch.Tensor:
    """φ_k, k = 0 .. end − start − 1: the mean over streams of ‖∂ℓ_{t_b}/∂h_{t_b − k}‖, where
    t_b is stream b's last scored step in (start, end] and h_p the state at position p (all
    layers, and an LSTM's cells, as one vector). Streams reach only lags inside the window;
    a lag no stream reaches is NaN. One backward pass; the window runs step by step (a
    measurement, not training: each step is one `Runner.segment`)."""
    return lag_mean(lag_norm_sums(runner, window, base, start, end, state))


def lag_mean(sums: torch.Tensor) -> torch.Tensor:
    """φ from `lag_norm_sums` (of one process, or summed over data-parallel ranks)."""
    total, counts = sums
    return torch.where(counts > 0, total / counts.clamp(min=1), torch.full_like(total, math.nan))


def lag_norm_sums(runner: Runner, window: Window, base: int, start: int, end: int, state: State) -> torch.Tensor:
    """(2, n) float64 on the CPU: per lag, the sum over streams of the norms `lag_norms`
    averages, and how many streams reach that lag. Sums add across data-parallel ranks, so
    N ranks measure exactly what one process with all the streams does."""
    n = end - start
    scored = window.scored[start - base : end - base]  # (n, B)
    has = scored.any(dim=0)
    last = torch.where(has, n - 1 - scored.flip(0).int().argmax(dim=0), torch.full_like(has, -1, dtype=torch.long))
    states, losses = [], []
    with torch.enable_grad(), runner.autocast():
        state = map_state(lambda s: s.detach().requires_grad_(True), state)
        for row in range(n):
            states.append(state)
            seg = runner.segment(window, base, start + row, start + row + 1, start + row, state)
            state = seg.state
            pick = (last == row).view(1, -1)
            if bool(pick.any()):
                targets = seg.targets.masked_fill(~pick, IGNORE) if seg.targets.dtype == torch.long else seg.targets
                losses.append(loss_sum(seg.pred, targets, seg.scored & pick))
    if not losses:
        return torch.zeros((2, n), dtype=torch.float64, device="cpu")
    flat = [s for st in states for s in (st if isinstance(st, tuple) else (st,))]
    grads = torch.autograd.grad(torch.stack(losses).sum(), flat, allow_unused=True)
    per_state = len(flat) // n
    squares = torch.stack([  # (n, B): the squared norm of ∂ℓ/∂h at each position, per stream
        sum((g if g is not None else torch.zeros_like(s)).double().pow(2).sum(dim=(0, 2)) for g, s in zip(grads[i * per_state : (i + 1) * per_state], flat[i * per_state : (i + 1) * per_state]))
        for i in range(n)
    ])
    # the state at row r is h_r (before step r); step t's loss reaches it at lag t − r.
    lags = torch.arange(n, device=last.device).view(-1, 1)
    rows = last.view(1, -1) - lags  # (lag, B)
    valid = (rows >= 0) & has.view(1, -1)
    norms = squares.sqrt().to(last.device).gather(0, rows.clamp(min=0))
    return torch.stack([(norms * valid).sum(dim=1).double(), valid.sum(dim=1).double()]).cpu()


def measure_ahead(
    runner: Runner, streams: Streams, device: torch.device, kept_position: int, kept: State, start: int, end: int,
    total: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """`lag_norms` over the steps (start, end] ahead of the streams' cursor, from the carried
    state (kept at kept_position <= start), in eval mode: no dropout, so no random numbers
    are drawn and the trajectory changes only through the k2 chosen. None under 3 steps.
    `total` sums the per-lag sums over data-parallel ranks (each measures its own streams)."""
    if end - start < 3:
        return None
    window = streams.window(kept_position, end).to(device)
    model = runner.model
    was_training = model.training
    model.eval()
    try:
        state = runner.advance(window, kept_position, kept_position, start, kept)
        sums = lag_norm_sums(runner, window, kept_position, start, end, state)
        return lag_mean(total(sums) if total is not None else sums)
    finally:
        model.train(was_training)


def fit_decay(phi: torch.Tensor) -> float | None:
    """β of φ_k ≈ φ_1 β^(k − 1): least squares on log φ_k over k >= 1, up to the first lag
    not measured or with no gradient (a document start, or underflow). None when fewer than
    two lags are usable."""
    ks, logs = [], []
    for k in range(1, len(phi)):
        value = float(phi[k])
        if not (math.isfinite(value) and value > 0.0):
            break
        ks.append(float(k))
        logs.append(math.log(value))
    if len(ks) < 2:
        return None
    mean_k, mean_l = sum(ks) / len(ks), sum(logs) / len(logs)
    slope = sum((k - mean_k) * (l - mean_l) for k, l in zip(ks, logs)) / sum((k - mean_k) ** 2 for k in ks)
    return math.exp(slope)


def relative_bias(beta: float, k1: int, k2: int) -> float:
    """The gradient share TBPTT(k1, k2) drops under φ_k ∝ β^k: the loss step j before the
    boundary (j < min(k1, k2)) reaches k2 − j steps back, dropping Σ_{k>=k2−j} φ_k / Σ_k φ_k
    = β^(k2 − j); averaged over the window's loss steps. 1 when β >= 1 (no decay)."""
    if beta >= 1.0:
        return 1.0
    steps = min(k1, k2)
    # the geometric sum β^(k2-m+1) + ... + β^k2 in closed form: O(1), not O(k1)
    return beta ** (k2 - steps + 1) * (1.0 - beta**steps) / ((1.0 - beta) * steps)


def choose_k2(beta: float, k1: int, k_min: int, k_max: int, delta: float) -> tuple[int, float]:
    """The smallest k2 in [k_min, k_max] with relative_bias <= delta (k_max if none).
    relative_bias does not increase with k2, so a bisection finds it in O(log(k_max))."""
    if relative_bias(beta, k1, k_max) > delta:
        return k_max, relative_bias(beta, k1, k_max)
    low, high = k_min, k_max  # the answer lies in [low, high]
    while low < high:
        middle = (low + high) // 2
        if relative_bias(beta, k1, middle) <= delta:
            high = middle
        else:
            low = middle + 1
    return low, relative_bias(beta, k1, low)


# -- the policies the loop calls ---------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """One window's truncation: its k1, k2, learning-rate scale, what the summed loss is
    divided by (None: the window's scored pairs), the gradient weights at positions inside
    it, and what to report."""

    k1: int
    k2: int
    lr_scale: float = 1.0
    loss_denominator: float | None = None
    grad_scales: dict[int, float] | None = None
    metrics: dict[str, float] | None = None


class Unbiased:
    """ARTBP windows: a length drawn at each truncation (from the trainer's window
    generator, which checkpoints hold), weights at the surviving points, and the summed
    loss divided by a constant, batch_size · k1 (the pairs of a mean window), not by the
    window's own scored pairs: that would weight the steps of short or sparse windows
    more, and the expected update would no longer be the full gradient's direction."""

    def __init__(self, tb: TBPTTConfig, rng: torch.Generator, batch_size: int):
        self.tb, self.rng, self.denominator = tb, rng, float(batch_size * tb.k1)

    def choose(self, position: int, length: int) -> Choice:
        tb = self.tb
        u = torch.rand((), generator=self.rng, dtype=torch.float64, device="cpu").item()
        window = min(draw_candidates(tb, u) * tb.k_min, length - position)
        scales = compensation(tb, position, position + window)
        weight = math.prod(scales.values())  # the largest: a path across every surviving point
        metrics = {"train/truncation_length": float(window), "train/reweight_max": weight}
        return Choice(window, window, loss_denominator=self.denominator, grad_scales=scales, metrics=metrics)

    def state_dict(self) -> dict[str, Any]:
        return {}  # the draws come from the trainer's window generator

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


MeasureFn = Callable[[int, int], torch.Tensor | None]  # (start, end) -> φ, or None


class Adaptive:
    """k2 chosen from the measured decay, every adapt_every updates (the first before
    update 1); k1 stays as configured. The measurement looks ahead over the next k_max
    steps from the carried state, in eval mode (no dropout: it draws no random numbers), and
    changes nothing but k2."""

    def __init__(self, tb: TBPTTConfig):
        self.tb = tb
        self.k2 = tb.k_min
        self.beta: float | None = None
        self.bias: float | None = None
        self.measure_seconds = 0.0

    def choose(self, step: int, measure: MeasureFn, position: int, length: int, train_seconds: float) -> Choice:
        """The next window's k2; `train_seconds`: the updates' time so far (measurements
        included, as they run inside updates), for `train/adapt_cost`."""
        tb, now = self.tb, 0.0
        if step % tb.adapt_every == 0:
            started = time.perf_counter()
            phi = measure(position, min(position + tb.k_max, length))
            beta = fit_decay(phi) if phi is not None else None
            if beta is not None:
                self.beta = beta
                self.k2, self.bias = choose_k2(beta, tb.k1, tb.k_min, tb.k_max, tb.delta)
            now = time.perf_counter() - started
            self.measure_seconds += now
        metrics = {"train/k2": float(self.k2)}
        if self.beta is not None:
            metrics["train/decay_rate"] = self.beta
            metrics["train/bias"] = self.bias
        spent = train_seconds + now
        metrics["train/adapt_cost"] = self.measure_seconds / spent if spent > 0 else 0.0
        return Choice(tb.k1, self.k2, metrics=metrics)

    def state_dict(self) -> dict[str, Any]:
        return {"k2": self.k2, "beta": self.beta, "bias": self.bias, "measure_seconds": self.measure_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.k2, self.beta, self.bias = state["k2"], state["beta"], state["bias"]
        self.measure_seconds = state["measure_seconds"]


def policy_for(tb: TBPTTConfig, rng: torch.Generator, batch_size: int) -> Unbiased | Adaptive | None:
    """The policy of tbptt.mode adaptive or unbiased; None for truncated and full.
    `batch_size`: the streams of every rank together."""
    if tb.mode == "unbiased":
        return Unbiased(tb, rng, batch_size)
    if tb.mode == "adaptive":
        return Adaptive(tb)
    return None

