"""Truncated backpropagation through time: which steps an update computes, and how.

The rule (SPEC §1), written once, in `plan_update`. Positions count steps consumed: the
state "at position t" is the state after steps 0..t-1 (tensor rows are 0-based steps).
An update covers the window (p, τ] with τ = min(p + k1, length):

- the graph starts at g = max(τ − k2, kept), from the kept carried state taken as a
  constant. `kept` is the position of the state kept by the previous update: p when
  k2 <= k1, p − (k2 − k1) when k2 > k1 (so g = τ − k2 except where the stream starts, or
  at the stream's short last window, where the graph reaches back to the kept state);
- the loss is taken on steps (max(p, τ − k2), τ] = (τ − min(k1, k2), τ];
- steps kept+1 .. g advance the state without a graph (k2 < k1), steps g+1 .. p are
  recomputed with the current parameters (k2 > k1: the overlap carries gradient, not
  loss);
- the state at max(τ − (k2 − k1), g) is kept for the next update (τ at the stream's end).

With `reset_on: document` the state of one stream is zeroed before the first step of each
of its documents; multiplying by zero also stops the gradient, so no graph crosses a
document boundary. The recurrent stack runs as one fused call per segment; segments are
cut only where a document starts, where the kept state must be captured, and every
`checkpoint_every` steps of the graph.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainer.config import JobConfig
from trainer.data import IGNORE, Streams, Task, Window
from trainer.models import RNNModel, State


@dataclass(frozen=True)
class Plan:
    kept: int  # position of the carried state this update starts from
    graph: int  # g: the graph starts here
    loss: int  # the loss covers steps [loss, end)
    end: int  # τ: the update boundary
    keep: int  # position whose state is kept for the next update


def plan_update(p: int, kept: int, k1: int, k2: int, length: int) -> Plan:
    """The TBPTT(k1, k2) rule for the window that starts at position p."""
    end = min(p + k1, length)
    graph = max(end - k2, kept)
    loss = max(p, end - k2)
    keep = end if end == length else max(end - max(0, k2 - k1), graph)
    return Plan(kept=kept, graph=graph, loss=loss, end=end, keep=keep)


# -- state helpers ----------------------------------------------------------------------


def map_state(fn: Callable[[torch.Tensor], torch.Tensor], state: State) -> State:
    return tuple(fn(s) for s in state) if isinstance(state, tuple) else fn(state)


def detach(state: State) -> State:
    return map_state(torch.Tensor.detach, state)


def _reset(state: State, starts: torch.Tensor) -> State:
    keep = (~starts).to(_first(state).dtype).view(1, -1, 1)
    return map_state(lambda s: s * keep, state)


def _first(state: State) -> torch.Tensor:
    return state[0] if isinstance(state, tuple) else state


def _flat(state: State) -> tuple[torch.Tensor, ...]:
    return state if isinstance(state, tuple) else (state,)


def _unflat(tensors: tuple[torch.Tensor, ...], like: State) -> State:
    return tuple(tensors) if isinstance(like, tuple) else tensors[0]


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the gradient flowing back through it is multiplied by `factor`."""

    @staticmethod
    def forward(ctx, factor: float, *tensors: torch.Tensor):
        ctx.factor = factor
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        return (None, *(g * ctx.factor if g is not None else None for g in grads))


def scale_gradient(state: State, factor: float) -> State:
    """The state unchanged, with the gradient that flows back through it times factor."""
    return _unflat(_ScaleGradient.apply(factor, *_flat(state)), state)


# -- running segments -------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """What one fused run over the rows [a, b) of a window produced."""

    state: State  # at position b
    loss: torch.Tensor  # summed over the scored rows of [lo, b); zero when lo >= b
    pred: torch.Tensor | None = None  # predictions, targets and mask of rows [lo, b)
    targets: torch.Tensor | None = None
    scored: torch.Tensor | None = None


@dataclass
class Runner:
    """Runs a model over stream windows: fused calls between cuts, optional resets,
    optional activation checkpointing, losses summed over scored steps."""

    model: RNNModel
    reset_on_document: bool = False
    checkpoint_every: int = 0
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    def cuts(self, window: Window, start: int, end: int, base: int, extra: tuple[int, ...] = ()) -> list[int]:
        """Segment boundaries in [start, end]; `window` holds steps from position base."""
        points = {start, end, *(x for x in extra if start < x < end)}
        if self.reset_on_document:
            rows = window.starts[start - base + 1 : end - base].any(dim=1).nonzero().flatten()
            points.update((rows + start + 1).tolist())
        if self.checkpoint_every:
            points.update(range(start, end, self.checkpoint_every))
        return sorted(points)

    def advance(self, window: Window, base: int, start: int, end: int, state: State) -> State:
        """Move the state from position start to end without building a graph."""
        with torch.no_grad(), self.autocast():
            for a, b in _pairs(self.cuts(window, start, end, base)):
                state = self.segment(window, base, a, b, b, state).state
        return state

    def loss(self, window: Window, base: int, plan: Plan, state: State, grad_scales: dict[int, float] | None = None) -> tuple[torch.Tensor, State]:
        """Sum of the losses of steps [plan.loss, plan.end), with the graph from plan.graph.

        `grad_scales` maps positions inside the graph to a factor that multiplies the
        gradient flowing back through the state there (ARTBP's compensation, see
        trainer/truncation.py); the segments are cut there. Returns the summed loss and the
        state at plan.keep (attached to the graph where it lies inside it; detach before
        carrying it on)."""
        total = torch.zeros((), device=_first(state).device)
        kept, scales = state, grad_scales or {}
        with self.autocast():
            for a, b in _pairs(self.cuts(window, plan.graph, plan.end, base, (plan.keep, *scales))):
                if a in scales:
                    state = scale_gradient(state, scales[a])
                lo = max(a, plan.loss)
                if self.checkpoint_every:
                    flat = checkpoint(self._checkpointed_loss, window, base, a, b, lo, *_flat(state), use_reentrant=False)
                    part, state = flat[0], _unflat(flat[1:], state)
                else:
                    seg = self.segment(window, base, a, b, lo, state)
                    part, state = seg.loss, seg.state
                total = total + part
                if b == plan.keep:
                    kept = state
        return total, kept

    def segment(self, window: Window, base: int, a: int, b: int, lo: int, state: State) -> Segment:
        """One fused run over rows [a, b) from the state at position a, scored on rows [lo, b).

        The one place a segment is computed: training's advance (lo = b) and loss, and
        evaluation (lo = a), so the three cannot drift apart."""
        if self.reset_on_document:
            state = _reset(state, window.starts[a - base])
        outputs, state = self.model.recur(window.inputs[a - base : b - base], state)
        if lo >= b:  # nothing scored: skip the head, whose dropout would also move the RNG
            return Segment(state, outputs.new_zeros(()))
        pred = self.model.head(outputs[lo - a :])
        targets, scored = window.targets[lo - base : b - base], window.scored[lo - base : b - base]
        return Segment(state, loss_sum(pred, targets, scored), pred, targets, scored)

    def _checkpointed_loss(self, window, base, a, b, lo, *flat_state):
        # torch.utils.checkpoint passes and returns tensors only, so the state travels flat.
        # The recomputation runs in backward, outside loss()'s context: enter it again (it
        # restores autocast itself, but not the CPU's oneDNN switch, and a recomputation on
        # another kernel saves other tensors: CheckpointError with bf16/fp16 on CPU).
        with self.autocast():
            seg = self.segment(window, base, a, b, lo, _unflat(flat_state, self._like))
        return (seg.loss, *_flat(seg.state))

    @property
    def _like(self) -> State:
        return (None, None) if self.model.cell == "lstm" else None


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """The mixed-precision context of `train.precision` on a device."""

    def enter() -> contextlib.AbstractContextManager:
        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        stack = contextlib.ExitStack()
        if device.type == "cpu":
            # oneDNN has no reduced-precision LSTM primitive on most CPUs; ATen's kernel
            # runs the recurrence in fp32 while autocast lowers the other layers.
            stack.enter_context(torch.backends.mkldnn.flags(enabled=False))
        stack.enter_context(torch.autocast(device.type, dtype=dtype))
        return stack

    return enter


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """`train.deterministic`: deterministic kernels (an op without one raises), cuDNN's
    among them, and cuBLAS with a fixed workspace; the process's settings come back after
    the run (a worker process runs many jobs in turn). Its cost: docs/benchmarks.md."""
    cudnn, saved = torch.backends.cudnn, (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
        torch.use_deterministic_algorithms(True)
        cudnn.deterministic = True  # with cudnn.benchmark on, it tries deterministic algorithms only
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        cudnn.deterministic = saved[1]


def runner_for(model: RNNModel, config: JobConfig, device: torch.device) -> Runner:
    """The runner of a job: training's, and so that of every evaluation of its model."""
    tb = config.tbptt
    return Runner(model, tb.reset_on == "document", tb.checkpoint_every, autocast_for(config.train.precision, device))


def loss_sum(pred: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Summed loss over scored steps: cross-entropy for classes, squared error for values."""
    pred = pred.to(torch.promote_types(pred.dtype, torch.float32))  # fp16/bf16 losses in fp32
    if pred.dim() == targets.dim() + 1:
        return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return ((pred - targets) ** 2 * scored).sum()


def _pairs(points: list[int]):
    return zip(points[:-1], points[1:])


# -- evaluation -----------------------------------------------------------------------------


@torch.no_grad()
def evaluate(runner: Runner, streams: Streams, device: torch.device, chunk: int = 512) -> dict[str, float]:
    """Run the validation streams from a zero state, carrying it across chunks."""
    model = runner.model
    was_training = model.training
    model.eval()
    state = model.initial_state(streams.batch_size, device)
    loss = correct = count = 0.0
    try:
        with runner.autocast():
            for start in range(0, streams.length, chunk):
                end = min(start + chunk, streams.length)
                window = streams.window(start, end).to(device)
                for a, b in _pairs(runner.cuts(window, start, end, start)):
                    seg = runner.segment(window, start, a, b, a, state)
                    state = seg.state
                    loss += seg.loss.item()
                    count += seg.scored.sum().item()
                    if seg.pred.dim() == seg.targets.dim() + 1:  # classes: accuracy too
                        correct += ((seg.pred.argmax(-1) == seg.targets) & seg.scored).sum().item()
    finally:
        model.train(was_training)
    return {"loss": loss / max(count, 1), "correct": correct / max(count, 1), "count": count}


def evaluation_metrics(task: Task, result: dict[str, float]) -> dict[str, float]:
    """`valid/...` metrics (SPEC §3) of an `evaluate` result."""
    loss = result["loss"]
    metrics = {"valid/loss": loss}
    if task.metric == "accuracy":
        metrics["valid/accuracy"] = result["correct"]
    elif task.metric == "ppl":
        metrics["valid/ppl"] = math.exp(loss) if loss < 700 else math.inf
        if task.bits_per_char:
            metrics["valid/bpc"] = loss / math.log(2)
    else:
        metrics["valid/mse"] = loss
    return metrics
