"""The engine's layers: imports point down the stack, never up, never in a circle, never into Slicer.

Layers, bottom to top (docs/DESIGN.md has the map): runtime, io, data, model, inference, training,
evaluation, commands, then the entry points at the package root (cli, train, __main__). A module may
import its own sub-package and any layer below it. The package's `__init__` holds only the version.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "SASSRSegment" / "SASSRSegmentLib"
PACKAGE = "SASSRSegmentLib"
LAYERS = ["runtime", "io", "data", "model", "inference", "training", "evaluation", "commands", ""]
FORBIDDEN = {"slicer", "qt", "vtk", "ctk"}
MAX_LINES = 600
MAX_FUNCTION_LINES = 80


def module_name(path: Path, root: Path = ENGINE) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGE, *parts])


def imports(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in `source`, function-local ones included; for
    `from X import a` the module X.a when that is a module of the engine, else X."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for a in node.names:
                found.append(
                    (node.lineno, f"{target}.{a.name}" if _is_module(f"{target}.{a.name}") else target)
                )
    return found


def _is_module(name: str) -> bool:
    if not name.startswith(PACKAGE + "."):
        return False
    path = ENGINE.joinpath(*name.split(".")[1:])
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def layer(module: str) -> int:
    parts = module.split(".")
    sub = parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else ""
    return LAYERS.index(sub)


def problems_of(module: str, source: str, is_package: bool = False) -> list[str]:
    """What `module`'s imports break: an upward import, or any import of Slicer's libraries."""
    found = []
    for line, target in imports(source, module, is_package):
        top = target.split(".")[0]
        if top in FORBIDDEN:
            found.append(f"{module}:{line} imports {target}: the engine must run without Slicer")
        elif top == PACKAGE and target != PACKAGE and layer(target) > layer(module):
            found.append(f"{module}:{line} imports {target}, a higher layer")
    return found


def engine_files() -> list[Path]:
    return sorted(p for p in ENGINE.rglob("*.py") if "__pycache__" not in p.parts)


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in engine_files():
        name = module_name(path)
        targets = imports(path.read_text(), name, path.name == "__init__.py")
        graph[name] = {t for _, t in targets if t.startswith(PACKAGE + ".") and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle found by a depth-first search (each reported once, from where it closes)."""
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_engine_module_imports_upward_or_slicer():
    found = []
    for path in engine_files():
        found += problems_of(module_name(path), path.read_text(), path.name == "__init__.py")
    assert found == []


def test_the_engine_has_no_import_circles():
    assert cycles(import_graph()) == []


def test_the_checks_catch_what_they_are_for():
    """The checks themselves, on made-up modules: an upward import, a Slicer import, a circle."""
    upward = "from ..inference.pipeline import segment_image\n"
    assert problems_of(f"{PACKAGE}.data.cache", upward) == [
        f"{PACKAGE}.data.cache:1 imports {PACKAGE}.inference.pipeline, a higher layer"
    ]
    assert problems_of(f"{PACKAGE}.inference.pipeline", "from ..data import cache\n") == []
    local = "def f():\n    import vtk\n"
    assert problems_of(f"{PACKAGE}.io.geometry", local) == [
        f"{PACKAGE}.io.geometry:2 imports vtk: the engine must run without Slicer"
    ]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_every_sub_package_is_a_layer_and_ships_in_the_wheel():
    packages = sorted(module_name(p) for p in ENGINE.rglob("__init__.py") if "__pycache__" not in p.parts)
    assert [p.split(".")[1] for p in packages if "." in p] == sorted(LAYERS[:-1])
    with open(ROOT / "pyproject.toml", "rb") as f:
        assert sorted(tomllib.load(f)["tool"]["setuptools"]["packages"]) == packages


@pytest.mark.parametrize("path", engine_files(), ids=lambda p: str(p.relative_to(ENGINE)))
def test_files_and_functions_stay_small(path):
    """A file a reader can hold in mind: at most ~600 lines, no function over ~80."""
    source = path.read_text()
    assert source.count("\n") <= MAX_LINES
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []
