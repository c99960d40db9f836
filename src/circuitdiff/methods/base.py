"""The one method shape.

Every method is a module (or small package) whose entry point is::

    def run(model_or_pool, prompts, config, *, store=None, progress=None) -> Result

- ``model_or_pool``: a :class:`~circuitdiff.core.model.LoadedModel`, or a
  :class:`~circuitdiff.core.pool.ModelPool` for methods that walk several models;
- ``prompts``: the prompts to run on, or ``None`` for the config's own task prompts;
- ``config``: the method's typed config (a :class:`~circuitdiff.core.config.Config`: one
  docstring per field, ``cache_key()`` derived from its settings);
- ``store``: a :class:`~circuitdiff.core.runs.RunFolder` (or a path) the method caches its pieces
  in, keyed by ``config.cache_key()`` — the method caches, never the CLI or the study;
  ``None`` computes without saving;
- ``progress``: show progress bars (``None``/``False``: silent);

and it returns a result that mixes in :class:`Result` (``to_dict``/``from_dict``/``save``).
Variants are data — a registry record or a ``functools.partial`` of ``run`` — never copies.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..core.config import _plain
from ..core.runs import RunFolder


def as_store(store: "RunFolder | str | Path | None") -> RunFolder | None:
    """A run folder for what a method was given as ``store`` (None stays None)."""
    if store is None or isinstance(store, RunFolder):
        return store
    return RunFolder(store)


class Result:
    """Mix-in for a method's dataclass result: JSON round trip and ``save``."""

    def to_dict(self) -> dict:
        """Every field as JSON-able data."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict):
        """The result ``to_dict`` wrote."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, path: str | Path) -> Path:
        """Write ``to_dict()`` as JSON to ``path`` (atomically)."""
        path = Path(path)
        return RunFolder(path.parent).save_json(path.name, self.to_dict())


def cached_result(store: RunFolder | None, name: str, settings: dict, compute: Any,
                  result_type: type) -> Any:
    """``compute()`` (a result), or the one saved under ``name`` in ``store`` with equal
    ``settings``; computed and not saved when there is no store."""
    if store is None:
        return compute()
    return result_type.from_dict(store.cached(name, settings, lambda: compute().to_dict()))


__all__ = ["Result", "as_store", "cached_result"]
