"""`unroll compare A B ...`: any jobs of the project side by side (GET /v1/compare), as two
tables on stdout: each job's state and the final value of each compared series, then the
configuration paths whose values differ. `--json` prints the API's answer instead (with
the series aligned by step). An API error is one `error:` line and exit 1.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from service.cli.common import add_client_args, open_client, table
from service.store import limits

MISSING = "-"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "compare", help="compare jobs (any sweep, any state): final metrics and the config differences"
    )
    p.add_argument("ids", nargs="+", metavar="ID", help=f"job ids (at most {limits.MAX_COMPARE_JOBS})")
    p.add_argument(
        "--metrics", default=None, metavar="A,B",
        help="series to compare, comma-separated (default: train/loss, valid/loss and each task's metric)",
    )
    p.add_argument("--max-points", type=int, default=None, metavar="N", help="with --json: points per aligned series")
    p.add_argument("--json", action="store_true", help="print the API's comparison (series aligned by step) as JSON")
    add_client_args(p)
    p.set_defaults(func=compare_jobs)


def compare_jobs(args: argparse.Namespace) -> int:
    metrics = [m for m in (args.metrics or "").split(",") if m] or None
    with open_client(args) as api:
        comparison = api.compare(args.ids, metrics=metrics, max_points=args.max_points)
    if args.json:
        print(json.dumps(comparison, indent=2))
        return 0
    print(render(comparison))
    return 0


def render(comparison: dict[str, Any]) -> str:
    """The final-metrics table, a blank line, and the config-difference table."""
    jobs = comparison["jobs"]
    header = ["", *(job["id"] for job in jobs)]
    rows = [
        ["name", *(job["name"] or MISSING for job in jobs)],
        ["state", *(job["state"] for job in jobs)],
        ["sweep", *(job["sweep_id"] or MISSING for job in jobs)],
        ["step", *(f"{job['step']}/{job['max_steps'] or '?'}" for job in jobs)],
    ]
    for metric in comparison["metrics"]:
        rows.append([metric, *(_final(job["final"].get(metric)) for job in jobs)])
    lines = [table(rows, header), ""]
    diff = comparison["config_diff"]
    if not diff:
        lines.append("config: no differences")
    else:
        diff_rows = [[row["key"], *(_value(row["values"], job["id"]) for job in jobs)] for row in diff]
        lines.append(table(diff_rows, ["config", *(job["id"] for job in jobs)]))
    return "\n".join(lines)


def _final(point: dict[str, Any] | None) -> str:
    if point is None:
        return MISSING
    value = point["value"]
    shown = "non-finite" if value is None else f"{value:.6g}"
    return f"{shown} @ {point['step']}"


def _value(values: dict[str, Any], job_id: str) -> str:
    if job_id not in values:
        return "(unset)"
    value = values[job_id]
    return value if isinstance(value, str) else json.dumps(value)
