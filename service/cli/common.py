"""What every client command shares: the usage error, the --url/--token flags, the client,
reading a config file, and printing an API error."""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta

from service.store import limits
from service.store.lifecycle import TERMINAL_STATE_NAMES

# The job (and sweep) states after which nothing changes: what "follow until it ends" waits for.
TERMINAL = TERMINAL_STATE_NAMES


class UsageError(ValueError):
    """Bad input on the command line or in a file it names: main prints `error: …` and
    exits 2."""


def add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help="API URL (default: UNROLL_URL or the `unroll up` config)")
    p.add_argument("--token", default=None, help="project token (default: UNROLL_TOKEN or the `unroll up` config)")


def open_client(args: argparse.Namespace):
    from service.cli.client import Client

    return Client.from_config(args.url, args.token)


def fail(exc) -> int:
    """Print an API error (with the field it names) and return the exit status 1."""
    where = f" ({exc.field})" if getattr(exc, "field", None) else ""
    print(f"error: {exc.message}{where}", file=sys.stderr)
    return 1


def read_config(path: str) -> dict:
    """The mapping in a YAML or JSON (`.json`) file; UsageError otherwise."""
    from trainer.config import ConfigError, read_config_file

    try:
        return read_config_file(path)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """"90m", "12h", "30d", "52w" (or plain seconds) as a token's lifetime, within
    service.store.limits (one minute to ten years, as the admin route)."""
    number, unit = (text[:-1], text[-1]) if text and text[-1] in _UNITS else (text, "s")
    try:
        value = timedelta(seconds=float(number) * _UNITS[unit])
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a duration such as 90m, 12h, 30d") from None
    if not limits.MIN_TOKEN_LIFETIME_S <= value.total_seconds() <= limits.MAX_TOKEN_LIFETIME_S:
        raise argparse.ArgumentTypeError(f"{text!r}: must be between 1 minute and 10 years")
    return value


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)
