"""The import graph: no cycles between the parts of p402_tui, and arrows that point down.

Read from the source with `ast`, so every import counts: those inside functions and
those under `if TYPE_CHECKING:` as much as those at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import p402_tui

ROOT = Path(p402_tui.__file__).parent
# What each part may import besides itself; the parts not listed sit above all of these.
BELOW = {
    "core": set(),
    "providers": {"core"},
    "store": {"core"},
    "sim": {"core"},
    "cache": {"core", "store"},
    "persistence": {"core", "store", "cache"},
    "service": {"core", "store", "policy"},
    "client": {"core", "service"},
    "policy": {"core", "store"},
}
# The front ends: each reaches sessions, spend, decisions and keys through `service`, never the store.
FRONT_ENDS = ("gateway", "cli", "tui")


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = ("p402_tui", *path.relative_to(ROOT).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The p402_tui modules `name` imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            # A package is imported before its modules anyway: a module naming its own package
            # (`from . import http`) adds no order between them.
            if target and target != name and not name.startswith(f"{target}."):
                found.add(target)
    return found


def part(module: str) -> str | None:
    """A module's part: the top-level module or package of p402_tui it belongs to."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else None


def graphs() -> tuple[dict[str, set[str]], dict[str, dict[str, set[str]]]]:
    """(module -> modules it imports, part -> {part it imports: the modules that do})."""
    known = modules()
    by_module = {name: imports(name, path, known) for name, path in known.items()}
    by_part: dict[str, dict[str, set[str]]] = {}
    for name, targets in by_module.items():
        for target in targets:
            a, b = part(name), part(target)
            if a and b and a != b:
                by_part.setdefault(a, {}).setdefault(b, set()).add(f"{name} -> {target}")
    return by_module, by_part


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def test_the_parts_import_each_other_without_a_cycle():
    _, by_part = graphs()
    assert {"core", "providers", "store", "cache", "persistence", "service", "gateway", "tui", "cli", "runtime"} <= (
        set(by_part) | {b for targets in by_part.values() for b in targets}
    )
    found = cycles({a: set(targets) for a, targets in by_part.items()})
    why = {f"{a} -> {b}": sorted(by_part[a][b]) for c in found for a in c for b in by_part.get(a, {}) if b in c}
    assert found == [], why


def test_arrows_point_down():
    _, by_part = graphs()
    upward = {
        f"{a} -> {b}": sorted(by_part[a][b]) for a, allowed in BELOW.items() for b in by_part.get(a, {}) if b not in allowed
    }
    assert upward == {}


def test_front_ends_reach_the_store_only_through_the_service():
    _, by_part = graphs()
    assert {f: sorted(by_part.get(f, {}).get("store", ())) for f in FRONT_ENDS} == {f: [] for f in FRONT_ENDS}
    assert all("service" in by_part.get(f, {}) for f in FRONT_ENDS)


def test_the_wire_families_and_their_base_import_each_other_without_a_cycle():
    by_module, _ = graphs()
    low_layers = {m: {t for t in ts if part(t) in BELOW} for m, ts in by_module.items() if part(m) in BELOW}
    assert cycles(low_layers) == []


def test_a_cycle_is_found_when_there_is_one():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]
