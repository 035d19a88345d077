"""The package keeps its layers (docs/architecture.md): the library (the optimizer core and its
helpers at the top of kpg/, then the environments, the trainers and the BenchMARL adapter) never
imports the application (kpg/app/), no layer imports one above it, a module that only the
application uses lives in kpg/app/, and the imports Python runs at import time have no cycle.

Read from the source with ast (nothing is imported), so the test is fast and sees lazy imports
inside functions too; imports under ``if TYPE_CHECKING:`` are annotations, not imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kpg"

# Top to bottom: a module may import its own layer and the layers below it.
LAYERS = ("application", "benchmarl", "trainers", "environments", "library")
SUBPACKAGE_LAYERS = {
    "kpg.app": "application",
    "kpg.benchmarl": "benchmarl",
    "kpg.algos": "trainers",
    "kpg.envs": "environments",
}
# The library's entry points: what users import or run (python -m kpg.info, python -m kpg.benchmarl.run);
# every library module is reached from them without passing through the application.
LIBRARY_ROOTS = ("kpg", "kpg.algos", "kpg.envs", "kpg.benchmarl", "kpg.benchmarl.run", "kpg.info", "kpg.reference")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    if module == "kpg.__main__":  # python -m kpg is the kpg command
        return "application"
    for prefix, name in SUBPACKAGE_LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return name
    return "library"


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, modules: set[str]) -> tuple[set[str], set[str]]:
    """The kpg modules that ``path`` imports: (at import time, anywhere), each as the module itself
    (``from kpg import nn`` imports kpg.nn; ``from kpg.algos import X`` imports kpg.algos)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    at_import, anywhere = set(), set()

    def visit(node: ast.AST, top_level: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            return
        found: set[str] = set()
        if isinstance(node, ast.Import):
            found = {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found = {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}
        found = {module for module in found if module in modules and module != name}
        anywhere.update(found)
        if top_level:
            at_import.update(found)
        inside_function = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, top_level and not inside_function)

    visit(ast.parse(path.read_text(), str(path)), True)
    return at_import, anywhere


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    paths = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
    extensions = {module_name(path) for path in PACKAGE.rglob("*.pyi")}  # kpg._C, described by its stub
    at_import, anywhere = {}, {}
    for module, path in paths.items():
        at_import[module], anywhere[module] = imports_of(path, set(paths) | extensions)
        at_import[module] -= extensions
        anywhere[module] -= extensions
    return at_import, anywhere


AT_IMPORT, ANYWHERE = import_graph()


def test_the_graph_is_read():
    """The reader finds the arrows the layers rest on (a reader that found none would pass every test)."""
    assert "kpg.optim" in ANYWHERE["kpg"] and "kpg.nn" in ANYWHERE["kpg"]
    assert "kpg.app.train" in ANYWHERE["kpg.app.cli"] and "kpg.algos" in ANYWHERE["kpg.app.train"]
    assert "kpg.envs.vmas" in ANYWHERE["kpg.envs"] - AT_IMPORT["kpg.envs"]  # a lazy import


@pytest.mark.parametrize("module", sorted(ANYWHERE))
def test_no_module_imports_a_layer_above_its_own(module):
    """The library never imports the application; the trainers never import the BenchMARL adapter;
    the environments never import the trainers; the optimizer core imports none of them."""
    rank = LAYERS.index(layer(module))
    above = sorted(imported for imported in ANYWHERE[module] if LAYERS.index(layer(imported)) < rank)
    assert not above, f"{module} ({layer(module)}) imports {above}, a layer above its own"


def test_every_library_module_is_reached_without_the_application():
    """A module outside kpg/app/ that only the application imports is part of the application: move it there."""
    reached, frontier = set(), [root for root in LIBRARY_ROOTS if root in ANYWHERE]
    while frontier:
        module = frontier.pop()
        if module not in reached and layer(module) != "application":
            reached.add(module)
            frontier.extend(ANYWHERE[module])
    stranded = sorted(module for module in ANYWHERE if layer(module) != "application" and module not in reached)
    assert not stranded, f"only the application uses {stranded}; move them to kpg/app/"


def test_imports_at_import_time_have_no_cycle():
    """A cycle among the imports Python runs at import time makes the import order matter (a partly
    initialized module); lazy imports inside functions are the sanctioned way round one."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = path[path.index(module) :] + [module]
            pytest.fail(f"import cycle: {' -> '.join(cycle)}")
        if module in done:
            return
        for imported in sorted(AT_IMPORT[module]):
            visit(imported, [*path, module])
        done.add(module)

    for module in sorted(AT_IMPORT):
        visit(module, [])
