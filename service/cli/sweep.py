"""`unroll sweep CONFIG --grid PATH=V1,V2,... [--grid ...] [--seeds N] [--max-parallel N]
[--early-stop KEY=V,...] [--wait]`

Submits a sweep (POST /v1/sweeps): CONFIG is the base job configuration (SPEC §2) and each
--grid one axis. Values are numbers when they read as one (`8`, `0.25`, `1e-3`), else YAML
scalars (`lstm` a string, `true` a bool, `null` None). `tbptt.k2` follows `tbptt.k1` unless the grid gives it too: a k2 in
the base config is not used when only k1 is swept, since a sweep over truncation lengths
almost always means k1 = k2 = k (the service applies this rule, service/store/sweeps.py, so
the same sweep sent over HTTP trains the same jobs).

--early-stop stops unpromising trials early (the sweep body's early_stop, SPEC §7):
`--early-stop min_steps=100` is asynchronous successive halving with rungs at 100, 300, 900,
... steps up to the base's train.max_steps; the other keys are reduction_factor, max_steps,
mode (asha or hyperband), resume (true: a trial not promoted is paused with a checkpoint and
may resume later; false: stopped for good), metric, goal and target (`target=0.9`: a trial
whose metric reaches 0.9 stops there, done, and the rule ranks only the others: the
question "which points reach 0.9?" rather than "which point is best?").

Without --wait it prints the sweep's id. With --wait it shows the summary table live
(redrawn in place on a terminal; otherwise printed again whenever a job changes state) and at the end
prints the final table, sorted by the grid's first axis, on stdout; the exit status is 0
when every job succeeded.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

from service.cli.common import (
    TERMINAL,
    UsageError,
    add_client_args,
    open_client,
    read_config,
)
from service.store import sweeps


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="submit a sweep over a grid of config values (e.g. --grid tbptt.k1=8,16,32)",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="the base job config (YAML or JSON)")
    p.add_argument(
        "--grid", action="append", default=[], metavar="PATH=V1,V2,...",
        help="one axis of the grid (repeatable): a dotted config path and its values",
    )
    p.add_argument("--seeds", type=int, default=1, help="runs per grid point (train.seed + 0..N-1)")
    p.add_argument("--max-parallel", type=int, default=None, help="at most this many of its jobs run at once")
    p.add_argument("--name", default=None, help="a name for the sweep (default: the config's name)")
    p.add_argument(
        "--early-stop", default=None, metavar="KEY=V,...",
        help="stop unpromising trials early, e.g. min_steps=100,reduction_factor=3,mode=asha,resume=true",
    )
    p.add_argument("--wait", action="store_true", help="show the table live until every job ends")
    p.add_argument("--interval", type=float, default=2.0, help=argparse.SUPPRESS)
    add_client_args(p)
    p.set_defaults(func=run)


class GridError(UsageError):
    pass


def parse_grid(specs: list[str]) -> dict[str, list[Any]]:
    """["tbptt.k1=8,16", "model.cell=lstm,gru"] -> {"tbptt.k1": [8, 16], "model.cell": ["lstm", "gru"]}."""
    import yaml

    axes = _assignments("--grid", specs, "PATH=V1,V2,... (e.g. tbptt.k1=8,16,32)")
    return {path: [_value(f"--grid {path}", text.strip(), yaml) for text in values.split(",")] for path, values in axes.items()}


def parse_early_stop(spec: str | None) -> dict[str, Any] | None:
    """"min_steps=100,mode=hyperband" -> {"min_steps": 100, "mode": "hyperband"}; the
    service checks the keys and values (a 422 names the field)."""
    if spec is None:
        return None
    import yaml

    settings = _assignments("--early-stop", spec.split(","), "KEY=VALUE (e.g. min_steps=100)")
    return {key: _value(f"--early-stop {key}", text.strip(), yaml) for key, text in settings.items()}


def _assignments(flag: str, items: list[str], expected: str) -> dict[str, str]:
    """["a=1", "b=2,3"] -> {"a": "1", "b": "2,3"}: each key once, neither side empty."""
    found: dict[str, str] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise GridError(f"{flag} {item!r}: expected {expected}")
        if key in found:
            raise GridError(f"{flag} {key} given twice")
        found[key] = text
    return found


def _value(where: str, text: str, yaml) -> Any:
    """A number if it reads as one (1e-3 too, which YAML 1.1 takes for a string), else YAML."""
    if not text:
        return None
    for kind in (int, float):
        try:
            number = kind(text)
        except ValueError:
            continue
        if math.isfinite(number):
            return number
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise GridError(f"{where}: cannot read value {text!r}: {exc}") from None


def run(args: argparse.Namespace) -> int:
    base = read_config(args.config)
    grid = parse_grid(args.grid)
    early_stop = parse_early_stop(args.early_stop)
    if sweeps.k2_follows_k1(base, grid):  # the service applies the rule; say so here
        print("note: tbptt.k2 follows tbptt.k1 (the base config's k2 is not used)", file=sys.stderr)
    try:
        with open_client(args) as api:
            sweep = api.create_sweep(
                base, grid, seeds=args.seeds, max_parallel=args.max_parallel, name=args.name, early_stop=early_stop
            )
            print(sweep["id"], flush=True)
            print(f"{len(sweep['jobs'])} jobs ({len(sweep['summary']['rows'])} points x {args.seeds} seeds)", file=sys.stderr)
            if not args.wait:
                return 0
            sweep = follow(api, sweep, args.interval)
    except KeyboardInterrupt:
        print("\nstopped following; the sweep goes on", file=sys.stderr)
        return 130
    return finish(sweep)


def finish(sweep: dict[str, Any]) -> int:
    summary = sweep["summary"]
    print(sweeps.render_table(summary, sort=True))
    best = summary.get("best_point")
    line = f"{sweep['id']} {sweep['state']}"
    if best is not None:
        line += "; best: " + ", ".join(f"{path}={value}" for path, value in best.items())
    print(line)
    return 0 if sweep["state"] == "succeeded" else 1


def follow(api, sweep: dict[str, Any], interval: float) -> dict[str, Any]:
    """Poll the sweep until every job has ended, showing its table as it fills in."""
    tty = sys.stderr.isatty()
    drawn = 0  # lines of the live table on screen (terminal only)
    last = None
    while True:
        sweep = api.get_sweep(sweep["id"])
        if tty:
            table = sweeps.render_table(sweep["summary"])
            status = f"{sweep['id']} {sweep['state']}  " + "  ".join(f"{s}={n}" for s, n in sorted(sweep["counts"].items()))
            text = f"{status}\n{table}"
            # Move up over the previous drawing and clear it, then draw anew.
            sys.stderr.write("\x1b[F\x1b[2K" * drawn + text + "\n")
            sys.stderr.flush()
            drawn = text.count("\n") + 1
        else:
            done = sum(row["jobs_done"] for row in sweep["summary"]["rows"])
            total = sum(row["jobs_total"] for row in sweep["summary"]["rows"])
            line = f"{sweep['state']}: {done}/{total} jobs done; " + ", ".join(f"{s}={n}" for s, n in sorted(sweep["counts"].items()))
            if line != last:  # a log: the table again only when something changed
                print(f"{line}\n{sweeps.render_table(sweep['summary'])}", file=sys.stderr, flush=True)
                last = line
        if sweep["state"] in TERMINAL:
            if tty:  # the final table goes to stdout; leave no live copy behind
                sys.stderr.write("\x1b[F\x1b[2K" * drawn)
                sys.stderr.flush()
            return sweep
        time.sleep(interval)
