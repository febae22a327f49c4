"""The layering holds: no import cycle anywhere in llmprune/, and the engine never imports a UI library.

The import graph is read from the source with `ast`, so nothing is imported and
the test takes milliseconds. It counts every import, also those inside functions
(the CLI's lazy engine imports, the engine's own deferred imports): an import
moved into a function to dodge an import-time error still ties the two modules
together both ways, so it is a cycle all the same. Imports under
`if TYPE_CHECKING:` count too (they are the same dependency, for readers).
Importing `a.b.c` is counted as a dependency on `a.b.c` only, not on the
packages `a` and `a.b` above it; package `__init__` files here are kept cheap
(docstrings, or lazy attributes in llmprune/__init__.py) for that reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "llmprune"
UI_LIBRARIES = ("typer", "click", "rich", "textual")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """Every module `name` imports, absolute names, wherever the import statement is."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            # `from pkg import mod` imports the module pkg.mod when there is one
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {other for other in _imports(name, path) if other in modules and other != name}
        for name, path in modules.items()
    }


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "llmprune.engine.pruning.pipeline" in graph["llmprune.cli.prune"]  # imported inside prune_command
    assert "llmprune.cli.app" in graph["llmprune.__main__"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_anywhere_in_llmprune():
    assert find_cycles(import_graph()) == []  # strict: no module is ever excused


def test_no_cycle_between_the_engines_packages():
    def package(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[:3]) if parts[:2] == ["llmprune", "engine"] else name

    graph: dict[str, set[str]] = {}
    for name, others in import_graph().items():
        graph.setdefault(package(name), set()).update(package(o) for o in others if package(o) != package(name))
    for others in list(graph.values()):
        for other in others:
            graph.setdefault(other, set())
    assert (
        find_cycles(graph) == []
    )  # e.g. io never imports diagnose; evaluate and diagnose stream through walk, not pruning


# the pruning package's wings, bottom to top: criteria, then allocation (which reads scores), then the cut
# (which takes an allocation and scores units); route, pipeline, config, result, preflight, analysis on top
PRUNING = "llmprune.engine.pruning"
WINGS = ("scores", "allocate", "cut")


def _wing(name: str) -> str | None:
    """scores | allocate | cut | top for a module of the pruning package; None outside it."""
    if not name.startswith(PRUNING + "."):
        return "top" if name == PRUNING else None
    part = name[len(PRUNING) + 1 :].split(".")[0]
    return part if part in WINGS else "top"


def test_the_pruning_package_has_its_wings():
    found = {_wing(name) for name in _modules()} - {None}
    assert found == {*WINGS, "top"}


def test_no_import_runs_back_up_between_the_pruning_wings():
    order = {wing: rank for rank, wing in enumerate((*WINGS, "top"))}
    upward = sorted(
        f"{name} ({_wing(name)}) -> {other} ({_wing(other)})"
        for name, others in import_graph().items()
        if _wing(name) is not None
        for other in others
        if _wing(other) is not None and order[_wing(other)] > order[_wing(name)]
    )
    assert upward == []


def test_the_wing_check_sees_an_upward_import():
    assert _wing("llmprune.engine.pruning.scores.units") == "scores"
    assert _wing("llmprune.engine.pruning.cut.layer_pass") == "cut"
    assert _wing("llmprune.engine.pruning.pipeline") == "top"
    assert _wing("llmprune.engine.io.architecture") is None


@pytest.mark.parametrize("name", sorted(name for name in _modules() if name.startswith("llmprune.engine")))
def test_the_engine_imports_no_ui_library(name):
    used = {module for module in _imports(name, _modules()[name]) if module.split(".")[0] in UI_LIBRARIES}
    assert used == set(), (
        f"{name} imports {sorted(used)}: the engine returns result objects; rendering belongs in llmprune/ui or"
        " llmprune/cli"
    )


def test_test_folders_are_the_three_groups():
    # a test file directly in tests/ still runs (testpaths = tests); its place is tests/unit (engine),
    # tests/cli (commands, UI) or tests/e2e (whole pipelines, real model)
    folders = {
        path.parent.relative_to(REPO_ROOT / "tests").as_posix() for path in (REPO_ROOT / "tests").rglob("test_*.py")
    }
    assert folders <= {".", "unit", "cli", "e2e"}


def test_architecture_doc_describes_every_engine_package():
    doc = (REPO_ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    engine = PACKAGE / "engine"
    packages = [f"engine/{p.name}/" for p in engine.iterdir() if (p / "__init__.py").is_file()]
    assert len(packages) >= 6 and sorted(part for part in packages if f"`{part}`" not in doc) == []


def test_the_engine_imports_nothing_from_the_cli_or_the_ui():
    graph = import_graph()
    wrong = {
        name: sorted(o for o in others if o.startswith(("llmprune.cli", "llmprune.ui")))
        for name, others in graph.items()
        if name.startswith("llmprune.engine")
    }
    assert {name: others for name, others in wrong.items() if others} == {}
