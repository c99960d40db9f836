"""The package reads as the pipeline: imports go core ← methods ← organisms, report ← study ← cli,
never upward, and no module imports itself back through others (no import cycles). Checked on
the source text of every module (lazy imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

import circuitdiff

PKG = Path(circuitdiff.__file__).parent
#: layer of each top-level part; a module may import only parts of its own layer or below
#: (organisms measure their training with methods.accuracy, so they sit above methods)
LAYERS = {"core": 0, "methods": 1, "organisms": 2, "report": 2, "study": 3, "cli": 4,
          "__main__": 4}
#: ``python -m`` entry points inside a part: command lines, so they sit in the cli's layer
ENTRY_POINTS = {"organisms.train": "cli"}
#: known upward imports, each with the change that removes it (an entry that no longer occurs
#: fails the test, so the list cannot go stale)
KNOWN_UPWARD: set[tuple[str, str]] = set()
#: known import cycles (the modules of each), each with the change that removes it
KNOWN_CYCLES: set[frozenset[str]] = set()


def _module_name(path: Path, root: Path = PKG) -> str:
    """Dotted name of the module at ``path`` inside the package at ``root`` (a package is its
    ``__init__``); the package's own ``__init__`` is ``""``."""
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _is_module(dotted: str, root: Path) -> bool:
    p = root.joinpath(*dotted.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _imports(path: Path, root: Path = PKG, top: str = "circuitdiff") -> set[str]:
    """Dotted names (inside the package at ``root``, called ``top``) of the modules the module at
    ``path`` imports, anywhere in its source: ``from pkg import sub`` names the submodule."""
    rel = path.relative_to(root).with_suffix("")
    pkg = list(rel.parts[:-1])
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and (node.module == top or node.module.startswith(top + ".")):
                target = node.module.split(".")[1:]
            else:
                continue
            for a in node.names:
                sub = ".".join(target + [a.name])
                if a.name != "*" and _is_module(sub, root):
                    out.add(sub)
                elif target:
                    out.add(".".join(target))
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".", 1)[1] for a in node.names
                       if a.name.startswith(top + "."))
    return out


def _imported_parts(path: Path) -> set[str]:
    """Top-level circuitdiff parts imported by the module at ``path``."""
    return {m.split(".")[0] for m in _imports(path)}


def _graph(root: Path = PKG, top: str = "circuitdiff") -> dict[str, set[str]]:
    """Import graph of the package at ``root``: module -> the package's modules it imports."""
    return {_module_name(p, root): _imports(p, root, top) - {""} for p in root.rglob("*.py")}


def _cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The import cycles of ``graph``: its strongly connected components of more than one
    module, and modules that import themselves (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = set()
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.add(m)
                    if m == node:
                        break
                if len(comp) > 1 or node in graph.get(node, ()):
                    found.append(frozenset(comp))
    return found


def _layer(module: str) -> int:
    part = ENTRY_POINTS.get(module, module.split(".")[0])
    return LAYERS[part]


def test_imports_never_go_upward():
    bad, seen = [], set()
    for path in PKG.rglob("*.py"):
        module = _module_name(path)
        if module == "":
            continue  # the public API re-exports every layer
        own = _layer(module)
        for part in _imported_parts(path):
            if part in LAYERS and LAYERS[part] > own:
                if (module, part) in KNOWN_UPWARD:
                    seen.add((module, part))
                else:
                    bad.append(f"{path.relative_to(PKG)} imports {part}")
    assert not bad, "upward imports: " + "; ".join(sorted(bad))
    stale = KNOWN_UPWARD - seen
    assert not stale, f"known upward imports that are gone (drop them from KNOWN_UPWARD): {stale}"


def test_no_import_cycles():
    cycles = _cycles(_graph())
    bad = [sorted(c) for c in cycles if c not in KNOWN_CYCLES]
    assert not bad, "import cycles: " + "; ".join(" <-> ".join(c) for c in bad)
    stale = KNOWN_CYCLES - set(cycles)
    assert not stale, f"known cycles that are gone (drop them from KNOWN_CYCLES): {stale}"


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    fake = PKG / "core" / "_layout_probe.py"
    fake.write_text("from ..report.figures import pyplot\n")
    try:
        assert _imported_parts(fake) == {"report"}
    finally:
        fake.unlink()


def test_the_checker_sees_a_cycle(tmp_path):
    """A cycle closed by a lazy import inside a function, one through ``from pkg import sub``
    and one through an absolute import are all found; an acyclic chain is not."""
    root = tmp_path / "fakepkg"
    files = {
        "__init__.py": "",
        "core/__init__.py": "",
        "core/a.py": "from .b import helper\n",
        "core/b.py": "def helper():\n    from . import a\n    return a\n",
        "core/c.py": "from .a import x\n",  # imports into the cycle, is not part of it
        "methods/__init__.py": "",
        "methods/p.py": "import fakepkg.methods.q\n",
        "methods/q.py": "from fakepkg.methods import p\n",
        "methods/r.py": "from ..core import c\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    graph = _graph(root, "fakepkg")
    assert graph["core.b"] == {"core.a"} and graph["methods.q"] == {"methods.p"}
    assert sorted(map(sorted, _cycles(graph))) == [["core.a", "core.b"],
                                                  ["methods.p", "methods.q"]]
    assert _cycles({"x": {"y"}, "y": {"z"}, "z": set()}) == []
    assert _cycles({"x": {"x"}}) == [frozenset({"x"})]
