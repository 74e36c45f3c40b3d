"""The folders show the design: the pure core at the top of ``fmaml/``, the engine in
``fmaml/engine/``, the training shell in ``fmaml/training/``, the benchmark harness in
``fmaml/bench/``; imports point from the shell down to the core, never back; no module imports
another's private name; the core holds no context variable and ``import fmaml`` installs no
import hook."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fmaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fmaml"


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """The package's modules that module ``name`` imports, anywhere in the file: at module
    level, inside a function, or under ``if TYPE_CHECKING:`` (an import for annotations is
    still an arrow between two files). ``from fmaml.x import y`` counts as an import of
    ``fmaml.x.y`` where that is a module, else of ``fmaml.x``."""
    tree = ast.parse(MODULES[name].read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "fmaml"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "fmaml":
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in MODULES else node.module)
    return found - {name}


def package_imports() -> dict[str, set[str]]:
    """``module -> the package's modules it imports`` for every file of the package."""
    return {name: imports_of(name) for name in MODULES}


def kind(name: str) -> str:
    """Which of the kinds of code a module of the package is."""
    if name == "fmaml":
        return "public names"  # fmaml/__init__.py
    if name == "fmaml.training.cli":
        return "command line"
    for folder in ("engine", "training", "bench", "tasks"):
        if name == f"fmaml.{folder}" or name.startswith(f"fmaml.{folder}."):
            return folder
    return "core"  # fmaml/*.py and the models, fmaml/nn/


MAY_IMPORT = {
    "core": {"core"},
    "tasks": {"core", "tasks"},
    "engine": {"core", "engine"},
    "public names": {"core", "tasks", "engine"},  # and the shell's names, loaded on first use
    "training": {"core", "tasks", "engine", "public names", "training"},
    "bench": {"core", "tasks", "engine", "public names", "training", "bench"},
    # the CLI's `bench` command runs the harness: the one arrow from the shell into bench
    "command line": {"core", "tasks", "engine", "public names", "training", "bench"},
}
"""Which kinds of code each kind may import: from the shell down to the core."""


# --- the folders ---------------------------------------------------------------------------


def test_the_core_imports_neither_the_engine_nor_the_shell_nor_bench():
    """At module level or inside a function: the core (and the data) never reaches up."""
    above = ("fmaml.engine", "fmaml.training", "fmaml.bench")
    reaching_up = {
        name: sorted(m for m in imported if m == "fmaml" or m.startswith(above))
        for name, imported in package_imports().items()
        if kind(name) in ("core", "tasks")
    }
    assert {name: up for name, up in reaching_up.items() if up} == {}


def test_imports_point_from_the_shell_down_to_the_core():
    wrong = {
        name: sorted(m for m in imported if kind(m) not in MAY_IMPORT[kind(name)])
        for name, imported in package_imports().items()
    }
    assert {name: up for name, up in wrong.items() if up} == {}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every loop of imports found by a depth-first walk, each as ``[a, b, ..., a]``;
    ``fmaml/__init__.py``, which every file's import runs first, aside."""
    cycles: list[list[str]] = []
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        for target in sorted(graph.get(name, ())):
            if target == "fmaml":
                continue
            if target in path:
                cycles.append([*path[path.index(target) :], target])
            elif target not in done:
                visit(target, [*path, target])
        done.add(name)

    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    return cycles


def test_the_cycle_check_finds_long_loops():
    """(The package itself is checked in tests/test_cli_errors.py.)"""
    graph = {"a": {"b"}, "b": {"c", "fmaml"}, "c": {"a"}, "fmaml": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c", "a"]]
    assert import_cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


# --- private names ------------------------------------------------------------------------


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(name: str) -> list[str]:
    """Where module ``name`` uses another module's private name: ``from fmaml.x import _y``,
    a private module ``fmaml._x``, or ``fmaml.x._y`` / ``alias._y`` for an imported module."""
    tree = ast.parse(MODULES[name].read_text())
    found, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "fmaml":
                    aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "fmaml":
            if any(_private(part) for part in node.module.split(".")):
                found.append(f"line {node.lineno}: from {node.module} import ...")
            for a in node.names:
                if _private(a.name):
                    found.append(f"line {node.lineno}: from {node.module} import {a.name}")
                elif f"{node.module}.{a.name}" in MODULES:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            owner = ast.unparse(node.value)
            module = aliases.get(owner, owner if owner.split(".")[0] == "fmaml" else None)
            if module is not None and module != name:
                found.append(f"line {node.lineno}: {owner}.{node.attr}")
    return found


def test_no_module_uses_another_module_s_private_name():
    uses = {name: private_uses(name) for name in MODULES}
    assert {name: found for name, found in uses.items() if found} == {}


def test_the_private_name_check_sees_each_way_of_reaching_in(tmp_path, monkeypatch):
    source = (
        "import fmaml.engine.strategy as s\n"
        "from fmaml.training import train\n"
        "from fmaml.objectives import _stack_weights\n"
        "from fmaml import _private_module\n"
        "import fmaml.engine.strategy\n"
        "def f():\n"
        "    return s._Job, train._helper, fmaml.engine.strategy._slice, s.Strategy, s.__name__\n"
    )
    monkeypatch.setitem(MODULES, "fmaml.example", tmp_path / "example.py")
    (tmp_path / "example.py").write_text(source)
    assert private_uses("fmaml.example") == [
        "line 3: from fmaml.objectives import _stack_weights",
        "line 4: from fmaml import _private_module",
        "line 7: s._Job",
        "line 7: train._helper",
        "line 7: fmaml.engine.strategy._slice",
    ]


# --- what `import fmaml` loads, and what it leaves alone --------------------------------------


def test_import_fmaml_loads_the_core_and_the_engine_only():
    code = "import sys, fmaml\nprint(sorted(m for m in sys.modules if m.startswith('fmaml')))\n"
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])  # this checkout's
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    loaded = ast.literal_eval(done.stdout.strip())
    assert "fmaml.engine.strategy" in loaded and "fmaml.objectives" in loaded
    assert {kind(m) for m in loaded} == {"public names", "core", "tasks", "engine"}
    assert "fmaml.tasks.images" not in loaded  # PIL: loaded with its names


def test_the_imports_of_a_module_count_typing_only_and_function_imports(tmp_path, monkeypatch):
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from fmaml.engine import strategy\n"
        "def f():\n"
        "    import fmaml.training.train\n"
        "    from fmaml.objectives import meta_loss\n"
    )
    (tmp_path / "probe.py").write_text(source)
    monkeypatch.setitem(MODULES, "fmaml.probe", tmp_path / "probe.py")
    assert imports_of("fmaml.probe") == {
        "fmaml.engine.strategy",
        "fmaml.training.train",
        "fmaml.objectives",
    }


CORE = sorted(p for p in PACKAGE.glob("*.py"))
"""The core's modules: ``fmaml/*.py``."""


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_the_core_holds_no_context_variable(path):
    """A choice the engine makes is an explicit argument, never a context variable."""
    source = path.read_text()
    assert "contextvars" not in source and "ContextVar" not in source, path.name


def test_import_fmaml_leaves_the_import_machinery_as_it_was():
    """No import hook: ``sys.meta_path`` after ``import fmaml`` holds what the standard
    library and the editable install put there, the same finders of the same types."""
    code = (
        "import sys\n"
        "before = [type(f).__qualname__ for f in sys.meta_path]\n"
        "import fmaml\n"
        "after = [type(f).__qualname__ for f in sys.meta_path]\n"
        "print(repr((before, after)))\n"
    )
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])  # this checkout's
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    before, after = ast.literal_eval(done.stdout.strip())
    assert len(after) == len(before) and after == before
    assert not hasattr(fmaml, "_MOVED")


def test_fmaml_bench_keeps_its_names():
    import fmaml.bench
    import fmaml.bench.harness as harness

    defined = {
        n
        for n, v in vars(harness).items()
        if not n.startswith("_")
        and not isinstance(v, type(harness))
        and getattr(v, "__module__", harness.__name__) == harness.__name__
        and n not in ("annotations", "F")
    }
    assert set(fmaml.bench.__all__) == defined
    assert all(getattr(fmaml.bench, n) is getattr(harness, n) for n in fmaml.bench.__all__)
