"""The package's module graph: every module imports on its own, no two modules import each other (also
through imports inside functions, which only hide a cycle), and no module reaches into another's private
names."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("merge_core", "evaluators", "search")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(module, imported name or "", line) for every first-party import anywhere in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in known:
            found += [(node.module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names if alias.name in known]
    return found


def graph() -> dict[str, set[str]]:
    """Module → first-party modules it imports; a package's ``__init__`` re-exporting its modules is not an
    edge back from them (importing ``merge_core.engine`` runs ``merge_core/__init__`` first anyway)."""
    known = modules()
    edges = {}
    for name, path in known.items():
        targets = set()
        for module, imported, _ in imports(path, known):
            targets.add(f"{module}.{imported}" if f"{module}.{imported}" in known else module)
        edges[name] = {t for t in targets if t != name and t not in PACKAGES}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_check_finds_a_cycle_through_a_lazy_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_two_modules_import_each_other_even_inside_functions():
    assert cycles(graph()) == []


def test_no_module_imports_another_modules_private_names():
    known = modules()
    offenders = [f"{path.relative_to(REPO)}:{line} imports {module}.{name}"
                 for own, path in known.items() for module, name, line in imports(path, known)
                 if module != own and name.startswith("_") and not name.startswith("__")]
    assert offenders == []


@pytest.mark.slow
@pytest.mark.parametrize("module", sorted(m for m in modules() if not m.endswith("__main__")))  # that one runs
def test_each_module_imports_in_a_fresh_interpreter(module):
    run = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
