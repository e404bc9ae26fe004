"""The layers: every import of gateway/ and affinity_store/ points down or sideways, none loops.

Walked with `ast`, so imports under `if TYPE_CHECKING:` and inside functions count like any
other. The order, top to bottom:

- the command line (`gateway/cli.py`, `python -m gateway`): runs the gateway, the simulator and
  the benchmarks, so it sits above them all;
- tools (`gateway/simulator`; `bench/` outside the packages): may import any layer below, and
  nothing but the command line imports them;
- operations and the composition root (`gateway/operations`, `gateway/app.py`, which builds
  the runtime and owns the aiohttp application);
- edge, selection, dispatch;
- catalog and config (`gateway/catalog.py`, `gateway/config*.py`);
- routing, the store (`affinity_store`), and the shared pieces (`gateway/shared`) at the bottom.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("gateway", "affinity_store")

# Top to bottom; a module belongs to the first layer with a prefix naming it or its package.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("command line", ("gateway.cli", "gateway.__main__")),
    ("tools", ("gateway.simulator",)),
    ("operations", ("gateway.operations", "gateway.app")),
    ("edge", ("gateway.edge",)),
    ("selection", ("gateway.selection",)),
    ("dispatch", ("gateway.dispatch",)),
    (
        "catalog and config",
        (
            "gateway.catalog",
            "gateway.config",
            "gateway.config_base",
            "gateway.config_fleet",
            "gateway.config_loading",
            "gateway.config_service",
        ),
    ),
    ("routing", ("gateway.routing",)),
    ("store", ("affinity_store",)),
    ("shared", ("gateway.shared",)),
)
# The `gateway` package itself holds only its docstring.
ROOT_PACKAGE = "gateway"
# Outside the packages: never imported by them.
OUTSIDE = ("bench", "tests")


def module_files() -> dict[str, Path]:
    """Every module of the packages by its dotted name (a package by its own name)."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


MODULES = module_files()


def layer_of(module: str) -> int:
    """The index in LAYERS of the layer `module` belongs to (0 is the top)."""
    if module == ROOT_PACKAGE:
        return len(LAYERS) - 1
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
            return index
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def _known(name: str) -> str | None:
    """The module of the packages that `name` (a module or a name inside one) lives in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> Iterator[tuple[str, int]]:
    """(imported name, line) for every import in `module`, wherever in the file it stands."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            for alias in node.names:
                # `from package import module` names the module; otherwise the source is it.
                submodule = f"{source}.{alias.name}"
                yield (submodule if submodule in MODULES else source), node.lineno


def edges() -> dict[str, list[tuple[str, int]]]:
    """Each module's imports of other modules of the packages, with their lines."""
    graph: dict[str, list[tuple[str, int]]] = {}
    for module in MODULES:
        targets: list[tuple[str, int]] = []
        for name, line in imports_of(module):
            target = _known(name)
            if target is not None and target != module:
                targets.append((target, line))
        graph[module] = targets
    return graph


def cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """One import loop (as a path back to its start) per strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target, _ in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group: set[str] = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(group)

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return [_loop_in(sorted(group)[0], group, graph) for group in groups]


def _loop_in(start: str, group: set[str], graph: dict[str, list[tuple[str, int]]]) -> list[str]:
    """A shortest path of imports from `start` back to itself, inside `group`."""
    paths: dict[str, list[str]] = {start: [start]}
    queue = [start]
    while queue:
        module = queue.pop(0)
        for target, _ in graph[module]:
            if target == start:
                return [*paths[module], start]
            if target in group and target not in paths:
                paths[target] = [*paths[module], target]
                queue.append(target)
    raise AssertionError(f"no loop through {start}")


def test_every_module_belongs_to_a_layer() -> None:
    """Each module of the packages maps to exactly one named layer."""
    assert len(MODULES) > 100
    for module in MODULES:
        layer_of(module)


def test_no_module_imports_a_higher_layer() -> None:
    """No import, type-only or inside a function included, reaches a layer above its module's."""
    upward = [
        f"{module}:{line} ({LAYERS[layer_of(module)][0]}) imports {target} "
        f"({LAYERS[layer_of(target)][0]})"
        for module, targets in edges().items()
        for target, line in targets
        if layer_of(target) < layer_of(module)
    ]
    assert upward == []


def test_no_module_imports_what_lies_outside_the_packages() -> None:
    """The packages never import the benchmarks or the tests."""
    outside = [
        f"{module}:{line} imports {name}"
        for module in MODULES
        for name, line in imports_of(module)
        if name.split(".")[0] in OUTSIDE
    ]
    assert outside == []


def test_no_import_cycle() -> None:
    """No module reaches itself through imports, type-only ones included."""
    assert [" -> ".join(loop) for loop in cycles(edges())] == []


def test_the_walk_sees_type_only_and_function_level_imports() -> None:
    """The walker counts an import under `if TYPE_CHECKING:` and one inside a function."""
    graph = edges()
    assert "gateway.operations.runtime" in [
        target for target, _ in graph["gateway.operations.status"]
    ]
    assert "gateway.simulator" in [target for target, _ in graph["gateway.cli"]]


def test_the_cycle_finder_reports_a_loop_as_a_path() -> None:
    """A loop of three modules comes back as the path that closes it."""
    graph = {"a": [("b", 1)], "b": [("c", 1)], "c": [("a", 1)], "d": [("a", 1)]}
    assert cycles(graph) == [["a", "b", "c", "a"]]
