"""Limits on what a caller may ask for, each named once and used by every door (HTTP,
sweeps and the command line), and rendered into docs/operations.md by docs/generated.py
(make test fails when the page is out of date).

`FIELDS` bounds the numbers of a job configuration (SPEC §2) beyond what the schema
itself says: the schema says what is meaningful, these say what one job of a shared
deployment may take. An operator overrides any of them with UNROLL_LIMITS, a JSON object
of {field: bound}, e.g. `UNROLL_LIMITS='{"model.num_layers": 64}'`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

# A token works at most this long after it is created (an expiry is a number a caller sends).
MAX_TOKEN_LIFETIME_S = 10 * 365 * 86400
MIN_TOKEN_LIFETIME_S = 60
# A project's name: in URLs (/v1/admin/projects/{name}) and the database (200 characters).
PROJECT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
PROJECT_NAME_MAX = 200
# Ray accounts resources in steps of 1/10,000: a finer request cannot be honoured.
RESOURCE_STEP = 1e-4
# GET /v1/compare (and the dashboard's compare page): jobs side by side, series read per
# job, and points per series and job (each series is downsampled to this, like
# GET /v1/jobs/{id}/metrics): one request reads at most jobs x series x points.
MAX_COMPARE_JOBS = 20
MAX_COMPARE_METRICS = 10
MAX_COMPARE_POINTS = 10_000


@dataclass(frozen=True)
class Limit:
    field: str  # a dotted path of the job config; `data.*` fields exist for some kinds only
    high: float  # the largest value accepted
    why: str
    low: float | None = None  # the smallest, where the schema's own is too permissive


FIELDS: tuple[Limit, ...] = (
    Limit("model.hidden_size", 8192, "units per layer; the parameter cap (UNROLL_MAX_PARAMS) applies too"),
    Limit("model.num_layers", 32, "stacked layers; each is one fused kernel call per window"),
    Limit("model.embedding_dim", 8192, "token embedding width"),
    Limit("data.batch_size", 4096, "parallel streams: memory and compute grow with it"),
    Limit("data.lag", 1_000_000, "recall: the distance to remember"),
    Limit("data.length", 100_000_000, "steps per stream (recall) or per episode (adding)"),
    Limit("data.valid_length", 10_000_000, "steps per validation stream (recall)"),
    Limit("data.episodes", 10_000_000, "adding: training episodes"),
    Limit("data.valid_episodes", 1_000_000, "adding: validation episodes"),
    Limit("tbptt.k1", 100_000, "steps between updates (the window)"),
    Limit("tbptt.k2", 100_000, "steps the gradient flows back: the graph holds k2 steps"),
    Limit("tbptt.checkpoint_every", 100_000, "activation checkpointing chunk"),
    Limit("tbptt.k_max", 100_000, "adaptive: the longest k2 chosen, and the window each measurement backpropagates"),
    Limit("tbptt.k_min", 100_000, "adaptive: the shortest k2; unbiased: the spacing of truncation points"),
    Limit("tbptt.adapt_every", 100_000_000, "adaptive: updates between measurements"),
    Limit("clip.history", 1_000_000, "autoclip: norms remembered"),
    Limit("train.max_steps", 100_000_000, "updates"),
    Limit("train.epochs", 100_000, "passes over the data"),
    Limit("train.max_wall_s", 7 * 86400, "seconds of training across attempts; also the limit of a job that sets none"),
    Limit("train.keep_checkpoints", 50, "checkpoints kept per job: each is a full copy of the model and optimizer state"),
    Limit("evaluate.batch_size", 4096, "kind evaluate: parallel streams over the file"),
    Limit("resources.cpus", 256, "CPUs per worker; a smaller share would let one node run thousands of jobs at once", low=0.1),
    Limit("resources.gpus", 16, "GPUs per worker (fractions share one GPU)"),
    Limit("resources.workers", 64, "data-parallel ranks"),
    Limit("max_attempts", 10, "tries before a job fails for good (a crashing job is retried at most this often)"),
)

BY_FIELD = {limit.field: limit for limit in FIELDS}


def effective(overrides: Mapping[str, float]) -> dict[str, Limit]:
    """The table with an operator's overrides (UNROLL_LIMITS) applied."""
    unknown = sorted(set(overrides) - set(BY_FIELD))
    if unknown:
        raise ValueError(f"UNROLL_LIMITS: no limit named {', '.join(unknown)} (known: {', '.join(BY_FIELD)})")
    table = dict(BY_FIELD)
    for field, high in overrides.items():
        if not isinstance(high, (int, float)) or isinstance(high, bool) or not math.isfinite(high) or high <= 0:
            raise ValueError(f"UNROLL_LIMITS: {field} must be a positive number, not {high!r}")
        table[field] = Limit(field, float(high), table[field].why, table[field].low)
    return table


def _value(config: Any, field: str) -> Any:
    node = config
    for part in field.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def violations(config: Any, table: Mapping[str, Limit]) -> Iterator[tuple[str, str]]:
    """(field, message) for every bound a typed job config breaks."""
    for limit in table.values():
        value = _value(config, limit.field)
        if value is None or isinstance(value, bool):
            continue
        if value > limit.high:
            yield limit.field, f"must be <= {_number(limit.high)} (this deployment's limit: UNROLL_LIMITS)"
        elif limit.low is not None and value < limit.low:
            yield limit.field, f"must be >= {_number(limit.low)} (this deployment's limit: UNROLL_LIMITS)"
    for field in ("resources.cpus", "resources.gpus"):
        value = _value(config, field)
        if value and abs(value / RESOURCE_STEP - round(value / RESOURCE_STEP)) > 1e-6:
            yield field, f"must be a multiple of {RESOURCE_STEP:g} (Ray cannot reserve finer amounts)"


def _number(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"


# --- the docs ---------------------------------------------------------------------------------

def markdown() -> str:
    rows = ["| field | at most | at least | why |", "| --- | --- | --- | --- |"]
    rows += [f"| `{lim.field}` | {_number(lim.high)} | {_number(lim.low) if lim.low is not None else ''} | {lim.why} |" for lim in FIELDS]
    rows.append(f"| `resources.cpus`, `resources.gpus` | | | in steps of {RESOURCE_STEP:g} (Ray's) |")
    rows.append(f"| `GET /v1/compare` | {MAX_COMPARE_JOBS} jobs, {MAX_COMPARE_METRICS} series, {MAX_COMPARE_POINTS:,} points per series | 1 job | `jobs`, `metrics`, `max_points` |")
    rows.append(f"| token lifetime | {MAX_TOKEN_LIFETIME_S // 86400:,} days | {MIN_TOKEN_LIFETIME_S} s | `--expires`, `expires_in_s` |")
    return "\n".join(rows)
