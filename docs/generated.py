"""The parts of docs/ drawn from the code, kept in one way: each lives between two markers
in its page, and is produced by a function of the code it describes.

    python docs/generated.py          # rewrite every part
    python docs/generated.py --check  # exit 1 if any is out of date (make test runs it)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import architecture  # noqa: E402  (docs/architecture.py, beside this file)
from service.store import limits  # noqa: E402
from trainer import inference  # noqa: E402

# (page, marker name, what goes between `<!-- NAME:begin -->` and `<!-- NAME:end -->`)
PARTS: list[tuple[str, str, Callable[[], str]]] = [
    ("architecture.md", "import-graph", architecture.mermaid),
    ("operations.md", "limits", limits.markdown),
    ("operations.md", "inference-limits", inference.bounds_markdown),
]


def render(text: str, name: str, body: str) -> str:
    head, rest = text.split(f"<!-- {name}:begin -->", 1)
    _, tail = rest.split(f"<!-- {name}:end -->", 1)
    return f"{head}<!-- {name}:begin -->\n{body}\n<!-- {name}:end -->{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a page is out of date")
    args = parser.parse_args()
    stale = []
    for page, name, produce in PARTS:
        path = ROOT / "docs" / page
        current = path.read_text()
        fresh = render(current, name, produce())
        if fresh != current:
            stale.append(f"docs/{page} ({name})")
            if not args.check:
                path.write_text(fresh)
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}; run python docs/generated.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
