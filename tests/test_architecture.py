"""The package's shape: no import cycles (lazy imports inside functions count too: they only hide a
cycle), and no private names imported from another module."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bridge", "mappings")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    found = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    found["cli"] = ROOT / "cli.py"
    return found


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(modules: dict[str, Path]) -> dict[str, set[tuple[str, str | None]]]:
    """module -> {(imported module, imported name or None)} for every import statement anywhere."""
    graph: dict[str, set[tuple[str, str | None]]] = {}
    for name, path in modules.items():
        edges: set[tuple[str, str | None]] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update((a.name, None) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(name, node, path.name == "__init__.py")
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    edges.add((sub, None) if sub in modules else (target, alias.name))
        graph[name] = {(m, n) for m, n in edges if m in modules and m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    modules = _modules()
    # A package's __init__ re-exporting its modules is not a dependency of those modules on it.
    graph = {
        m: {t for t, _ in edges if not (m.startswith(t + ".") and modules[t].name == "__init__.py")}
        for m, edges in _imports(modules).items()
    }
    assert _cycles(graph) == []


def test_no_private_names_across_modules():
    offenders = sorted(
        f"{m} imports {t}.{n}"
        for m, edges in _imports(_modules()).items()
        for t, n in edges
        if n and n.startswith("_") and not n.startswith("__")
    )
    assert offenders == []


def test_the_checks_can_fail():
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]


def test_engine_formats_and_checks_receive_the_family():
    """They get a ``ModelFamily`` (``bridge.families``), never a family's own modules or tables."""
    family_specific = ("bridge.families.", "mappings.falcon_h1", "mappings.dims")
    falcon_names = {
        "FALCON_H1",
        "FalconH1Dims",
        "LAYOUTS",
        "params_for",
        "hf_shapes",
        "extra_state_modules",
        "FalconH1Config",
        "FalconH1ForCausalLM",
    }
    offenders = sorted(
        f"{m} imports {t}{'.' + n if n else ''}"
        for m, edges in _imports(_modules()).items()
        if m.startswith(("bridge.engine", "bridge.formats", "bridge.checks"))
        for t, n in edges
        if t.startswith(family_specific) or n in falcon_names
    )
    assert offenders == []
