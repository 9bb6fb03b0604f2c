"""The tree keeps its architecture (docs/architecture.md): the import contracts of
pyproject.toml hold, no import cycle exists anywhere (module by module, counting imports
inside functions and under TYPE_CHECKING), no private name crosses modules, no module of
ours is imported by a string, and no product module grows past 500 lines; the pages drawn from the code are current."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("service", "workers", "trainer")
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def test_the_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache", "--no-logo"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: the components of more than one module (or a module
    that imports itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in edges.get(node, ()):
                        components.append(sorted(component))
    return components


def test_strongly_connected_finds_cycles():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_anywhere():
    graph = grimp.build_graph(*PACKAGES, exclude_type_checking_imports=False, cache_dir=None)
    edges = {module: graph.find_modules_directly_imported_by(module) for module in graph.modules}
    # A package's __init__ importing its own submodules (a re-export) is not a cycle unless
    # a submodule imports the package back; grimp records both directions as plain edges.
    assert strongly_connected(edges) == []


def test_no_private_name_is_imported_across_modules():
    crossings = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                crossings += [f"{name}: from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
            if isinstance(node, ast.Import | ast.ImportFrom):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                crossings += [f"{name}: import {m}" for m in modules if any(p.startswith("_") and p != "__future__" for p in m.split(".")) and m.split(".")[0] in PACKAGES]
    assert crossings == []


def test_no_module_of_ours_is_imported_by_a_string():
    strings = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called in ("import_module", "__import__"):
                    strings.append(f"{name}: {ast.unparse(node)}")
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                head = node.value.split(":")[0]
                if head.count(".") >= 1 and head.split(".")[0] in PACKAGES and head in _modules() and ":" in node.value:
                    strings.append(f"{name}: {node.value!r}")
    assert strings == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_product_module_is_over_500_lines(package):
    long = {name: n for name, path in _modules().items() if name.split(".")[0] == package and (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_pages_drawn_from_the_code_are_current():
    # docs/architecture.md's picture of the import graph, docs/operations.md's limits table
    result = subprocess.run([sys.executable, str(ROOT / "docs" / "generated.py"), "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
