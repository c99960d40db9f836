"""A pool of models loaded one at a time: the one object every multi-model method runs on.

A study, an evaluation across models, DCM's functional patching and CMAP all walk several
models whose weights together may not fit in memory. :class:`ModelPool` hands out a loaded
model by spec, keeping at most one loaded at a time (the previous one is freed first), and
checks that every model it hands out has the first one's head grid and tokenizer when asked
to (``same_shape=True``). A method that takes ``model_or_pool`` accepts either a
:class:`~circuitdiff.core.model.LoadedModel` or a pool (:func:`as_pool`).
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from .arch import ArchitectureError
from .circuit import Circuit
from .model import LoadedModel
from .specs import ModelSpecError, adapter_base_of, as_spec, config_grid, identity

Loader = Callable[[str], LoadedModel]


_PROBE = "The apple is in Box A, the book is in Box B. Box A contains the"


def same_tokenizer(a, b) -> bool:
    """Same vocabulary and same ids for a probe text (catches differing BOS handling)."""
    if a is b:
        return True
    return a.get_vocab() == b.get_vocab() and a(_PROBE)["input_ids"] == b(_PROBE)["input_ids"]


def tokenizer_digest(tokenizer) -> str:
    """A digest of what :func:`same_tokenizer` compares (the vocabulary, the probe text's ids):
    how ranks holding different models compare their tokenizers."""
    from .runs import settings_digest

    return settings_digest([sorted(tokenizer.get_vocab().items()),
                            tokenizer(_PROBE)["input_ids"]], 32)


def head_grid(loaded: LoadedModel) -> tuple[int, int, int, int]:
    """``(layers, heads, kv heads, head_dim)`` of a loaded model."""
    a = loaded.arch
    return a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim


@dataclass
class _Shape:
    """What models of one pool must share (kept without holding the first model alive)."""

    name: str
    grid: tuple[int, int, int, int]
    tokenizer: object


class ModelPool:
    """Models by spec, at most one loaded at a time.

    ``load(spec)`` loads one (default :func:`~circuitdiff.core.model.load_model`); ``specs`` are
    the models the pool walks, in order (the first is the base). ``same_shape`` makes every
    model handed out be checked against the first: same head grid, same tokenizer (an error
    naming both otherwise). A :class:`LoadedModel` given instead of a spec is handed back as it
    is (after the check) without being freed.
    """

    def __init__(self, specs: Sequence[str] = (), load: Loader | None = None, *,
                 same_shape: bool = False, why: str = ""):
        if load is None:
            from .model import load_model as load
        self.specs = list(specs)
        self.load = load
        self.same_shape = same_shape
        self.why = why
        self.spec: str | None = None
        self.loaded: LoadedModel | None = None
        self.reference: _Shape | None = None

    def get(self, ref: "str | LoadedModel") -> LoadedModel:
        """The model ``ref`` names, loading it (and freeing the previous one) if needed."""
        if isinstance(ref, LoadedModel):
            self._check(ref)
            return ref
        if ref != self.spec:
            self.free()
            loaded = self.load(ref)
            self._check(loaded)
            self.loaded, self.spec = loaded, ref
        return self.loaded

    __getitem__ = get

    @contextlib.contextmanager
    def model(self, ref: "str | LoadedModel", adapter: bool | None = None
              ) -> Iterator[LoadedModel]:
        """The model ``ref`` for the block; ``adapter=False`` runs it with its peft adapter
        disabled (the LoRA fine-tune as its own base)."""
        loaded = self.get(ref)
        if adapter is False:
            with loaded.adapter_disabled():
                yield loaded
        else:
            yield loaded

    def each(self, specs: Sequence[str] | None = None) -> Iterator[tuple[str, LoadedModel]]:
        """``(spec, model)`` for every spec (default: the pool's), one loaded at a time; the
        last one is freed when the loop ends."""
        try:
            for spec in (self.specs if specs is None else specs):
                yield spec, self.get(spec)
        finally:
            self.free()

    def _check(self, loaded: LoadedModel) -> None:
        if not self.same_shape:
            return
        shape = _Shape(loaded.name, head_grid(loaded), loaded.tokenizer)
        if self.reference is None:
            self.reference = shape
            return
        ref, why = self.reference, f": {self.why}" if self.why else ""
        if ref.grid != shape.grid:
            raise ArchitectureError(
                f"{ref.name} and {loaded.name} have different head grids (layers, heads, kv heads, "
                f"head_dim: {ref.grid} vs {shape.grid}){why}")
        if not same_tokenizer(ref.tokenizer, shape.tokenizer):
            raise ArchitectureError(f"{ref.name} and {loaded.name} have different tokenizers: the "
                                    f"same prompts would be different token ids{why}")

    def free(self) -> None:
        """Drop the loaded model and return its memory."""
        self.loaded, self.spec = None, None
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@dataclass
class PairCheck:
    """What :func:`check_pair` found: whether the fine-tune is a LoRA adapter on the base (one
    set of weights, adapter toggled), and warnings to show."""

    lora: bool
    warnings: list[str] = field(default_factory=list)


def check_pair(base: str, finetuned: str, circuit: Circuit | None = None) -> PairCheck:
    """Check a (base, fine-tune) pair of specs before any weights are loaded.

    Errors (one line, naming the fix): a LoRA adapter trained on another base
    (:class:`ModelSpecError`); different head grids (from the configs), a circuit found on
    another head grid, different tokenizers (:class:`~circuitdiff.core.arch.ArchitectureError`).
    Warns when both specs name the same model (the gap will be 0). Checks that need the weights
    (hub ids, GGUF files) are repeated when the models load.
    """
    from .model import load_tokenizer

    warn = []
    if identity(base) == identity(finetuned):
        warn.append(f"--finetuned {finetuned} is the same model as --base {base}: the gap is 0 "
                    f"and the share recovered is undefined")
    ft_base = adapter_base_of(finetuned)
    lora = ft_base is not None and ft_base == identity(base)
    if ft_base is not None and not lora:
        raise ModelSpecError(f"the LoRA adapter {finetuned} was trained on {ft_base}, not on the "
                             f"given base {base}: pass --base {as_spec(ft_base)}")
    gb, gf = config_grid(base), config_grid(finetuned)
    if gb is not None and gf is not None and gb != gf:
        raise ArchitectureError(
            f"base {base} and fine-tune {finetuned} have different head grids (layers, heads, "
            f"kv heads, head_dim: {gb} vs {gf}): CMAP needs a fine-tune of the base's architecture")
    if circuit is not None:
        grid = gb or gf
        if grid is not None and (circuit.n_layers, circuit.n_heads) != grid[:2]:
            raise ArchitectureError(
                f"the circuit was found on a {circuit.n_layers}x{circuit.n_heads} head grid but "
                f"{base} has {grid[0]}x{grid[1]}: use a circuit found on this base")
    try:
        tb, tf = load_tokenizer(base), load_tokenizer(finetuned)
    except (ModelSpecError, OSError, ValueError):
        tb = tf = None  # not loadable alone: checked when the models load
    if tb is not None and not same_tokenizer(tb, tf):
        raise ArchitectureError(f"base {base} and fine-tune {finetuned} have different tokenizers: "
                                f"the same prompts would be different token ids; CMAP needs a "
                                f"fine-tune that kept its base's tokenizer")
    return PairCheck(lora, warn)


def as_pool(model_or_pool: "LoadedModel | ModelPool | Sequence[str]", load: Loader | None = None
            ) -> ModelPool:
    """A pool for what a method was given: a pool as it is, a loaded model as a one-model pool,
    a list of specs as a pool over them."""
    if isinstance(model_or_pool, ModelPool):
        return model_or_pool
    if isinstance(model_or_pool, LoadedModel):
        pool = ModelPool([model_or_pool.name], load)
        pool.loaded, pool.spec = model_or_pool, model_or_pool.name
        return pool
    return ModelPool(list(model_or_pool), load)


__all__ = ["ModelPool", "PairCheck", "as_pool", "check_pair", "head_grid", "same_tokenizer",
           "tokenizer_digest"]
