"""The package's import graph: no loops, and every import points down the layers.

Read from the source with `ast` (every import, also those inside functions), so a lazy
import cannot hide a loop. `python tests/test_layering.py` prints the graph between folders.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sliceserve"

# Lowest first. A module may import its own folder and any folder of a lower layer.
LAYERS = [
    ["sliceserve", "errors", "uploads", "serving_process"],
    ["model.spec"],
    ["model.quant_format"],
    ["model.spec_checks"],
    ["checkpoint", "kernels", "perplexity", "hf_modeling"],
    ["model"],
    ["fast"],
    ["parallel"],
    ["engine"],
    ["slicing"],
    ["pruning", "quantization", "planning", "finetuning", "harness"],
    ["server"],
    ["commands"],
    ["cli"],
    ["__main__"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The sliceserve modules `path` imports (`from a import b` counts a.b when b is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            if name in known:
                found.add(name)
                break
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, known) - {module_name(p)} for p in paths}


def unit(module: str) -> str:
    """The layer entry a module belongs to: the longest entry that prefixes its name."""
    name = module if module == "sliceserve" else module.removeprefix("sliceserve.")
    entries = [e for layer in LAYERS for e in layer]
    matches = [e for e in entries if name == e or name.startswith(e + ".")]
    return max(matches, key=len) if matches else name


def layer_of(module: str) -> int:
    entry = unit(module)
    return next(i for i, layer in enumerate(LAYERS) if entry in layer)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, imports in graph.items():
        for target in imports:
            same_unit = unit(module) == unit(target)
            if not same_unit and layer_of(target) >= layer_of(module):
                wrong.append(f"{module} -> {target}")
    return sorted(wrong)


def test_every_module_has_a_layer():
    entries = {e for layer in LAYERS for e in layer}
    assert all(unit(m) in entries for m in import_graph())


def test_the_import_graph_has_no_loop():
    assert cycles(import_graph()) == []


def test_every_import_points_down_the_layers():
    assert upward_imports(import_graph()) == []


def test_no_test_module_imports_another():
    """Shared helpers live in conftest.py and the *_support / tiny_models modules, never in a test module."""
    tests = Path(__file__).parent
    test_modules = {p.stem for p in tests.glob("test_*.py")}
    offenders = sorted(
        f"{path.name} imports {name}"
        for path in tests.glob("*.py")
        for name in imported_test_modules(path)
        if name in test_modules
    )
    assert offenders == []


def imported_test_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def folder_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    folders = defaultdict(set)
    for module, imports in graph.items():
        for target in imports:
            if unit(module) != unit(target):
                folders[unit(module)].add(unit(target))
    return folders


if __name__ == "__main__":
    graph = import_graph()
    for source, targets in sorted(folder_graph(graph).items(), key=lambda kv: -layer_of("sliceserve." + kv[0])):
        print(f"{source:12} -> {', '.join(sorted(targets))}")
    print(f"{len(graph)} modules; loops: {cycles(graph) or 'none'}; upward imports: {upward_imports(graph) or 'none'}")
    sys.exit(1 if cycles(graph) or upward_imports(graph) else 0)
