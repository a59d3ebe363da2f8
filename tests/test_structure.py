"""The house's structure (DESIGN.md, Layout): the serving packages never import training/, and no import
cycle exists among the project's modules. Both read the source with ast, so they see imports inside
functions too (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("samplers", "search", "models", "server", "training", "bench")
SERVING = ("samplers", "search", "models", "server")
KNOWN_CYCLES: list[list[str]] = []  # none: a cycle that must be tolerated for a while is listed here


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if "_pb2" not in path.name:
                mods[_module_name(path)] = path
    return mods


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports: `import a.b` -> a.b; `from a import b` -> a.b if that is a module,
    else a; relative imports resolved against the module's package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a non-module attribute: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_serving_packages_import_nothing_from_training():
    graph = import_graph()
    offenders = sorted(f"{m} -> {t}" for m, targets in graph.items() if m.split(".")[0] in SERVING
                       for t in targets if t.split(".")[0] == "training")
    assert offenders == []


def test_serving_packages_need_no_training_only_dependency():
    """scikit-learn, matplotlib and torchmetrics come with the `train` extra only (pyproject.toml)."""
    train_only = {"sklearn", "matplotlib", "torchmetrics"}
    offenders = []
    for name, path in _modules().items():
        if name.split(".")[0] not in SERVING:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                roots = {node.module.split(".")[0]}
            else:
                continue
            offenders += [f"{name} imports {r}" for r in sorted(roots & train_only)]
    assert offenders == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_checks_can_fail():
    """The graph sees function-level and relative imports, and the cycle finder reports a planted cycle."""
    graph = import_graph()
    assert "samplers.registry" in graph["samplers.ode"]  # `from .registry import register`
    assert "models.loading" in graph["training.evaluate"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
