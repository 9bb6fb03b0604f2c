"""Write the real-data examples' files under examples/data/, from what this machine has (no download):

  stdlib.txt  ~2.7 MB of English prose for examples/text-stdlib.yaml: the language
              reference's topics that pydoc ships (pydoc_data.topics), then every docstring
              of Python's standard library (module, class, function and method docstrings,
              in source order, the files sorted by path; site-packages left out), so the
              validation split (the end) is docstrings, like most of training. One document
              per docstring or topic, documents separated by a blank line (the blank lines
              inside one are dropped, so `document_separator` finds the documents).
  goog.csv    1,046 trading days (2004-08-20 to 2008-10-14) of Google's share price and
              volume, for examples/timeseries-goog.yaml, from the copy that matplotlib ships
              (mpl-data/sample_data/goog.npz; source: Yahoo Finance). Per day: the overnight
              gap and the day's return (log ratios to the previous close), the day's range
              log(high / low), a proxy for volatility, and log volume.

Deterministic (the same bytes on every run with the same Python and matplotlib) and
idempotent (a file whose bytes would not change is not rewritten):

    .venv/bin/python examples/make_data.py            # both files
    .venv/bin/python examples/make_data.py --only goog.csv

matplotlib comes with the dev extras (`make install`); without it this says so and exits 1.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import math
import re
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
DOCSTRING_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
GOOG_COLUMNS = ["date", "gap", "return", "range", "log_volume"]


class MissingSource(Exception):
    """A source this machine lacks; the message says what to install."""


# -- text: the standard library's docstrings ----------------------------------------------


def _docstrings(node: ast.AST) -> Iterator[str]:
    """The docstrings of `node` and of the classes and functions inside it, in source order."""
    if isinstance(node, DOCSTRING_OWNERS):
        doc = ast.get_docstring(node, clean=True)
        if doc and doc.strip():
            yield doc
    for child in ast.iter_child_nodes(node):
        yield from _docstrings(child)


def _document(text: str) -> str:
    """One document: no blank line inside (a blank line separates documents), no trailing spaces."""
    lines = (line.rstrip() for line in text.strip().splitlines())
    return "\n".join(line for line in lines if line)


def module_files(root: Path) -> list[Path]:
    """The .py files under `root`, sorted by path, without site-packages."""
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)


def stdlib_documents(root: Path) -> Iterator[str]:
    for path in module_files(root):
        try:
            with warnings.catch_warnings():  # test/'s invalid escapes, on purpose
                warnings.simplefilter("ignore")
                tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):  # lib2to3's and test's deliberately broken files
            continue
        yield from (_document(doc) for doc in _docstrings(tree))


def pydoc_topics() -> Iterator[str]:
    from pydoc_data.topics import topics

    yield from (_document(topics[name]) for name in sorted(topics))


def stdlib_text(root: Path | None = None, topics: bool = True) -> str:
    """The corpus: (with `topics`) pydoc's reference topics, then the docstrings under
    `root` (default: this Python's standard library)."""
    root = root or Path(sysconfig.get_paths()["stdlib"])
    documents = [d for d in pydoc_topics() if d] if topics else []
    documents += [d for d in stdlib_documents(root) if d]
    return "\n\n".join(documents) + "\n"


# -- time series: Google's daily prices, as matplotlib ships them ----------------------------


def goog_prices():
    """The structured array of matplotlib's goog.npz (date, open, high, low, close, volume, adj_close)."""
    try:
        from matplotlib import cbook
    except ImportError:
        raise MissingSource("goog.csv needs matplotlib (the dev extras: `make install`, or pip install -e '.[dev]')") from None
    try:
        with cbook.get_sample_data("goog.npz") as archive:
            return archive["price_data"]
    except (OSError, KeyError) as exc:
        raise MissingSource(f"goog.csv: matplotlib's sample data goog.npz is not readable: {exc}") from None


def goog_rows(prices) -> list[list[str]]:
    """One row per day after the first: date, gap, return, range, log_volume (see the module doc)."""
    rows = []
    for prev, day in itertools.pairwise(prices):
        gap = math.log(day["open"] / prev["close"])
        ret = math.log(day["close"] / prev["close"])
        rng = math.log(day["high"] / day["low"])
        rows.append([str(day["date"]), *(f"{v:.6f}" for v in (gap, ret, rng, math.log(day["volume"])))])
    return rows


def goog_csv(prices=None) -> str:
    rows = goog_rows(goog_prices() if prices is None else prices)
    return "\n".join(",".join(r) for r in [GOOG_COLUMNS, *rows]) + "\n"


# -- writing ------------------------------------------------------------------------------------

MAKERS = {"stdlib.txt": stdlib_text, "goog.csv": goog_csv}


def write_if_changed(path: Path, text: str) -> bool:
    """Write `text` to `path` unless it already holds exactly that; True when written."""
    data = text.encode("utf-8")
    if path.exists() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DATA, help="folder to write into (default: examples/data)")
    parser.add_argument("--only", action="append", choices=sorted(MAKERS), help="make only this file (repeatable)")
    args = parser.parse_args(argv)
    for name in args.only or list(MAKERS):
        try:
            text = MAKERS[name]()
        except MissingSource as exc:
            print(f"make_data.py: {exc}", file=sys.stderr)
            return 1
        written = write_if_changed(args.out / name, text)
        print(f"{args.out / name}: {len(text.encode()):,} bytes, {_count(name, text):,} {'documents' if name.endswith('.txt') else 'rows'}"
              f"{'' if written else ' (unchanged)'}")
    return 0


def _count(name: str, text: str) -> int:
    return len(re.findall(r"\n\n", text)) + 1 if name.endswith(".txt") else text.count("\n") - 1


if __name__ == "__main__":
    sys.exit(main())
