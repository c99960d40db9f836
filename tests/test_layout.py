"""The package reads as the pipeline: imports go core ← methods ← report ← study ← cli, never
upward. Checked on the source text of every module (lazy imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

import circuitdiff

PKG = Path(circuitdiff.__file__).parent
#: layer of each top-level part; a module may import only parts of its own layer or below
LAYERS = {"core": 0, "organisms": 0, "methods": 1, "report": 2, "study": 3, "cli": 4,
          "__main__": 4}


def _part(module_path: Path) -> str:
    rel = module_path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_parts(path: Path) -> set[str]:
    """Top-level circuitdiff parts imported by the module at ``path``."""
    rel = path.relative_to(PKG).with_suffix("")
    pkg = list(rel.parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
                names = target[:1] or [a.name for a in node.names]
            elif node.module and node.module.startswith("circuitdiff."):
                names = [node.module.split(".")[1]]
            else:
                continue
            out.update(names)
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names
                       if a.name.startswith("circuitdiff."))
    return out


def test_imports_never_go_upward():
    bad = []
    for path in PKG.rglob("*.py"):
        if path.parent == PKG and path.stem == "__init__":
            continue  # the public API re-exports every layer
        own = LAYERS[_part(path)]
        for part in _imported_parts(path):
            if part in LAYERS and LAYERS[part] > own:
                bad.append(f"{path.relative_to(PKG)} imports {part}")
    assert not bad, "upward imports: " + "; ".join(sorted(bad))


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    fake = PKG / "core" / "_layout_probe.py"
    fake.write_text("from ..report.figures import pyplot\n")
    try:
        assert _imported_parts(fake) == {"report"}
    finally:
        fake.unlink()
