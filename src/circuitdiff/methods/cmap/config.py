"""CMAP's settings: the typed config (its cache key derived from the fields), names, errors."""

from __future__ import annotations

from dataclasses import dataclass

from ...core.circuit import Circuit
from ...core.config import check_finite, execution
from ...core.task import Prompt, TaskSample

#: input-CMAP component sets, in the paper's order
COMPONENTS: tuple[str, ...] = ("q", "k", "v", "qk", "qkv")
#: a position name CMAP accepts besides the task's named positions: every token of the prompt
ALL_POSITIONS = "all"
#: direction names
FORWARD, REVERSE = "finetuned->base", "base->finetuned"


class CMAPError(ValueError):
    """Raised for a (base, fine-tune, circuit) combination CMAP cannot compare."""


@dataclass
class CMAPConfig(TaskSample):
    """Everything that decides CMAP's numbers (``cache_key()``, derived) and how it runs.

    ``n_prompts``/``seed``/``n_boxes`` make the prompts (:func:`cmap_prompts`); ``random_draws``
    random circuits of the circuit's group sizes (seed ``random_seed``) are the control (the
    group and cumulative rows take the first ``group_random_draws`` of them);
    ``bootstrap`` resamples of the prompts (seed ``bootstrap_seed``) give the ``confidence``
    interval. ``per_head`` adds the per-head map at ``per_head_positions`` (default: the positions
    of the circuit's non-empty groups); ``input`` adds input CMAP of every non-empty group;
    ``reverse`` adds the base → fine-tune direction. ``circuit`` is the circuit compared (a
    setting: it decides every number; ``None`` only in a template such as the study's, which
    fills it per run). ``batch_size`` and ``max_rows`` only decide how the forwards are cut.
    """

    #: random circuits of the circuit's group sizes (the control; the "gain carried" rank test
    #: needs at least 19 to reach p = 0.05)
    random_draws: int = 20
    #: random circuits of the group and cumulative rows (descriptive grey bars; no verdict
    #: rests on them): the first this many of the circuit's draws (None: all of them)
    group_random_draws: int | None = None
    #: seed of the random circuits
    random_seed: int = 0
    #: bootstrap resamples of the prompts (0: no intervals)
    bootstrap: int = 1000
    #: seed of the bootstrap resamples
    bootstrap_seed: int = 0
    #: level of every interval, in (0, 1)
    confidence: float = 0.95
    #: also CMAP every single head: a [layers, heads] map per position
    per_head: bool = False
    #: positions of the per-head maps (None: the positions of the circuit's non-empty groups)
    per_head_positions: tuple[str, ...] | None = None
    #: also input CMAP (q, k, v, qk, qkv) of every non-empty group
    input: bool = False
    #: also the base → fine-tune direction
    reverse: bool = False
    #: prompts per forward
    batch_size: int = execution(32)
    #: rows per forward when patch variants are stacked
    max_rows: int = execution(256)
    #: the circuit compared
    circuit: Circuit | None = None

    def __post_init__(self) -> None:
        self.check_at_least(("n_prompts", "batch_size", "max_rows"))
        for name in ("random_draws", "bootstrap", "group_random_draws"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        check_finite("CMAPConfig", confidence=self.confidence)
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.per_head_positions is not None:
            self.per_head_positions = tuple(self.per_head_positions)
        if isinstance(self.circuit, dict):
            self.circuit = Circuit.from_dict(self.circuit)

    def settings(self) -> dict:
        """The cache key without the circuit: what every saved CMAP piece keeps under
        ``"cmap"`` (the circuit is saved beside it, under ``"circuit"``)."""
        key = self.cache_key()
        key.pop("circuit")
        return key


def cmap_prompts(tokenizer, cfg: CMAPConfig) -> list[Prompt]:
    """The evaluation prompts of ``cfg`` (``n_prompts`` from ``seed``, ``n_boxes`` boxes)."""
    return cfg.prompts(tokenizer)
