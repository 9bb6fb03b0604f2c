"""`unroll worker`: the dispatcher role (imports Ray only when it runs)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "worker",
        help="run a dispatcher: take queued jobs and run them on Ray (UNROLL_RAY_ADDRESS, or a local instance)",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from workers.dispatcher import main

    return main()
