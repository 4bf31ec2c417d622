"""The package layout shows the architecture: no import circles, nothing loose at the root.

The import walk reads every module's source with :mod:`ast` (imports at the top, inside
functions and under ``TYPE_CHECKING`` alike: a circle hidden behind a lazy import is still a
circle in the design) and resolves each to the package's own modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "permamesh"
ROOT_MODULES_ALLOWED = {"__init__", "__main__", "cli", "errors", "identity", "transport"}
MISSION_PACKAGES = {"workers", "routing", "overlay", "directory", "verify", "committee", "scheduler", "containers"}


def _modules(root: Path) -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_pkg)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``from a import b`` counts a.b if a module)."""
    mods = _modules(root)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, (path, is_pkg) in mods.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(r for a in node.names if (r := resolve(a.name)))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod if is_pkg else mod.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    target = base + ("." + node.module if node.module else "")
                else:
                    target = node.module or ""
                if not target.startswith(root.name):
                    continue
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    dep = full if full in mods else resolve(target)
                    if dep:
                        deps.add(dep)
        deps.discard(mod)
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_the_checker_finds_a_planted_circle(tmp_path):
    pkg = tmp_path / "permamesh"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "one.py").write_text("from permamesh.a.two import X\n")
    (pkg / "a" / "two.py").write_text("def f():\n    from permamesh.a import one\n")
    (pkg / "a" / "three.py").write_text("from permamesh.a.one import Y\n")
    assert cycles(import_graph(pkg)) == [["permamesh.a.one", "permamesh.a.two"]]


def test_no_import_circle_between_modules():
    assert cycles(import_graph()) == []


def test_only_the_entry_and_leaf_modules_sit_at_the_package_root():
    loose = {p.stem for p in ROOT.glob("*.py")} - ROOT_MODULES_ALLOWED
    assert not loose, f"move these into the package of what they are: {sorted(loose)}"


@pytest.mark.parametrize("name", sorted(MISSION_PACKAGES))
def test_every_mission_part_is_a_package_with_a_map(name):
    init = ROOT / name / "__init__.py"
    assert init.is_file(), f"permamesh/{name}/ is missing"
    doc = ast.get_docstring(ast.parse(init.read_text()))
    assert doc and len(doc.splitlines()) >= 3, f"permamesh/{name}/__init__.py needs a docstring that maps the package"


def test_public_names_keep_working():
    import permamesh
    from permamesh.client import AsyncClient, Client
    from permamesh.overlay.sender import OverlayClient, OverlayConfig

    assert permamesh.Client is Client
    assert permamesh.AsyncClient is AsyncClient
    assert permamesh.OverlayClient is OverlayClient
    assert OverlayConfig().k == 3
