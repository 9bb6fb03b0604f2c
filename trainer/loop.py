"""The training loop: `fit(config, callbacks) -> Summary`.

The loop does no I/O: metrics, evaluations and checkpoints go to callbacks (the CLI
writes files, the workers write the database), and callbacks can ask it to stop between
windows (cancellation).
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch

from trainer import checkpoint as ckpt
from trainer.clipping import Clipper
from trainer.config import ConfigError, JobConfig, config_dict, parse_config
from trainer.data import Data, Streams, Window, load_data
from trainer.devices import peak_memory_bytes, pick_device, reset_peak_memory
from trainer.models import RNNModel, State, count_parameters
from trainer.optim import Schedule, build_optimizer
from trainer.tbptt import Plan, Runner, detach, deterministic_algorithms, evaluate, evaluation_metrics, map_state, plan_update, runner_for
from trainer.truncation import Adaptive, Choice, measure_ahead, policy_for


class Callback:
    """Hooks the loop reports through; every method is optional."""

    def on_start(self, info: dict[str, Any]) -> None: ...
    def on_update(self, step: int, metrics: dict[str, float | None]) -> None: ...
    def on_eval(self, step: int, metrics: dict[str, float | None]) -> None: ...
    def on_checkpoint(self, step: int, checkpoint: dict[str, Any]) -> None: ...
    def on_model(self, artifact: dict[str, Any]) -> None: ...  # a finished run's model (checkpoint.model_artifact)
    def should_stop(self) -> bool: return False  # noqa: E704
    def stop_reason(self) -> str | None:
        """Why to stop before the next update (Summary.stopped), or None to go on."""
        return "cancelled" if self.should_stop() else None
    def on_end(self, summary: "Summary") -> None: ...


FINISHED = ("completed", "budget", "target")  # a run stopped for good (budget, target: by a callback): its model is stored


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient with `clip.on_nonfinite: fail`."""

    def __init__(self, step: int, what: str):
        super().__init__(f"non-finite {what} at step {step} (clip.on_nonfinite: fail)")
        self.step = step


@dataclass
class Summary:
    steps: int
    epochs: float
    final_train_loss: float | None
    final_valid_loss: float | None
    tokens_per_s: float
    wall_s: float
    peak_memory_bytes: int
    clipped_fraction: float
    skipped_steps: int
    stopped: str  # completed | cancelled | time limit | a callback's stop_reason() (early, budget, target, preempted)
    valid_accuracy: float | None = None
    valid_ppl: float | None = None
    valid_bpc: float | None = None
    valid_mse: float | None = None
    parameters: int = 0
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k.startswith("final")}


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


@dataclass
class Cursor:
    """Where the streams are: the next window starts at `position`; `kept` is the
    carried state at `kept_position` (see tbptt.plan_update)."""

    epoch: int = 0
    position: int = 0
    kept_position: int = 0
    kept: Any = None

    def state_dict(self) -> dict[str, Any]:  # live tensors: checkpoint.capture copies them
        return {"epoch": self.epoch, "position": self.position, "kept_position": self.kept_position, "kept": self.kept}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self.kept_position, self.kept = state["kept_position"], state["kept"]


@dataclass
class Counters:
    """The run's totals so far; checkpointed, so a resumed run's summary covers all of it."""

    step: int = 0
    tokens: int = 0
    clipped: int = 0
    skipped: int = 0
    train_seconds: float = 0.0  # inside updates: what tokens/s divides by
    wall_seconds: float = 0.0  # the whole loop (updates, evaluations, checkpoints): train.max_wall_s
    recent_losses: deque = field(default_factory=lambda: deque(maxlen=50))

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "clipped": self.clipped,
            "skipped": self.skipped,
            "train_seconds": self.train_seconds,
            "wall_seconds": self.wall_seconds,
            "recent_losses": list(self.recent_losses),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens = state["step"], state["tokens"]
        self.clipped, self.skipped, self.train_seconds = state["clipped"], state["skipped"], state["train_seconds"]
        self.wall_seconds = state.get("wall_seconds", 0.0)  # absent from checkpoints older than train.max_wall_s
        self.recent_losses.clear()
        self.recent_losses.extend(state["recent_losses"])


class DataParallel(Protocol):
    """The group of a data-parallel rank, as the engine calls it (trainer.distributed.Sync
    is the implementation). Described here so that the engine never imports it."""

    def attach(self, trainer: Trainer) -> None: ...
    def count(self, local: int) -> int: ...
    def sum(self, t: torch.Tensor) -> torch.Tensor: ...  # summed over ranks
    def any(self, flag: bool) -> bool: ...
    def reduce_gradients(self, params: list[torch.nn.Parameter], loss: torch.Tensor) -> torch.Tensor: ...
    def evaluate(self, runner: Runner, valid: Streams, device: torch.device) -> dict[str, float]: ...
    def broadcast_object(self, obj: Any) -> Any: ...  # rank 0's value on every rank


@dataclass(frozen=True)
class UpdatePlan:
    """What one update will compute, fixed before any of it runs."""

    segments: Plan  # positions: carried state, graph start, loss start, boundary, next kept
    window: Window  # rows segments.kept .. segments.end, on the device
    count: int  # scored (step, stream) pairs of the loss, over every rank
    lr: float
    new_steps: int  # how far the cursor moves: this update's k1
    truncation: Choice = Choice(0, 0)  # k1, k2 and (modes adaptive, unbiased) weights, metrics


@dataclass(frozen=True)
class StepResult:
    """The optimizer step's numbers; the defaults are a window with nothing scored."""

    loss: float | None = None  # may be non-finite
    grad_norm: float | None = None
    clipped_norm: float | None = None
    clipped: float = 0.0
    skipped: bool = False


class Trainer:
    """Everything one run holds; `update()` performs one TBPTT update.

    With `sync` (trainer/distributed.py) this is one rank of a data-parallel group: it
    trains its block of the streams and sums gradients with the others before clipping."""

    def __init__(self, config: JobConfig, data: Data, device: torch.device, sync: DataParallel | None = None):
        self.config, self.data, self.device, self.sync = config, data, device, sync
        torch.manual_seed(config.train.seed)
        self.model = RNNModel(config.model, data.task).to(device)
        self.params = list(self.model.parameters())
        self.optimizer = build_optimizer(config.optim, self.params)
        self.schedule = Schedule(config.optim, self.total_steps())
        self.clipper = Clipper(config.clip)
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.train.precision == "fp16")
        self.window_rng = torch.Generator().manual_seed(config.train.seed)
        tb = config.tbptt
        self.runner = runner_for(self.model, config, device)
        self.streams = data.train
        if sync is not None:
            sync.attach(self)  # this rank's streams, rank 0's parameters
        self.cursor = Cursor(kept=self.model.initial_state(self.streams.batch_size, device))
        self.counters = Counters()
        self.best = ckpt.BestWeights() if config.train.model == "best" else None
        self._full_bounds = self._full_mode_bounds() if tb.mode == "full" else None
        self.truncation = policy_for(tb, self.window_rng, data.train.batch_size)  # modes adaptive, unbiased

    # -- the window -------------------------------------------------------------------

    def _full_mode_bounds(self) -> list[int]:
        if self.config.tbptt.reset_on != "document":
            return [self.streams.length]
        starts = self.streams.aligned_starts()
        if starts is None:
            raise ConfigError([("tbptt.mode", "full with reset_on: document needs documents that start at the same step in every stream")])
        return sorted({*starts, self.streams.length} - {0})

    def window_length(self) -> tuple[int, int, float]:
        """(k1, k2, learning-rate scale) of the next window."""
        tb, position = self.config.tbptt, self.cursor.position
        if self._full_bounds is not None:
            k = next(b for b in self._full_bounds if b > position) - position
            return k, k, 1.0
        if not tb.randomize:
            return tb.k1, tb.k2, 1.0
        # AWD-LSTM (Merity et al., 2017): a window of k, or k/2 with probability 0.05,
        # jittered by Normal(0, 5) and at least 5 steps; lr scaled by drawn/k (host draws).
        base = tb.k1 if torch.rand((), generator=self.window_rng, device="cpu").item() < 0.95 else tb.k1 / 2
        drawn = max(5, int(torch.normal(base, 5.0, (), generator=self.window_rng, device="cpu").item()))
        drawn = min(drawn, self.streams.length - position)
        return drawn, drawn, drawn / tb.k1

    def choose_truncation(self) -> Choice:
        """The next window's truncation: the mode's policy (trainer/truncation.py), or the
        configured k1, k2 (randomized or full)."""
        position, length = self.cursor.position, self.streams.length
        if isinstance(self.truncation, Adaptive):
            return self.truncation.choose(self.counters.step, self._measure_lags, position, length, self.counters.train_seconds)
        return self.truncation.choose(position, length) if self.truncation is not None else Choice(*self.window_length())

    def _measure_lags(self, start: int, end: int) -> torch.Tensor | None:
        """Mode adaptive: per-lag gradient norms over (start, end], over every rank's streams."""
        total = self.sync.sum if self.sync is not None else None  # every rank's streams
        return measure_ahead(self.runner, self.streams, self.device, self.cursor.kept_position, self.cursor.kept, start, end, total)

    def total_steps(self) -> int:
        train = self.config.train
        if train.max_steps is not None:
            return train.max_steps
        per_epoch = math.ceil(self.data.train.length / self.config.tbptt.k1)
        return per_epoch * train.epochs

    # -- one update -------------------------------------------------------------------

    def update(self) -> dict[str, float | None]:
        """One TBPTT update: plan it, step the parameters, report what happened."""
        started = time.perf_counter()
        plan = self.plan()
        result = self.step(plan)
        return self.report(plan, result, time.perf_counter() - started)

    def plan(self) -> UpdatePlan:
        """The next window: its k1 and k2, its segments (tbptt.plan_update), its rate."""
        cursor = self.cursor
        choice = self.choose_truncation()
        segments = plan_update(cursor.position, cursor.kept_position, choice.k1, choice.k2, self.streams.length)
        host = self.streams.window(segments.kept, segments.end)
        # Counted on the host, before the copy: the count needs no device sync.
        count = int(host.scored[segments.loss - segments.kept :].sum())
        if self.sync is not None:
            count = self.sync.count(count)  # the loss is a mean over every rank's pairs
        lr = self.schedule.lr(self.counters.step) * choice.lr_scale
        return UpdatePlan(segments, host.to(self.device), count, lr, segments.end - cursor.position, choice)

    def step(self, plan: UpdatePlan) -> StepResult:
        """Forward, backward, clip and the optimizer step; the streams move on."""
        segments, window = plan.segments, plan.window
        state = self.cursor.kept
        if segments.kept < segments.graph:
            state = self.runner.advance(window, segments.kept, segments.kept, segments.graph, state)
        state = detach(state)
        for group in self.optimizer.param_groups:
            group["lr"] = plan.lr
        self.optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad() if plan.count else torch.no_grad():
            loss_sum, kept = self.runner.loss(window, segments.kept, segments, state, plan.truncation.grad_scales)
        # A window with no scored step (e.g. mid-episode) has nothing to learn from.
        denominator = plan.truncation.loss_denominator or plan.count  # unbiased: a constant
        result = self._apply_gradients(loss_sum / plan.count, plan.count / denominator) if plan.count else StepResult()
        self._advance_cursor(segments, kept)
        return result

    def report(self, plan: UpdatePlan, result: StepResult, elapsed: float) -> dict[str, float | None]:
        """Count the update into the run's totals; the metrics the callbacks receive."""
        counters = self.counters
        new_tokens = plan.new_steps * self.data.train.batch_size  # every rank's streams
        counters.step += 1
        counters.tokens += new_tokens
        counters.train_seconds += elapsed
        counters.clipped += int(result.clipped)
        counters.skipped += int(result.skipped)
        if result.loss is not None and math.isfinite(result.loss):
            counters.recent_losses.append(result.loss)
        return {
            **(plan.truncation.metrics or {}),
            "train/lr": plan.lr,
            "train/k1": float(plan.new_steps),
            "train/loss": finite_or_none(result.loss),
            "train/grad_norm": finite_or_none(result.grad_norm),
            "train/grad_norm_clipped": finite_or_none(result.clipped_norm),
            "train/clipped": float(result.clipped),
            "train/skipped": float(result.skipped),
            "train/tokens_per_s": new_tokens / elapsed if elapsed > 0 else None,
        }

    def _apply_gradients(self, loss: torch.Tensor, scale: float = 1.0) -> StepResult:
        """Backward of loss · scale (mode unbiased: the sum over a constant, not the mean),
        clip, step; `train/loss` reports the mean over the window's scored pairs."""
        self.scaler.scale(loss * scale if scale != 1.0 else loss).backward()
        if self.sync is not None:  # before clipping: the clip sees the global norm
            loss = self.sync.reduce_gradients(self.params, loss)
        self.scaler.unscale_(self.optimizer)
        clip = self.clipper.clip(self.params)
        # One transfer for the four numbers (one device sync, not four).
        loss_value, norm, clipped_norm, clipped = torch.stack(
            [loss.detach().float(), clip.norm.float(), clip.clipped_norm.float(), clip.clipped.float()]
        ).tolist()
        finite_loss, finite_grad = math.isfinite(loss_value), math.isfinite(norm)
        skipped = not (finite_loss and finite_grad)
        # With fp16, a non-finite gradient under a finite loss is the scaler's overflow,
        # which it handles by lowering the scale: not a failure.
        if skipped and self.config.clip.on_nonfinite == "fail" and not (self.scaler.is_enabled() and finite_loss):
            raise NonFiniteError(self.counters.step + 1, "gradient" if finite_loss else "loss")
        if not skipped:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        return StepResult(loss_value, norm, clipped_norm, clipped, skipped)

    def _advance_cursor(self, segments: Plan, kept: State) -> None:
        cursor = self.cursor
        kept = detach(kept)
        if not all(torch.isfinite(s).all() for s in (kept if isinstance(kept, tuple) else (kept,))):
            kept = map_state(torch.zeros_like, kept)  # nothing can follow from a non-finite state
        cursor.position, cursor.kept_position, cursor.kept = segments.end, segments.keep, kept
        if segments.end == self.streams.length:  # the epoch is over: the stream starts again
            cursor.epoch += 1
            cursor.position = cursor.kept_position = 0
            if self.config.tbptt.reset_each_epoch:
                cursor.kept = map_state(torch.zeros_like, kept)

    # -- evaluation and checkpoints ---------------------------------------------------

    def evaluate(self) -> dict[str, float | None]:
        if self.sync is not None:
            result = self.sync.evaluate(self.runner, self.data.valid, self.device)
        else:
            result = evaluate(self.runner, self.data.valid, self.device)
        metrics = {k: finite_or_none(v) for k, v in evaluation_metrics(self.data.task, result).items()}
        self.schedule.observe(result["loss"])
        if self.best is not None:
            self.best.offer(self.counters.step, metrics.get("valid/loss"), self.model)
        return metrics

    def done(self) -> bool:
        train = self.config.train
        if train.max_steps is not None:
            return self.counters.step >= train.max_steps
        return self.cursor.epoch >= train.epochs

    def state_dict(self) -> dict[str, Any]:
        return ckpt.capture(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ckpt.restore(self, state)


def fit(
    config: JobConfig | dict,
    callbacks: Iterable[Callback] = (),
    resume: dict[str, Any] | None = None,
    resolve: Callable[[str], Path] | None = None,
    sync: DataParallel | None = None,
) -> Summary:
    """Train a job config to its budget; report through callbacks; return the summary.

    On a data-parallel rank (`sync`), pass `resume` as `sync.local_checkpoint(...)` and
    the callbacks inside one `trainer.distributed.GroupCallbacks`."""
    config = parse_config(config)
    with deterministic_algorithms(config.train.deterministic):
        return _fit(config, list(callbacks), resume, resolve, sync)


def _fit(config: JobConfig, callbacks: list[Callback], resume, resolve, sync) -> Summary:
    wall_start = time.perf_counter()
    device = pick_device(config.train.device)
    reset_peak_memory(device)
    data = load_data(config.data, config.train.seed, resolve)
    trainer = Trainer(config, data, device, sync)
    if resume is not None:
        ckpt.check_compatible(config, resume)
        trainer.load_state_dict(resume)
    info = {
        "parameters": count_parameters(trainer.model),
        "device": str(device),
        "total_steps": trainer.total_steps(),
        "start_step": trainer.counters.step,
        "config": config_dict(config),
    }
    for cb in callbacks:
        cb.on_start(info)

    train, counters = config.train, trainer.counters
    valid: dict[str, float | None] = {}
    stopped = "completed"
    loop_start, wall_before = time.perf_counter(), counters.wall_seconds
    while not trainer.done():
        reason = next((r for r in (cb.stop_reason() for cb in callbacks) if r), None)
        if reason is not None:
            stopped = reason
            break
        if _out_of_time(train.max_wall_s, counters.wall_seconds, sync):
            stopped = "time limit"
            break
        metrics = trainer.update()
        for cb in callbacks:
            cb.on_update(counters.step, metrics)
        last = trainer.done()
        if (train.eval_every and counters.step % train.eval_every == 0) or last:
            valid = trainer.evaluate()
            for cb in callbacks:
                cb.on_eval(counters.step, valid)
        counters.wall_seconds = wall_before + time.perf_counter() - loop_start
        if (train.checkpoint_every and counters.step % train.checkpoint_every == 0) or last:
            _checkpoint(trainer, callbacks)
    if stopped != "completed" and counters.step:  # stopped before its end: resumable from here
        _checkpoint(trainer, callbacks)
    if stopped in FINISHED and any(type(cb).on_model is not Callback.on_model for cb in callbacks):
        model = ckpt.model_artifact(trainer)
        for cb in callbacks:
            cb.on_model(model)

    summary = _summary(trainer, valid, stopped, time.perf_counter() - wall_start, info)
    for cb in callbacks:
        cb.on_end(summary)
    return summary


def _out_of_time(limit: float | None, spent: float, sync: DataParallel | None) -> bool:
    """train.max_wall_s is used up. Ranks of a group decide together (their clocks differ,
    and a rank that stopped alone would leave the others waiting in a collective)."""
    if limit is None:
        return False
    over = spent >= limit
    return sync.any(over) if sync is not None else over


def _checkpoint(trainer: Trainer, callbacks: list[Callback]) -> None:
    if not any(type(cb).on_checkpoint is not Callback.on_checkpoint for cb in callbacks):
        return  # nobody stores checkpoints: do not pay for copying the state
    state = trainer.state_dict()
    for cb in callbacks:
        cb.on_checkpoint(trainer.counters.step, state)


def _summary(trainer: Trainer, valid: dict, stopped: str, wall_s: float, info: dict) -> Summary:
    c = trainer.counters
    recent = list(c.recent_losses)
    steps = max(c.step, 1)
    return Summary(
        steps=c.step,
        epochs=trainer.cursor.epoch + trainer.cursor.position / trainer.streams.length,
        final_train_loss=sum(recent) / len(recent) if recent else None,
        final_valid_loss=valid.get("valid/loss"),
        valid_accuracy=valid.get("valid/accuracy"),
        valid_ppl=valid.get("valid/ppl"),
        valid_bpc=valid.get("valid/bpc"),
        valid_mse=valid.get("valid/mse"),
        tokens_per_s=c.tokens / c.train_seconds if c.train_seconds else 0.0,
        wall_s=wall_s,
        peak_memory_bytes=peak_memory_bytes(trainer.device),
        clipped_fraction=c.clipped / steps,
        skipped_steps=c.skipped,
        stopped=stopped,
        parameters=info["parameters"],
        device=info["device"],
    )
