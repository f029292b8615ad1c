"""The package's import graph keeps the house plan of `mlcd_vl/__init__.py`: no import circles, and no module imports
from a floor above its own. Every import statement counts: function-local ones and `if TYPE_CHECKING:` ones too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mlcd_vl"
FLOORS = {"vocab": 0, "console": 0, "errors": 0, "presets": 1, "assets": 1, "model": 2, "data": 3, "train": 4,
          "serve": 4, "eval": 4, "plan": 4, "demo": 5, "study": 5, "cli": 6}
# (importer, imported) on one floor: the lmms-eval adapter runs the serving engine; the planner reads the recipe,
# the optimizer groups, the sampler and the DeepSpeed JSON as training makes them; the CPU study the demo's stages.
SIBLINGS = {("eval", "serve"), ("plan", "train"), ("study", "demo")}


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def import_graph() -> dict[str, set[str]]:
    names = module_names()

    def owner(name: str) -> str:
        while name not in names:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in names.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {owner(a.name) for a in node.names if a.name.startswith("mlcd_vl")}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("mlcd_vl"):
                targets |= {owner(f"{node.module}.{a.name}") for a in node.names}
        graph[name] = targets - {name, "mlcd_vl"}
    return graph


def area(name: str) -> str:
    return name.split(".")[1] if "." in name else "root"


def test_no_import_circles():
    graph, circles, done, path = import_graph(), [], set(), []

    def visit(node: str) -> None:
        if node in path:
            circles.append(path[path.index(node):] + [node])
            return
        if node in done:
            return
        path.append(node)
        for target in sorted(graph[node]):
            visit(target)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
    assert circles == []


def test_no_import_runs_up_the_house():
    graph = import_graph()
    assert set(map(area, graph)) <= set(FLOORS) | {"root"}, "a new part of the package needs a floor in FLOORS"
    upward = [(source, target) for source, targets in graph.items() for target in targets
              if area(source) != "root" and area(source) != area(target)
              and (FLOORS[area(target)] > FLOORS[area(source)]
                   or FLOORS[area(target)] == FLOORS[area(source)] and (area(source), area(target)) not in SIBLINGS)]
    assert upward == []


def test_only_the_cli_reaches_the_demo_and_the_study_and_nothing_imports_the_cli():
    from mlcd_vl.cli import COMMANDS

    graph = import_graph()
    wings = {"demo": {"demo", "study"}, "study": {"study"}}  # the study runs the demo's stages; nothing else may
    assert {s for s, targets in graph.items() for t in targets
            if area(t) in wings and area(s) not in wings[area(t)]} == set()
    assert COMMANDS["demo"][0] == "mlcd_vl.demo.run"  # the CLI loads its subcommands by name
    assert COMMANDS["study"][0] == "mlcd_vl.study.run"
    assert not {s for s, targets in graph.items() if "mlcd_vl.cli" in targets}
