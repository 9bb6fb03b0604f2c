"""Sweeps, the domain: how a sweep expands into jobs, and its comparison table.

This module is pure (no database, no HTTP), and HTTP and the CLI both use it:

- `expand` turns a base config, a grid ({dotted.path: [values]}) and a number of seeds into
  the job configs, in grid order (the Cartesian product, times seeds: train.seed = base
  seed + 0 .. seeds - 1). `grid_size` counts them without building anything. The rule
  "tbptt.k2 follows tbptt.k1 when only k1 is swept" (`k2_follows_k1`) is applied here, so a
  sweep trains the same jobs whether it came over HTTP or from `unroll sweep`.
- The API gathers each job's outcome (`JobOutcome`) and `summarize` turns them into the
  summary of `GET /v1/sweeps/{id}`; the CLI renders the same summary as a table
  (`render_table`) and `to_csv` writes it as CSV.

What a summary row holds, and why:

What a row holds, and why:

- `final`: per job, the last evaluation of the task's validation metric (the value the
  model ends with); over the point's seeds, mean ± sample standard deviation (std is null
  with fewer than two values). `best`: per job, the best evaluation of the run (max for
  accuracy, min for ppl and mse). Both count jobs that are still running, with what they
  have reported so far, so the table fills in live; `jobs_done` says how much is final.
  A non-finite evaluation is stored as null (SPEC §3): it is left out of mean and std and
  counted in `nonfinite`, so a diverged seed stays visible instead of vanishing.
- `steps`, `wall_s`, `tokens_per_s`, `clipped_fraction`, `skipped_steps`: means over the
  point's jobs that have the value, from the trainer's summary once a job has finished,
  else from what the running job has reported (steps reached, time since it started, its
  latest tokens/s). `peak_memory_bytes` is the maximum, since it is what a node must hold.
- `best_point`: the point with the best `final.mean`; on a tie, the first in grid order
  (with a grid of increasing k1 that is the cheapest of the equally good ones).
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from service.store.lifecycle import TERMINAL_STATE_NAMES

# The validation metric each task reports (SPEC §3) and which way is better.
TASK_METRICS: dict[str, tuple[str, str]] = {
    "recall": ("valid/accuracy", "max"),
    "text": ("valid/ppl", "min"),
    "adding": ("valid/mse", "min"),
    "timeseries": ("valid/mse", "min"),
}

# Plain strings: the summary reads states off job rows and off the wire alike.
TERMINAL = tuple(sorted(TERMINAL_STATE_NAMES))


def task_metric(config: dict[str, Any]) -> tuple[str, str]:
    """(metric, goal) of a job configuration (a dict in the form of SPEC §2)."""
    kind = (config.get("data") or {}).get("kind")
    return TASK_METRICS.get(kind, ("valid/loss", "min"))


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted.path: value} of every leaf of a nested mapping (a list, or an empty mapping,
    is one leaf): get_path's inverse. {"tbptt": {"k1": 24}} -> {"tbptt.k1": 24}."""
    if not isinstance(config, dict):
        return {prefix: config}
    out: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def get_path(config: dict[str, Any], path: str) -> Any:
    """config["a"]["b"] for "a.b"; None when any part is missing."""
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


# --- expansion ------------------------------------------------------------------------------


class InvalidGrid(ValueError):
    """A grid that cannot be expanded; `field` names it (`grid.tbptt.k1`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class SweepJobSpec(NamedTuple):
    config: dict[str, Any]  # the job's config, not yet validated
    point: dict[str, Any]  # {path: value} of its grid point
    seed: int


def grid_size(grid: dict[str, list[Any]], seeds: int) -> int:
    """How many jobs the sweep expands to, computed without expanding it."""
    return max(1, math.prod(len(values) for values in grid.values())) * seeds


def k2_follows_k1(base: dict[str, Any], grid: dict[str, list[Any]]) -> bool:
    """A sweep over truncation lengths almost always means k1 = k2 = k: when the grid sweeps
    tbptt.k1 and not tbptt.k2, a k2 in the base config is not used (k2 then defaults to k1)."""
    tbptt = base.get("tbptt")
    return "tbptt.k1" in grid and "tbptt.k2" not in grid and isinstance(tbptt, dict) and "k2" in tbptt


def base_seed(base: dict[str, Any]) -> int:
    """The base config's train.seed, 0 when it sets none (or not an integer): the sweep's
    seeds count up from it, and an early-stopped sweep's launch order is drawn from it."""
    seed = get_path(base, "train.seed")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else 0


def expand(base: dict[str, Any], grid: dict[str, list[Any]], seeds: int) -> list[SweepJobSpec]:
    """Every job of the sweep, in grid order (the last axis varies fastest, then seeds)."""
    for path, values in grid.items():
        if not path or any(not part for part in path.split(".")):
            raise InvalidGrid(f"grid.{path}", "must be a dotted path such as tbptt.k1")
        if not values:
            raise InvalidGrid(f"grid.{path}", "needs at least one value")
    base = copy.deepcopy(base)
    if k2_follows_k1(base, grid):
        del base["tbptt"]["k2"]
    seed0 = base_seed(base)
    jobs = []
    for point in grid_points(grid):
        for offset in range(seeds):
            config = copy.deepcopy(base)
            for path, value in point.items():
                set_path(config, path, value)
            seed = seed0 + offset
            if "train.seed" not in point:
                set_path(config, "train.seed", seed)
            jobs.append(SweepJobSpec(config, point, seed))
    return jobs


def set_path(config: dict[str, Any], path: str, value: Any) -> None:
    """config[a][b][c] = value for path "a.b.c", creating sections as needed."""
    parts = path.split(".")
    node = config
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise InvalidGrid(f"grid.{path}", f"{part} is not a section of the job configuration")
        node = child
    node[parts[-1]] = value


def point_name(base_name: str | None, point: dict[str, Any], seed: int, seeds: int) -> str | None:
    """A job's name: the sweep's (or base config's) name and its point, e.g. "k k1=8,seed=1"."""
    parts = [f"{path.rsplit('.', 1)[-1]}={value}" for path, value in point.items()]
    if seeds > 1:
        parts.append(f"seed={seed}")
    label = ",".join(parts)
    name = f"{base_name} {label}".strip() if base_name else label
    return name[:200] or None


def grid_path_of(field: str, point: dict[str, Any]) -> str | None:
    """The grid path that sets `field` (a config field path), if the grid sets it: an error
    there is the grid's, not the base's."""
    for path in point:
        if field == path or field.startswith(f"{path}.") or path.startswith(f"{field}."):
            return path
    return None


# --- the summary ----------------------------------------------------------------------------


@dataclass
class JobOutcome:
    """What the summary needs of one job (gathered by the API from the database)."""

    job_id: str
    config: dict[str, Any]
    state: str
    step: int = 0
    started: bool = False
    # The trainer's Summary dict, once the job has finished (SPEC §6).
    summary: dict[str, Any] | None = None
    # The task metric's evaluations [(step, value or None when not finite)], in step order.
    evaluations: list[tuple[int, float | None]] = field(default_factory=list)
    # For a job without a summary: seconds since it started, and its latest metrics.
    running_s: float | None = None
    latest: dict[str, float | None] = field(default_factory=dict)


# --- the summary ------------------------------------------------------------------------------


def stat(values: Sequence[float | None]) -> dict[str, Any]:
    """{"mean", "std", "n", "nonfinite"} of per-seed values (None: not finite)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(finite)
    return {
        "mean": statistics.fmean(finite) if n else None,
        "std": statistics.stdev(finite) if n >= 2 else None,
        "n": n,
        "nonfinite": len(values) - n,
    }


def _final(evaluations: list[tuple[int, float | None]]) -> tuple[bool, float | None]:
    """(has an evaluation, the last value)."""
    return (True, evaluations[-1][1]) if evaluations else (False, None)


def _best(evaluations: list[tuple[int, float | None]], goal: str) -> tuple[bool, float | None]:
    if not evaluations:
        return False, None
    finite = [v for _, v in evaluations if v is not None and math.isfinite(v)]
    if not finite:
        return True, None
    return True, (max(finite) if goal == "max" else min(finite))


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return statistics.fmean(kept) if kept else None


def _resource(job: JobOutcome, key: str) -> float | None:
    if job.summary is not None:
        value = job.summary.get(key)
        return None if value is None else float(value)
    if not job.started:
        return None
    if key == "steps":
        return float(job.step)
    if key == "wall_s":
        return job.running_s
    if key == "tokens_per_s":
        return job.latest.get("train/tokens_per_s")
    if key == "peak_memory_bytes":
        return job.latest.get("system/peak_memory_bytes")
    return None  # clipped_fraction, skipped_steps: known once the job has finished


def _same(a: Any, b: Any) -> bool:
    # 1 == 1.0 (the stored config is canonical, the grid is what the user wrote), but
    # True != 1: a bool is not a number here.
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The grid's Cartesian product in the order the sweep created it."""
    axes = list(grid)
    return [dict(zip(axes, values)) for values in itertools.product(*(grid[a] for a in axes))]


def summarize(
    grid: dict[str, list[Any]], seeds: int, jobs: Sequence[JobOutcome], metric: str, goal: str
) -> dict[str, Any]:
    """The sweep's summary (the `summary` of GET /v1/sweeps/{id})."""
    points = grid_points(grid)
    members: list[list[JobOutcome]] = [[] for _ in points]
    for job in jobs:
        values = {path: get_path(job.config, path) for path in grid}
        matches = [i for i, p in enumerate(points) if all(_same(values[a], p[a]) for a in grid)]
        if not matches:
            continue  # cannot happen for jobs the sweep created
        # Two grid values equal after canonicalisation (4 and 4.0) share jobs by order.
        i = next((i for i in matches if len(members[i]) < seeds), matches[0])
        members[i].append(job)

    rows = []
    for point, group in zip(points, members):
        finals = [value for has, value in (_final(j.evaluations) for j in group) if has]
        bests = [value for has, value in (_best(j.evaluations, goal) for j in group) if has]
        states: dict[str, int] = {}
        for job in group:
            states[job.state] = states.get(job.state, 0) + 1
        memory = [_resource(j, "peak_memory_bytes") for j in group]
        memory = [m for m in memory if m is not None]
        rows.append(
            {
                "point": point,
                "jobs_done": sum(states.get(s, 0) for s in TERMINAL),
                "jobs_total": len(group),
                "states": states,
                "final": stat(finals),
                "best": stat(bests),
                "steps": _mean(_resource(j, "steps") for j in group),
                "wall_s": _mean(_resource(j, "wall_s") for j in group),
                "tokens_per_s": _mean(_resource(j, "tokens_per_s") for j in group),
                "peak_memory_bytes": int(max(memory)) if memory else None,
                "clipped_fraction": _mean(_resource(j, "clipped_fraction") for j in group),
                "skipped_steps": _mean(_resource(j, "skipped_steps") for j in group),
                "job_ids": [j.job_id for j in group],
            }
        )
    return {"metric": metric, "goal": goal, "axes": list(grid), "rows": rows, "best_point": best_point(rows, goal)}


def best_point(rows: Sequence[dict[str, Any]], goal: str) -> dict[str, Any] | None:
    best = None
    for row in rows:
        mean = row["final"]["mean"]
        if mean is None:
            continue
        if best is None or (mean > best[0] if goal == "max" else mean < best[0]):
            best = (mean, row["point"])
    return None if best is None else best[1]


# --- renderings -------------------------------------------------------------------------------

CSV_COLUMNS = (
    "jobs_done", "jobs_total", "metric",
    "final_mean", "final_std", "final_n", "best_mean", "best_std", "best_n",
    "steps", "wall_s", "tokens_per_s", "peak_memory_bytes", "clipped_fraction", "skipped_steps",
)


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (dict, list, bool)):
        return json.dumps(value)
    return value


def to_csv(summary: dict[str, Any]) -> str:
    """The rows as CSV: one column per grid axis (named by its path), then CSV_COLUMNS."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*summary["axes"], *CSV_COLUMNS])
    for row in summary["rows"]:
        flat = {
            "jobs_done": row["jobs_done"],
            "jobs_total": row["jobs_total"],
            "metric": summary["metric"],
            **{f"{which}_{k}": row[which][k] for which in ("final", "best") for k in ("mean", "std", "n")},
            **{k: row[k] for k in CSV_COLUMNS[9:]},
        }
        writer.writerow([*(_cell(row["point"].get(a)) for a in summary["axes"]), *(_cell(flat[c]) for c in CSV_COLUMNS)])
    return out.getvalue()


def _sort_key(value: Any) -> tuple[int, Any]:
    if isinstance(value, bool):
        return (1, int(value))
    if isinstance(value, (int, float)):
        return (0, value)
    if value is None:
        return (3, "")
    return (2, json.dumps(value) if isinstance(value, (dict, list)) else str(value))


def sorted_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows sorted by the grid's first axis (stable: ties keep grid order)."""
    axes = summary["axes"]
    if not axes:
        return list(summary["rows"])
    return sorted(summary["rows"], key=lambda row: _sort_key(row["point"].get(axes[0])))


def _num(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}"


def _pm(s: dict[str, Any]) -> str:
    if s["mean"] is None:
        return "nan" if s.get("nonfinite") else "-"
    text = f"{s['mean']:.4f}"
    if s["std"] is not None:
        text += f" ± {s['std']:.4f}"
    if s.get("nonfinite"):
        text += f" ({s['nonfinite']} nan)"
    return text


def _value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list, bool)) or value is None else str(value)


def render_table(summary: dict[str, Any], *, sort: bool = False) -> str:
    """The summary as an aligned text table (what `unroll sweep --wait` prints)."""
    rows = sorted_rows(summary) if sort else summary["rows"]
    axes = summary["axes"]
    best = summary.get("best_point")
    name = summary["metric"].split("/", 1)[-1]
    header = [*axes, "done", f"final {name}", f"best {name}", "steps", "wall_s", "tok/s", "peak_MiB", "clipped", "skipped", ""]
    early = any(row.get("steps_used") is not None for row in rows)  # the sweep stops early
    if early:
        header[-1:-1] = ["rung", "steps_saved"]
    lines = []
    for row in rows:
        memory = row["peak_memory_bytes"]
        rungs = [_num(row.get("rung"), 9), _num(row.get("steps_saved"), 12)] if early else []
        lines.append([
            *(_value(row["point"].get(a)) for a in axes),
            f"{row['jobs_done']}/{row['jobs_total']}",
            _pm(row["final"]),
            _pm(row["best"]),
            _num(row["steps"], 6),
            _num(row["wall_s"], 4),
            _num(row["tokens_per_s"], 4),
            "-" if memory is None else f"{memory / 2**20:.0f}",
            _num(row["clipped_fraction"], 3),
            _num(row["skipped_steps"], 3),
            *rungs,
            "<- best" if best is not None and row["point"] == best else "",
        ])
    widths = [max(len(str(r[i])) for r in [header, *lines]) for i in range(len(header))]
    text = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    text += ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    return "\n".join(text)
