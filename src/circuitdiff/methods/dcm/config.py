"""DCM's typed config: what decides its numbers (the cache key, derived) and how it runs."""

from __future__ import annotations

from dataclasses import dataclass

from ...core.circuit import Circuit
from ...core.config import Config, check_finite, execution
from .desiderata import PAPER_DESIDERATA, resolve_names

#: the paper's values, for reference (the defaults below are scaled for CPU organisms)
PAPER_SPLITS = (1000, 500, 500)
PAPER_LAMBDA = 0.01
DEFAULT_LAMBDAS = (0.001, 0.003, 0.01, 0.03, 0.1)


@dataclass
class DCMConfig(Config):
    """Everything that decides DCM's numbers (the cache key, minus the execution fields).

    Fields: ``circuit`` — the circuit whose groups DCM trains on (``run`` applies
    :func:`~circuitdiff.methods.dcm.run.dcm_view` to it: one-head groups merged, groups read at
    several positions left out, each change returned as a note); ``desiderata`` — names, or
    ``paper`` / ``robustness`` / ``all``; ``n_train``/``n_val``/``n_test`` — prompts per split
    (paper 1000/500/500); ``lambdas`` — the λ sweep (all trained in one pass); ``tolerance`` —
    the chosen λ is the largest whose validation accuracy is within this of the best; ``lr``,
    ``epochs`` — Adam on the masks; ``seed`` — the base prompts and example draws;
    ``n_boxes`` — boxes per prompt; ``n_random``/``random_seed`` — random head sets of each
    selection's size (the baseline); ``bootstrap``/``confidence`` — the found-a-function gate:
    a selection counts only if its validation target accuracy beats both no patching and the
    random head sets with a ``confidence`` bootstrap interval (``bootstrap`` resamples of the
    validation prompts); ``batch_size``, ``prefix_cache`` — execution only.
    """

    circuit: Circuit | None = None
    desiderata: tuple[str, ...] = PAPER_DESIDERATA
    n_train: int = 200
    n_val: int = 100
    n_test: int = 100
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    tolerance: float = 0.02
    lr: float = 0.1
    epochs: int = 2
    seed: int = 0
    n_boxes: int = 7
    n_random: int = 10
    random_seed: int = 0
    bootstrap: int = 1000
    confidence: float = 0.95
    batch_size: int = execution(32)
    prefix_cache: bool = execution(True)

    def __post_init__(self) -> None:
        if isinstance(self.circuit, dict):
            self.circuit = Circuit.from_dict(self.circuit)
        if isinstance(self.desiderata, str):  # "paper" or "object_value,position"
            self.desiderata = tuple(x.strip() for x in self.desiderata.split(",") if x.strip())
        self.desiderata = tuple(resolve_names(self.desiderata))
        self.lambdas = tuple(float(x) for x in self.lambdas)
        if not self.lambdas:
            raise ValueError("give at least one λ (--lambdas)")
        check_finite("DCMConfig", tolerance=self.tolerance, lr=self.lr,
                     confidence=self.confidence, **{f"lambdas[{i}]": x
                                                    for i, x in enumerate(self.lambdas)})
        bad = [x for x in self.lambdas if not x > 0]
        if bad:
            raise ValueError(f"λ must be > 0 (the sparsity penalty λ·Σ(1-m) is what selects "
                             f"heads), got {bad}; pass e.g. --lambdas 0.001,0.01,0.1")
        self.check_at_least(("n_train", "n_val", "n_test", "epochs", "batch_size"))
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.n_random < 0 or self.tolerance < 0:
            raise ValueError("n_random and tolerance must be >= 0")
        if self.bootstrap < 1:
            raise ValueError(f"bootstrap must be >= 1 (resamples of the validation prompts), "
                             f"got {self.bootstrap}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")

    def group_key(self) -> dict:
        """:meth:`cache_key` without the circuit: each group's file is keyed by that group's own
        heads and position, so changing another group of the circuit keeps it."""
        return {k: v for k, v in self.cache_key().items() if k != "circuit"}


__all__ = ["DCMConfig", "DEFAULT_LAMBDAS", "PAPER_LAMBDA", "PAPER_SPLITS"]
