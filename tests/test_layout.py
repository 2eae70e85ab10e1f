"""The rules of the house (README, "Where things live"), checked on the source tree.

- no import circle among vlab's modules (imports at module level, as Python runs them);
- nothing outside `vlab/vmm/` imports the cffi extension `_native`, nor reads a handle `._h`;
- no Python file over 1,000 lines outside `vlab/analysis/`;
- the experiments import only public names of each other's modules (no `from .exits import _x`).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*(ROOT / "vlab").rglob("*.py"), *(ROOT / "experiments").glob("*.py")])


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "experiments":
        parts = ["vlab", *parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module(p): p for p in SOURCES}


def _top_level_imports(path: Path) -> set[str]:
    """vlab modules imported when `path` is imported: module-level statements, not the ones
    inside functions or under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If):
                test = ast.unparse(node.test)
                if "TYPE_CHECKING" not in test:
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for h in node.handlers:
                    visit(h.body)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name.startswith("vlab"))
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                    and node.module.startswith("vlab"):
                out.add(node.module)
                out.update(f"{node.module}.{a.name}" for a in node.names)

    visit(tree.body)
    return {m for m in out if m in MODULES}


def _graph() -> dict[str, set[str]]:
    graph = {m: _top_level_imports(p) for m, p in MODULES.items()}
    # importing a module imports its packages first
    for m in list(graph):
        for dep in list(graph[m]):
            parts = dep.split(".")
            for i in range(2, len(parts)):
                pkg = ".".join(parts[:i])
                if pkg in MODULES and pkg != m and not m.startswith(pkg + "."):
                    graph[m].add(pkg)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_the_graph_sees_imports():
    g = _graph()
    assert "vlab.vmm.vm" in g["vlab.vmm.machine"] or "vlab.vmm.kvm" in g["vlab.vmm.machine"]
    assert "vlab.results" in g["vlab.compare"]


def test_no_import_circle_among_vlab_modules():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_native_binding_stays_inside_vmm(path: Path):
    if path.is_relative_to(ROOT / "vlab" / "vmm"):
        return
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [getattr(node, "module", None) or ""] + [a.name for a in node.names]
            assert not any(n.endswith("_native") or "._native" in n for n in names), \
                f"{path.name}:{node.lineno} imports the native binding"
        if isinstance(node, ast.Attribute) and node.attr == "_h":
            raise AssertionError(f"{path.name}:{node.lineno} reads a native handle (._h)")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_python_file_over_a_thousand_lines_outside_analysis(path: Path):
    if path.is_relative_to(ROOT / "vlab" / "analysis"):
        return
    n = len(path.read_text().splitlines())
    assert n <= 1000, f"{path.relative_to(ROOT)} has {n} lines"


def test_experiments_import_no_private_name_of_another_experiment_module():
    for path in (ROOT / "experiments").glob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith("vlab.experiments."):
                target = node.module.rsplit(".", 1)[1]
                if target.startswith("_"):
                    continue        # a private helper module of the package is fine
                bad = [a.name for a in node.names if a.name.startswith("_")]
                assert not bad, f"{path.name}:{node.lineno} takes {bad} from {node.module}"
