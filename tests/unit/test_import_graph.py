"""No import cycles between the parts of ray_crm (its subpackages and top-level modules).

Every import counts, at the top of a file or inside a function (or under TYPE_CHECKING): an import moved into
a function hides a cycle from Python's loader, not from the design.
"""

import ast
import itertools
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "ray_crm"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _part(module: str) -> str:
    """ray_crm.train.rm_trainer -> ray_crm.train; ray_crm.cli -> ray_crm.cli."""
    return ".".join(module.split(".")[:2])


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement may load: the module, and for `from`, each name as a submodule."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the importing module's package
        package = module.split(".")[: len(module.split(".")) - node.level + is_package]
        base = ".".join([*package, *([base] if base else [])])
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def part_graph() -> dict[str, dict[str, set[str]]]:
    """part -> imported part -> the import sites ('file:line') behind that edge."""
    files = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for module, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for name in _imported(node, module, path.name == "__init__.py"):
                while name.count(".") and name not in files:  # ray_crm.config.Config -> ray_crm.config
                    name = name.rpartition(".")[0]
                if name in files and name != "ray_crm" and _part(name) != _part(module):
                    graph[_part(module)][_part(name)].add(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return graph


def find_cycle(graph: dict[str, dict[str, set[str]]]) -> list[str] | None:
    """One cycle [a, b, ..., a] of the graph, or None."""
    state: dict[str, str] = {}  # "open" while on the DFS path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    return next((c for node in sorted(graph) if node not in state and (c := visit(node))), None)


def test_the_cycle_finder_finds_a_cycle_and_the_graph_sees_function_level_imports():
    assert find_cycle({"a": {"b": set()}, "b": {"c": set()}, "c": {"b": set()}}) == ["b", "c", "b"]
    assert find_cycle({"a": {"b": set()}, "b": {}}) is None
    graph = part_graph()
    assert "ray_crm.eval" in graph["ray_crm.train"]  # rm_trainer's validation metrics
    assert "ray_crm.rl" in graph["ray_crm.tune"]  # sweep.py imports grpo_trainer inside a function


def test_ray_crm_has_no_import_cycle_between_its_parts():
    graph = part_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle " + " -> ".join(cycle) + ": " + "; ".join(
        f"{a} -> {b} at {', '.join(sorted(graph[a][b]))}" for a, b in itertools.pairwise(cycle))
