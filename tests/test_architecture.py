"""The package's layers: every import (module level or inside a function) points down, and there are no circles.

Layers, from the bottom: shared utilities (storage, the shard format, processes, progress) → input (reading
records) → backends (the servers and the in-process model) → embed (plan, workers, runner, engines) → the later
phases and the public API (consolidate, export, load, api) → the command line. ``testing`` (the TEI-compatible
test server, synthetic tweets) stands apart: it may use anything, and nothing in the library may use it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = "tweet_embed"

LAYERS: dict[str, int] = {
    "procs": 0,
    "storage": 0,
    "parquet": 0,
    "progress": 0,
    "zstd": 0,
    "_version": 0,
    "input": 1,
    "backends": 2,
    "embed": 3,
    "consolidate": 4,
    "export": 4,
    "load": 4,
    "api": 4,
    "cli": 5,
    "__main__": 5,
    "__init__": 4,  # the package itself re-exports embed_multi (api)
    "testing": 6,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in (SRC / PKG).rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every tweet_embed module this one imports, wherever the import statement is."""
    is_pkg = path.name == "__init__.py"
    package = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            # "from pkg import mod" imports the module pkg.mod; "from mod import name" imports mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t.startswith(PKG) and t != name:
                found.add(t)
    return found


def layer(name: str) -> int:
    parts = name.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    return LAYERS[top]


GRAPH = {n: imports_of(n, p, set(modules())) for n, p in modules().items()}


def test_every_module_has_a_layer() -> None:
    for name in GRAPH:
        assert layer(name) >= 0, name


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_imports_point_down(name: str) -> None:
    up = [t for t in GRAPH[name] if layer(t) > layer(name) and t != PKG]
    assert not up, f"{name} (layer {layer(name)}) imports a higher layer: {up}"


def test_no_import_circles() -> None:
    # Tarjan's strongly connected components: any component of more than one module is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    circles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH.get(v, ()):
            if w not in index:
                visit(w)
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
                circles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_the_walk_sees_imports_inside_functions() -> None:
    # The cli imports the runner only inside cmd_embed, to start fast; the walk must still see it.
    assert "tweet_embed.embed.runner" in GRAPH["tweet_embed.cli.embed"]
