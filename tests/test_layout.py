"""The layout's contracts, checked on the source: who may import whom, and no import cycles."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("nas", "supernets")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Project modules ``path`` imports anywhere (top level or inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                base = ".".join(parent[: len(parent) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            # the longest prefix that is a project module
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name and t.split(".")[0] in PACKAGES:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            # a package's __init__ re-exporting its own modules is not a cycle of ideas
            if w not in graph or (v.startswith(w + ".")):
                continue
            if w not in index:
                visit(w)
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

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_supernets_never_imports_nas():
    bad = {m: sorted(d for d in deps if d.startswith("nas")) for m, deps in _graph().items()
           if m.startswith("supernets")}
    assert {m: d for m, d in bad.items() if d} == {}


def test_strategies_and_library_code_do_not_import_apps_or_benchmarks():
    """Strategies, latency, data, export and report code never reach into the apps or the benchmarks,
    and no strategy reaches into another strategy (shared code lives in base and knapsack/engine/predictor)."""
    shared = {"nas.strategies.base", "nas.strategies.knapsack", "nas.strategies.engine", "nas.strategies.predictor",
              "nas.strategies"}
    for module, deps in _graph().items():
        if module.startswith(("nas.apps", "nas.bench")):
            continue
        assert not [d for d in deps if d.startswith(("nas.apps", "nas.bench"))], module
        if module.startswith("nas.strategies.") and module not in shared:
            other = [d for d in deps if d.startswith("nas.strategies.") and d not in shared]
            assert other == [], f"{module} imports {other}"


def test_the_packages_import_cleanly_in_a_fresh_interpreter():
    """``import nas, supernets`` and every app module, in a new process (no test state)."""
    code = ("import nas, supernets, nas.apps.search, nas.apps.retrain, nas.apps.lut, nas.apps.bench, nas.apps.prune, "
            "nas.prune, "
            "nas.latency, nas.strategies.proxyless, nas.strategies.ddpnas, nas.strategies.slimmable, nas.data")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
