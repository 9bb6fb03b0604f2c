"""The `unroll` command: one entry point, one sub-command per role or action (SPEC §6).

Each sub-command's module is imported only when it runs, so `unroll train` needs no
service dependencies at start-up and `unroll --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys


def _db(subparsers) -> None:
    p = subparsers.add_parser("db", help="database maintenance")
    db_sub = p.add_subparsers(dest="db_command", required=True)
    up = db_sub.add_parser("upgrade", help="apply migrations (to head by default)")
    up.add_argument("revision", nargs="?", default="head")
    up.set_defaults(func=_db_upgrade)


def _db_upgrade(args: argparse.Namespace) -> int:
    from service.db.migrate import upgrade

    upgrade(revision=args.revision)
    print(f"database upgraded to {args.revision}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from trainer import cli as train_cli

    parser = argparse.ArgumentParser(prog="unroll", description="Truncated-BPTT training for recurrent networks.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    train_cli.add_parser(subparsers)
    _db(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
