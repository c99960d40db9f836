"""Typed configs: one serialisation and one cache key, both derived from the fields.

Every method's config is a dataclass that mixes in :class:`Config`. A field is either a
*setting* (it changes the result: prompts, seeds, sizes, thresholds) or an *execution* field
(it changes only how the result is computed: batch size, rows per forward, progress). Execution
fields are declared with :func:`execution`; everything else is a setting. The cache key is the
settings — derived here, never typed by hand — plus the config's ``SCHEMA`` when the class has
bumped it (a change of the computation under equal settings), so a result computed under other
settings is never reused::

    @dataclass
    class ScanConfig(Config):
        n_prompts: int = 200           # a setting: in the key
        batch_size: int = execution(32)  # not in the key

    ScanConfig().cache_key()  # {"n_prompts": 200}
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

#: metadata flag of an execution field (left out of the cache key)
EXECUTION = "circuitdiff_execution"


def execution(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING):
    """A dataclass field that only decides how a result is computed, never what it is (batch
    size, rows per forward): left out of :meth:`Config.cache_key`."""
    kw = {"metadata": {EXECUTION: True}}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, **kw)
    return dataclasses.field(default=default, **kw)


def _plain(value: Any) -> Any:
    """``value`` as JSON-able data: configs as dicts, tuples as lists, recursively."""
    if hasattr(value, "to_dict") and not isinstance(value, type):  # configs, circuits
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


class Config:
    """Mix-in for a method's dataclass config: ``to_dict``/``from_dict`` and the cache key."""

    #: bumped by hand only when the computation changes under equal settings (then every saved
    #: result of this config recomputes); 0 leaves it out of the key
    SCHEMA: ClassVar[int] = 0

    def to_dict(self) -> dict:
        """Every field, as JSON-able data (nested configs as dicts, tuples as lists)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict):
        """The config ``to_dict`` wrote (unknown keys are an error, missing ones default)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__} has no setting {unknown[0]!r}; "
                             f"known: {', '.join(sorted(names))}")
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                v = d[f.name]
                kw[f.name] = tuple(v) if isinstance(v, list) and _is_tuple(f) else v
        return cls(**kw)

    def cache_key(self) -> dict:
        """The settings that decide the result: every field but the execution ones, plus
        ``schema`` when the class has bumped :attr:`SCHEMA`."""
        key = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
               if not f.metadata.get(EXECUTION)}
        if self.SCHEMA:
            key["schema"] = self.SCHEMA
        return key

    def check_at_least(self, names: tuple[str, ...], minimum: int = 1,
                       error: type[Exception] = ValueError, prefix: str = "") -> None:
        """Raise ``error`` naming the first field of ``names`` below ``minimum`` (counts, sizes,
        batch sizes: the one range check every config makes)."""
        for name in names:
            value = getattr(self, name)
            if value < minimum:
                raise error(f"{prefix}{name} must be >= {minimum}, got {value}")

    def digest(self) -> str:
        """Short hex digest of :meth:`cache_key` (for file names)."""
        from .runs import settings_digest

        return settings_digest(self.cache_key())


def _is_tuple(f: dataclasses.Field) -> bool:
    return "tuple" in str(f.type)


def check_finite(owner: str, **values: float | None) -> None:
    """Raise ``ValueError`` naming the field when a number is NaN or infinite (``None`` passes):
    a NaN threshold compares false with everything and silently changes a rule."""
    for name, v in values.items():
        if v is not None and not math.isfinite(float(v)):
            raise ValueError(f"{owner}: {name} must be a finite number, got {v}")


__all__ = ["Config", "EXECUTION", "check_finite", "execution"]
