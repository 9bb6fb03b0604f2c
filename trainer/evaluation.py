"""`kind: evaluate` jobs: a trained job's model over a file of any length, reported
through the same callbacks as training (on_start, one on_eval, on_end), so the service
stores an evaluation's metrics and summary as it stores a training run's.

The file is read window by window with carried state (trainer.inference.Model.evaluate):
memory stays flat in its length. With the trained job's own settings on its validation
file, the loss is that job's last `valid/loss`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterable

from trainer import inference
from trainer.artifact import ArtifactError
from trainer.config import ConfigError, JobConfig, config_dict
from trainer.data import source_file
from trainer.devices import peak_memory_bytes, pick_device, reset_peak_memory
from trainer.loop import Callback, Summary, finite_or_none
from trainer.models import count_parameters

# Model.evaluate's names -> the series an evaluation job stores (those of a validation).
SERIES = ("loss", "ppl", "bpc", "accuracy", "mse", "mse_original_units")


def run(
    config: JobConfig,
    checkpoint: Path,
    callbacks: Iterable[Callback] = (),
    resolve: Callable[[str], Path] | None = None,
) -> Summary:
    """Evaluate `checkpoint` (the model of job `config.evaluate.job`) on the data section's file."""
    assert config.kind == "evaluate" and config.evaluate is not None
    callbacks = list(callbacks)
    started = time.perf_counter()
    device = pick_device(config.train.device)
    reset_peak_memory(device)
    try:
        model = inference.load(checkpoint, device)
    except (ArtifactError, FileNotFoundError) as exc:  # the job's own failure: no retry would help
        raise ConfigError([("evaluate.job", str(exc))]) from None
    if model.kind != config.data.kind:
        raise ConfigError([("data.kind", f"the model of job {config.evaluate.job} reads {model.kind} data, not {config.data.kind}")])
    path = source_file(config.data, resolve)
    info = {
        "parameters": count_parameters(model.module),
        "device": str(device),
        "total_steps": None,  # no updates: the job's progress stays unknown until it ends
        "start_step": 0,
        "config": config_dict(config),
    }
    for cb in callbacks:
        cb.on_start(info)
    try:
        measured = model.evaluate(path, config.evaluate.batch_size)
    except ValueError as exc:  # a file the model cannot read (columns, batch size)
        raise ConfigError([("data", str(exc))]) from None
    values = {f"valid/{name}": finite_or_none(float(measured[name])) for name in SERIES if name in measured}
    for cb in callbacks:
        cb.on_eval(model.artifact.step, values)
    wall_s = time.perf_counter() - started
    summary = Summary(
        steps=model.artifact.step,
        epochs=0.0,
        final_train_loss=None,
        final_valid_loss=values.get("valid/loss"),
        valid_accuracy=values.get("valid/accuracy"),
        valid_ppl=values.get("valid/ppl"),
        valid_bpc=values.get("valid/bpc"),
        valid_mse=values.get("valid/mse"),
        tokens_per_s=measured["scored_steps"] / wall_s if wall_s else 0.0,
        wall_s=wall_s,
        peak_memory_bytes=peak_memory_bytes(device),
        clipped_fraction=0.0,
        skipped_steps=0,
        stopped="completed",
        parameters=info["parameters"],
        device=info["device"],
    )
    for cb in callbacks:
        cb.on_end(summary)
    return summary
