"""What the cache-compatibility tests compare: the recorded snapshots and a run folder's saved
settings, read the one way every compat test reads them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable


def load_snapshot(name: str) -> Any:
    """The recorded snapshot ``name`` (a JSON file beside this module)."""
    return json.loads((Path(__file__).parent / name).read_text())


def saved_settings(folder: Path, other_json: Callable[[str, Any], Any] = lambda rel, d: None
                   ) -> dict:
    """Every file of ``folder`` (figures aside), by relative path: the settings a cached result
    was saved under (a result JSON or a safetensors file's metadata; None when it has none),
    ``other_json(rel, content)`` for any other JSON file, None for any other file."""
    from safetensors import safe_open

    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_dir() or p.suffix == ".png":
            continue
        rel = p.relative_to(folder).as_posix()
        if p.suffix == ".safetensors":
            with safe_open(str(p), "pt") as f:
                out[rel] = json.loads((f.metadata() or {}).get("settings", "null"))
        elif p.suffix != ".json":
            out[rel] = None
        else:
            d = json.loads(p.read_text())
            is_result = isinstance(d, dict) and "_settings_digest" in d
            out[rel] = d["settings"] if is_result else other_json(rel, d)
    return out
