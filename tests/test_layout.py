"""The layout holds: each concern in its package, no import cycles (imports inside
functions count), stages independent of one another, files and the RL driver small."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("pipeline", "stages", "rl", "engine", "demo", "bench")
STAGE_MODULES = ("base", "sft", "rm", "rlhf", "evaluation")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """Project modules `path` imports anywhere in it, functions included."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([node.module] if node.module else []))
            # `from engine import sampling` names a module; `from engine.x import f` a name in one
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        out.update(t for t in targets if t in known)
    out.discard(name)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, name, known) for name, path in known.items()}


def test_there_is_no_import_cycle_even_through_imports_inside_functions():
    edges, index, low, stack, on_stack, cycles = graph(), {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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
                cycles.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_each_layer_imports_only_what_is_below_it():
    edges = graph()
    for name, targets in edges.items():
        top = name.split(".")[0]
        if top == "rl":
            assert all(t.startswith("rl") for t in targets), (name, targets)
        if top == "engine":
            assert not any(t.startswith(("stages", "demo", "bench")) for t in targets), (name, targets)
            assert all(t in ("pipeline.config", "pipeline.errors", "pipeline.checkpoint", "pipeline.fallbacks") for t in targets if t.startswith("pipeline")), (name, targets)
        if top == "pipeline" and name != "pipeline.cli":
            assert not any(t.startswith(("stages", "demo", "bench")) for t in targets), f"{name} imports {targets}: only the CLI meets the registry"
        if top == "demo":
            assert all(t.startswith("demo") or t == "engine.sampling" for t in targets), (name, targets)


@pytest.mark.parametrize("stage", STAGE_MODULES)
def test_stages_never_import_one_another(stage):
    targets = graph()[f"stages.{stage}"]
    for target in targets:
        if target.startswith("stages"):
            own = target.startswith(("stages.shared", f"stages.{'eval' if stage == 'evaluation' else stage}_"))
            assert own, f"stages.{stage} imports {target}: share it through stages/shared instead"


def test_no_source_file_is_over_about_400_lines():
    long = {str(path.relative_to(ROOT)): n for path in modules().values() if (n := len(path.read_text().splitlines())) > 420}
    assert not long, long


def test_the_rl_driver_reads_in_functions_of_about_a_screen():
    tree = ast.parse((ROOT / "engine" / "driver.py").read_text())
    long = {f.name: f.end_lineno - f.lineno + 1 for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.end_lineno - f.lineno + 1 > 60}
    assert not long, long


def test_every_file_the_readme_layout_names_exists_where_it_says():
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## Layout") :].split("```")[1]
    folder, named = None, []
    for line in block.splitlines():
        head = line.split()[0] if line.strip() else ""
        if head.endswith("/") and not line.startswith(" "):
            folder = head.rstrip("/")
        for name in re.findall(r"[\w/]+\.py\b", line):
            named.append((folder, name))
    missing = [f"{folder}/{name}" for folder, name in named if not (ROOT / name).exists() and not list((ROOT / folder).rglob(name))]
    assert named and not missing, missing
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists() and p.name != "tests"}
    assert packages <= {folder.rstrip("/") for folder in re.findall(r"^(\w+)/", block, re.M)}, "every package has its line"
