"""The layering of DESIGN.md, enforced: every import of every module, lazy ones included.

    jobs → cluster → executors → {packing, pipeline} → prefix_tree → ground

A module may import its own package and any package below it; never one above it, never a
sibling on its level (packing and pipeline know nothing of each other), and no set of
modules may import each other in a cycle. The ground is `types`, `errors`, `config`,
`faults` and `model_folder`. `prefixbatch/__main__.py` is the program's entry: it stands
with `jobs`.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import prefixbatch

PACKAGE = Path(prefixbatch.__file__).parent
LEVELS = {"jobs": 5, "cluster": 4, "executors": 3, "packing": 2, "pipeline": 2, "prefix_tree": 1}
GROUND = 0
TORCH_FREE = ("prefix_tree", "packing", "pipeline", "jobs")  # torch only inside executors/


def module_name(root: Path, file: Path) -> str:
    parts = list(file.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(root: Path) -> dict[str, set[str]]:
    """Every prefixbatch module (and third-party top-level name) each module imports, anywhere in it."""
    modules = {module_name(root, f): f for f in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, file in modules.items():
        found: set[str] = set()
        is_package = file.name == "__init__.py"
        for node in _executed(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolved against this module's package
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                for alias in node.names:
                    child = f"{base}.{alias.name}"
                    found.add(child if child in modules else base)
        graph[name] = found
    return graph


def _executed(tree: ast.AST):
    """Every node of the module but what sits under `if TYPE_CHECKING:` (never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                todo.extend(child.orelse)
                continue
            todo.append(child)


def layer(module: str) -> tuple[int, str]:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    top = "jobs" if top == "__main__" else top
    return LEVELS.get(top, GROUND), top


def violations(root: Path) -> list[str]:
    """Upward or sideways imports, torch outside executors/, and import cycles."""
    graph = imports_of(root)
    problems = []
    for source, targets in sorted(graph.items()):
        (level, top) = layer(source)
        for target in sorted(targets):
            if target.split(".")[0] == "torch" and top in TORCH_FREE:
                problems.append(f"{source} imports torch")
            if not target.startswith("prefixbatch.") or top == "__init__":
                continue
            (target_level, target_top) = layer(target)
            if target_top == top:
                continue
            if target_level > level or (target_level == level and level != GROUND):
                problems.append(f"{source} imports {target} (upward or sideways)")
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected sets of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start] & graph.keys())))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child] & graph.keys()))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_layers_import_downward_only_and_without_cycles():
    assert violations(PACKAGE) == []


def test_the_check_fails_on_an_upward_import_and_on_a_cycle(tmp_path):
    copy = tmp_path / "prefixbatch"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    reader = copy / "pipeline" / "reader.py"
    reader.write_text(reader.read_text() + "\n\ndef _late():\n    from prefixbatch.jobs.run import run_job\n")
    tree = copy / "prefix_tree" / "tree.py"
    tree.write_text(tree.read_text() + "\n\ndef _late():\n    from prefixbatch.prefix_tree.plan import Plan\n")
    found = violations(copy)
    assert "prefixbatch.pipeline.reader imports prefixbatch.jobs.run (upward or sideways)" in found
    assert any(p.startswith("import cycle:") and "prefixbatch.prefix_tree.tree" in p for p in found)


def test_only_the_planning_entry_point_plans():
    """`build_plan` and its stages are called inside prefix_tree only; everything else goes
    through `plan_requests`, and executors call neither: they run the plan they are given."""
    stages = {"build_plan", "schedule_groups", "assemble_plan", "cut_shards"}
    callers: dict[str, set[str]] = {}
    for file in PACKAGE.rglob("*.py"):
        name = module_name(PACKAGE, file)
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Call):
                called = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                callers.setdefault(called, set()).add(name)
    for stage in stages:
        assert {m for m in callers.get(stage, ()) if not m.startswith("prefixbatch.prefix_tree")} == set(), stage
    planners = callers.get("plan_requests", set())
    assert planners and not {m for m in planners if m.startswith(("prefixbatch.executors", "prefixbatch.packing"))}
