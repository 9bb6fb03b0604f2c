"""What a time-series job's page plots: the model's one-step-ahead forecasts over the
validation split of the job's own data, next to the values that came.

The validation split is the job's (the last `data.valid_fraction` of the rows), read from
its data file (a path in the data roots, or its uploaded dataset) and run as training's
validation runs: from a fresh state, each row's forecast made from the rows before it.
Bounded: files up to MAX_FILE_BYTES are read, and up to `rows` validation rows are run.
"""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path
from typing import Any

import torch

from trainer.data import read_csv, train_rows
from trainer.inference import Model

DATASET_CACHE = Path(tempfile.gettempdir()) / "unroll-datasets"  # uploads in a remote store, fetched once
MAX_FILE_BYTES = 64 * 2**20  # larger files: `unroll predict` or the Python API
MAX_ROWS = 5_000


class Unavailable(Exception):
    """The forecast cannot be drawn (the data is gone, too large, or not this model's)."""


def validation_forecast(model: Model, path: Path, valid_fraction: float, rows: int) -> dict[str, Any]:
    """{target, first_row, actual[i], forecast[i]}: forecast[i] is the model's value for
    validation row i + 1, made after reading rows 0..i; actual[i] is that row's target."""
    try:
        size = path.stat().st_size
    except OSError:
        raise Unavailable(f"the job's data file is gone ({path.name}): nothing to compare the forecast with") from None
    if size > MAX_FILE_BYTES:
        raise Unavailable(f"the job's data file is {size / 2**20:,.0f} MiB; the page draws forecasts for files up to "
                          f"{MAX_FILE_BYTES / 2**20:,.0f} MiB (use `unroll predict` or trainer.load for larger ones)")
    try:
        header, body = read_csv(path)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise Unavailable(f"the job's data file cannot be read as CSV any more ({type(exc).__name__})") from None
    if not header:
        raise Unavailable("the job's data file is empty now")
    names = [*model.columns, model.target]
    missing = [n for n in names if n not in header]
    if missing:
        raise Unavailable(f"the data file has no column {missing[0]!r} any more")
    at = [header.index(n) for n in names]
    start = train_rows(len(body), valid_fraction)  # the split of training
    try:  # only the rows drawn are converted
        valid = torch.tensor([[float(r[j]) for j in at] for r in body[start : start + rows + 1]], dtype=torch.float32)
    except (ValueError, IndexError):
        raise Unavailable("the data file has rows that are not numbers in the model's columns") from None
    if len(valid) < 2:
        raise Unavailable("the validation split has fewer than two rows")
    outputs, _ = model.step(valid[:-1, :-1])
    return {
        "target": model.target,
        "first_row": start + 1,
        "actual": valid[1:, -1].tolist(),
        "forecast": [float(v) for v in outputs],
    }
