"""The house in layers: every import of the package points down (or stays on its floor), and no module
imports itself back through others. Read from the source (every ``import``, also those inside functions),
so it holds for the lazy imports that keep start-up fast as much as for the top-level ones."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from conftest import REPO

SRC = REPO / "src" / "fedclip_lightning"

# Bottom to top. A module may import from its own layer and those below it, never from one above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("errors", "numerics", "signals", "files", "runlock", "checkpoint", "wandb_files", "weights")),
    ("schema", ("config",)),
    ("data", ("data",)),
    ("model", ("model",)),
    ("server maths", ("aggregation",)),
    ("client", ("fit_plan", "client", "optim", "training", "batched")),
    ("algorithms", ("algorithms",)),
    ("outputs", ("report", "tables", "plots", "loggers")),
    ("loading", ("configure",)),
    ("run driver", ("federation",)),
    ("deployment", ("flower",)),  # the run driver's clients on Flower SuperNodes
    ("commands", ("cli", "sweep", "sweep_results", "slurm", "pretrain", "__main__", "__init__")),
]


def _module(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The package's modules that ``path`` imports (relative or absolute), as dotted names below the package."""
    me = _module(path)
    package = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            elif node.module and node.module.startswith("fedclip_lightning"):
                target = node.module.removeprefix("fedclip_lightning").lstrip(".")
            else:
                continue
            for alias in node.names:  # ``from . import registry`` names a module
                sub = f"{target}.{alias.name}" if target else alias.name
                out.add(sub if _exists(sub) else target)
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("fedclip_lightning.") for a in node.names
                    if a.name.startswith("fedclip_lightning.")}
    return {t for t in out if t and t != me}


def _exists(dotted: str) -> bool:
    p = SRC.joinpath(*dotted.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _layer(module: str) -> int:
    top = module.split(".")[0]
    for i, (_, names) in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: in no layer of tests/test_layers.py; add it to the layer it belongs to")


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) for p in SRC.rglob("*.py")}


def test_every_module_has_a_layer_and_imports_only_downwards():
    upward = []
    for mod, targets in _graph().items():
        for t in sorted(targets):
            if _layer(t) > _layer(mod):
                upward.append(f"{mod} ({LAYERS[_layer(mod)][0]}) imports {t} ({LAYERS[_layer(t)][0]})")
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for t in sorted(graph.get(node, ())):
            if state.get(t) == 1:
                cycles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checks_see_an_upward_import_and_a_cycle(tmp_path, monkeypatch):
    """The reader is no blind spot: a lazy import inside a function is an arrow like any other."""
    pkg = tmp_path / "fedclip_lightning"
    (pkg / "data").mkdir(parents=True)
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "data" / "a.py").write_text("def f():\n    from ..federation import server\n")
    (pkg / "federation").mkdir()
    (pkg / "federation" / "__init__.py").write_text("")
    (pkg / "federation" / "server.py").write_text("from ..data import a\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", pkg)
    with pytest.raises(AssertionError, match=re.escape("data.a (data) imports federation.server (run driver)")):
        test_every_module_has_a_layer_and_imports_only_downwards()
    with pytest.raises(AssertionError, match=re.escape("data.a -> federation.server -> data.a")):
        test_no_import_cycles()


def test_benchmarks_import_only_the_package():
    """A benchmark measures what users install: no module of tests/, no path into it."""
    test_modules = {p.stem for p in (REPO / "tests").glob("*.py")} | {"tests"}
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        tree = ast.parse(path.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not names & test_modules and "tests" not in strings, f"benchmarks/{path.name} reaches into tests/"
