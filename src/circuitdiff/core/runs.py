"""Run folders: every result a method produces, saved as it is made, so a killed run resumes.

A step is saved atomically (write to a temporary name, then rename) under a key; calling a step
whose key is already saved with the same settings loads it instead of recomputing it.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Callable

import torch


def settings_digest(settings, length: int = 16) -> str:
    """Hex sha256 of ``settings`` as sorted JSON (the one digest every cache key uses)."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def safe_name(name: str) -> str:
    """``name`` with every character unsafe in a file name replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name).strip("_") or "unnamed"


def model_tag(name: str) -> str:
    """A file-name-safe, collision-free tag for a model name: its last path component + hash."""
    short = re.sub(r"[^A-Za-z0-9_.+-]+", "_", name.rstrip("/").rsplit("/", 1)[-1]).strip("_")
    return f"{short[-60:] or 'model'}-{hashlib.sha1(name.encode()).hexdigest()[:6]}"


class RunFolder:
    """A folder of JSON and safetensors results, each tagged with the settings that made it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def file(self, name: str) -> Path:
        return self.path / name

    # -- JSON -------------------------------------------------------------------------------
    def save_json(self, name: str, obj: Any) -> Path:
        p = self.file(name)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(json.dumps(obj, indent=2, default=str))
        tmp.replace(p)
        return p

    def load_json(self, name: str) -> Any:
        return json.loads(self.file(name).read_text())

    # -- tensors ----------------------------------------------------------------------------
    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor],
                     settings: dict | None = None) -> Path:
        from safetensors.torch import save_file

        p = self.file(name)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        meta = {"settings": json.dumps(settings or {}, sort_keys=True, default=str)}
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata=meta)
        tmp.replace(p)
        return p

    def load_tensors(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.file(name)))

    # -- resumable steps ---------------------------------------------------------------------
    def cached(self, name: str, settings: dict, compute: Callable[[], Any]) -> Any:
        """JSON result of ``compute()``, loaded from ``name`` if saved with equal ``settings``."""
        p = self.file(name)
        digest = settings_digest(settings)
        if p.exists():
            saved = self.load_json(name)
            if isinstance(saved, dict) and saved.get("_settings_digest") == digest:
                return saved["result"]
        result = compute()
        self.save_json(name, {"_settings_digest": digest, "settings": settings, "result": result})
        return result

    def cached_tensors(self, name: str, settings: dict,
                       compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Tensors from ``compute()``, loaded from ``name`` if saved with equal ``settings``."""
        from safetensors import safe_open

        p = self.file(name)
        want = json.dumps(settings, sort_keys=True, default=str)
        if p.exists():
            with safe_open(str(p), "pt") as f:
                if (f.metadata() or {}).get("settings") == want:
                    return {k: f.get_tensor(k) for k in f.keys()}
        out = compute()
        self.save_tensors(name, out, settings)
        return out
