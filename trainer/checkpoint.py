"""Checkpoints: a plain dict holding everything needed to continue the same trajectory.

Parameters, optimizer, schedule, grad scaler, RNG states, the data cursor, every stream's
carried hidden state, autoclip history and counters, plus the config (as nanoGPT does), so
a run stopped and resumed on CPU produces the same per-step losses bit for bit; and what
inference needs without the data (trainer/artifact.py: vocabulary, normalisation, task).
"""

from __future__ import annotations

import io
import math
import random
from pathlib import Path
from typing import Any, Protocol

import torch

from trainer import artifact
from trainer.config import ConfigError, JobConfig, config_dict
from trainer.data import Data

# 2: the `inference` section. Format 1 checkpoints still resume (the section is rebuilt
# from the data then), but cannot be loaded for inference.
FORMAT = 2
RESUMABLE_FORMATS = (1, 2)
# Sections that define the trajectory: resuming with another value would not continue it.
TRAJECTORY = ("model", "data", "tbptt", "clip", "optim")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any], /) -> Any: ...


class Resumable(Protocol):
    """What a checkpoint holds the state of (trainer.loop.Trainer is one). Described here
    rather than imported, so that checkpoints depend on the config and the data, not the loop."""

    config: JobConfig
    data: Data  # its vocabulary or normalisation go into the inference section
    device: torch.device  # where the carried state goes back to on restore
    model: Stateful
    optimizer: Stateful
    schedule: Stateful
    scaler: Stateful
    clipper: Stateful
    cursor: Stateful  # where the streams are, and their carried state
    counters: Stateful  # the update count ("step") and the summary's running totals
    window_rng: torch.Generator  # also ARTBP's truncation draws (tbptt.mode: unbiased)
    truncation: Stateful | None  # tbptt.mode adaptive: its k2, decay and time spent measuring
    best: "BestWeights | None"  # train.model: best


class BestWeights:
    """train.model: best — the weights of the evaluation with the lowest valid/loss so far
    (the earlier one on a tie), as a CPU copy."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.loss: float | None = None
        self.weights: dict[str, torch.Tensor] | None = None

    def offer(self, step: int, loss: float | None, model: torch.nn.Module) -> None:
        if loss is not None and math.isfinite(loss) and (self.loss is None or loss < self.loss):
            self.step, self.loss, self.weights = step, loss, _to_cpu(model.state_dict())

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "loss": self.loss, "weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.loss, self.weights = state["step"], state["loss"], state["weights"]


def model_artifact(trainer: Resumable) -> dict[str, Any]:
    """The `model` artifact of a completed run: what trainer.inference.load needs (config,
    weights, inference section) and no training state. The weights are the last, or with
    train.model: best those of the best evaluation (the last when none was finite)."""
    best = trainer.best
    if best is not None and best.weights is not None:
        weights, step, selected = best.weights, best.step, "best"
    else:
        weights, step, selected = _to_cpu(trainer.model.state_dict()), trainer.counters.state_dict()["step"], "last"
    return {
        "format": FORMAT,
        "config": config_dict(trainer.config),
        "step": step,
        "selected": selected,
        "valid_loss": best.loss if selected == "best" else None,
        "model": weights,
        "inference": artifact.describe(trainer.config, trainer.data),
    }


def _to_cpu(value: Any) -> Any:
    """A CPU copy that later updates cannot change (the caller may write it later)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_to_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    return value.to(device)


def capture(trainer: Resumable) -> dict[str, Any]:
    rng = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "window": trainer.window_rng.get_state(),
    }
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    counters = trainer.counters.state_dict()
    return {
        "format": FORMAT,
        "config": config_dict(trainer.config),
        "step": counters["step"],
        "model": _to_cpu(trainer.model.state_dict()),
        "optimizer": _to_cpu(trainer.optimizer.state_dict()),
        "schedule": trainer.schedule.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "clipper": trainer.clipper.state_dict(),
        "rng": rng,
        "cursor": _to_cpu(trainer.cursor.state_dict()),
        "counters": counters,
        "truncation": trainer.truncation.state_dict() if trainer.truncation is not None else {},
        "inference": artifact.describe(trainer.config, trainer.data),
        **({"best": trainer.best.state_dict()} if trainer.best is not None else {}),
    }


def restore(trainer: Resumable, state: dict[str, Any]) -> None:
    if state.get("format") not in RESUMABLE_FORMATS:
        raise ValueError(f"unsupported checkpoint format {state.get('format')!r}")
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.schedule.load_state_dict(state["schedule"])
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.clipper.load_state_dict(state["clipper"])
    cursor = state["cursor"]
    trainer.cursor.load_state_dict({**cursor, "kept": _to_device(cursor["kept"], trainer.device)})
    trainer.counters.load_state_dict(state["counters"])
    if trainer.truncation is not None and state.get("truncation"):  # absent before tbptt.mode adaptive
        trainer.truncation.load_state_dict(state["truncation"])
    if trainer.best is not None and state.get("best") is not None:
        trainer.best.load_state_dict(state["best"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    trainer.window_rng.set_state(rng["window"])
    if "cuda" in rng and torch.cuda.is_available():
        # One state per GPU the writer saw; a process that sees another number of GPUs (a
        # resume on another node) restores those it has in common.
        for index, state_ in enumerate(rng["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state_, index)


def check_compatible(config: JobConfig, state: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint into a config that would change the trajectory."""
    saved, current = state["config"], config_dict(config)
    for section in TRAJECTORY:
        if saved.get(section) != current.get(section):
            raise ConfigError([(section, "differs from the checkpoint's config; resume needs the same " + ", ".join(TRAJECTORY))])
    if saved["train"]["seed"] != current["train"]["seed"]:
        raise ConfigError([("train.seed", "differs from the checkpoint's config")])


def to_bytes(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes) -> dict[str, Any]:
    """A checkpoint read back. Tensors and plain types only (`weights_only`): a checkpoint
    comes from the artifact store, and a pickle of anything else could run code on the
    worker that resumes from it."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def save(path: str | Path, state: dict[str, Any]) -> int:
    """Write atomically (a crash never leaves a torn checkpoint); return the size."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = to_bytes(state)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return len(data)


def load(path: str | Path) -> dict[str, Any]:
    return from_bytes(Path(path).read_bytes())
