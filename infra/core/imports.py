"""The project's own import graph, read from the source (``ast``), not by importing anything.

Two users: the layering test (``tests/infra/test_layering.py``), which checks that imports only point down, and the
MLflow model logger, which ships exactly the modules the served model can import (the closure of
``inference.mlflow_model``) instead of whole packages.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

PACKAGES = ("model", "data_pipeline", "training", "inference", "infra")


def module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def list_modules(root: str | os.PathLike, packages=PACKAGES) -> dict[str, Path]:
    """module name -> file, for every ``.py`` file of the given top-level packages under ``root``."""
    root = Path(root)
    mods: dict[str, Path] = {}
    for pkg in packages:
        for p in sorted((root / pkg).rglob("*.py")):
            mods[module_name(root, p)] = p
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is one of our modules."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in mods:
            return cand
    return None


def imported_names(path: Path, module: str) -> set[str]:
    """Dotted names a module imports anywhere in its body (functions included), relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_pkg = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
    return names


def import_graph(root: str | os.PathLike, packages=PACKAGES) -> dict[str, set[str]]:
    """module -> the project modules it imports (a module importing a parent package's ``__init__`` excluded)."""
    mods = list_modules(root, packages)
    graph: dict[str, set[str]] = {}
    for m, path in mods.items():
        targets = set()
        for n in imported_names(path, m):
            r = _resolve(n, mods)
            if r and r != m and not m.startswith(r + "."):
                targets.add(r)
        graph[m] = targets
    return graph


def closure(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module that importing ``start`` can load: its imports, transitively, plus each one's parent packages."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parts = m.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in graph)
        todo.extend(graph.get(m, ()))
    return seen


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out
