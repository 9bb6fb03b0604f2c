"""The layers of docs/architecture.md, drawn from the real import graph (docs/generated.py
puts the drawing in the page).

Each box is a group of modules (a layer, or a package inside one); an arrow A --> B means
some module of A imports some module of B. The groups are listed below; a module belongs
to the longest group that prefixes it. (The arrows carry no counts, so the picture changes
only when a dependency between groups appears or goes.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]

# (group, what it is), top layer first.
GROUPS = [
    ("service.cli", "command line and operations"),
    ("service.api", "HTTP API"),
    ("workers", "dispatcher and Ray tasks"),
    ("service.store", "shared store"),
    ("service.store.db", "database: models, repositories, transitions"),
    ("trainer", "TBPTT engine"),
]


def group_of(module: str) -> str | None:
    matches = [name for name, _ in GROUPS if module == name or module.startswith(name + ".")]
    return max(matches, key=len) if matches else None


def edges() -> dict[tuple[str, str], int]:
    sys.path.insert(0, str(ROOT))
    graph = grimp.build_graph("service", "workers", "trainer", exclude_type_checking_imports=False, cache_dir=None)
    counts: dict[tuple[str, str], int] = {}
    for module in graph.modules:
        source = group_of(module)
        for imported in graph.find_modules_directly_imported_by(module):
            target = group_of(imported)
            if source and target and source != target:
                counts[(source, target)] = counts.get((source, target), 0) + 1
    return counts


def mermaid() -> str:
    ids = {name: name.replace(".", "_") for name, _ in GROUPS}
    lines = ["```mermaid", "flowchart TD"]
    lines += [f'    {ids[name]}["<b>{name}</b><br/>{what}"]' for name, what in GROUPS]
    lines += [f"    {ids[a]} --> {ids[b]}" for a, b in sorted(edges())]
    lines.append("```")
    return "\n".join(lines)
