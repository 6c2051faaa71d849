"""The package's shape, held: folders along the data flow with imports only going down, no import circle,
no module name with a leading underscore, and no function over 60 lines (docs: CONTRIBUTING.md)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*(ROOT / "continual_ft").rglob("*.py"), *(ROOT / "strategies").rglob("*.py")])

#: Floors of the house, the ground first: a module may import its own floor's and the floors below.
FLOORS = {
    "errors": 0,
    "files": 0,
    "state_codec": 1,
    "config": 1,
    "data": 2,
    "model": 3,
    "train": 4,
    "strategies": 5,
    "eval": 5,
    "report": 6,
    "integrations": 6,
    "run": 7,
    "study": 8,
    "cli": 9,
    "runner": 9,  # aliases kept for one release
    "hf": 9,
}
#: The one import that runs up, and why: the registry of ``strategy=`` names (strategies/__init__.py) names
#: Avalanche's loops so that ``strategy=avalanche:ewc`` resolves; no strategy module imports them.
UPWARD = {("strategies/__init__.py", "continual_ft.integrations.avalanche_loops")}


def _room(path: Path) -> str:
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "strategies":
        return "strategies"
    return rel.parts[1].removesuffix(".py")


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = ["continual_ft", *rel.parts] if rel.parts[0] == "strategies" else list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("continual_ft"):
            out.append(node.module)
            out += [f"{node.module}.{a.name}" for a in node.names]  # `from continual_ft.eval import metrics`
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("continual_ft")]
    return out


def test_imports_only_go_down_the_floors():
    up = []
    for path in SOURCES:
        room = _room(path)
        for name in _imports(path):
            target = name.split(".")[1] if name.count(".") else None
            if target in FLOORS and target != room and FLOORS[target] > FLOORS[room]:
                up.append((str(path.relative_to(ROOT)), name))
    modules = {_module(p) for p in SOURCES}
    up = {(f, n if n in modules else n.rsplit(".", 1)[0]) for f, n in up}
    assert {(f, n) for f, n in up if n in modules} == UPWARD


def test_no_import_circle():
    modules = {_module(p): p for p in SOURCES}
    graph = {
        m: {n if n in modules else n.rsplit(".", 1)[0] for n in _imports(p)} & set(modules) - {m}
        for m, p in modules.items()
    }
    # a package's __init__ importing its own modules is how a package speaks; a circle through it is not
    graph = {m: {n for n in deps if not m.startswith(n + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, "import circle: " + " -> ".join([*trail, m, n])
            if n not in state:
                visit(n, [*trail, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_no_module_name_starts_with_an_underscore():
    assert [str(p.relative_to(ROOT)) for p in SOURCES if p.name.startswith("_") and p.name != "__init__.py"] == []


def test_no_function_is_longer_than_60_lines():
    long = [
        f"{p.relative_to(ROOT)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
        for p in SOURCES
        for n in ast.walk(ast.parse(p.read_text()))
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60
    ]
    assert long == []


def test_the_checks_can_fail(tmp_path):
    """The same measures on a made-up module find what they look for."""
    bad = tmp_path / "_x.py"
    bad.write_text("def f():\n" + "    x = 1\n" * 70 + "\nfrom continual_ft.study.compare import compare\n")
    tree = ast.parse(bad.read_text())
    assert [n.end_lineno - n.lineno + 1 for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)] == [71]
    assert _imports(bad) == ["continual_ft.study.compare", "continual_ft.study.compare.compare"]
