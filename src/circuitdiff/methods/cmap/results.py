"""CMAP's numbers: the gap share, the paired bootstrap, and the result dataclasses (a row per
patched set, a :class:`DirectionResult` per direction, the :class:`CMAPResult`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch

from ...core.stats import interval, resample_indices
from ..base import Result


# -- metric --------------------------------------------------------------------------------------
def gap_share(patched: float, target: float, source: float) -> float | None:
    """``(patched − target) / (source − target)``; ``None`` (undefined) when source == target."""
    gap = source - target
    return None if gap == 0 else (patched - target) / gap + 0.0  # + 0.0: no "-0.0"


class _Bootstrap:
    """Paired bootstrap over prompts: the same resamples for source, target and every variant."""

    def __init__(self, n: int, resamples: int, seed: int, confidence: float,
                 source_hits: torch.Tensor, target_hits: torch.Tensor):
        self.idx = resample_indices(n, resamples, seed)
        self.confidence = confidence
        if self.idx is not None:
            self.src = source_hits.double()[self.idx].mean(1)
            self.tgt = target_hits.double()[self.idx].mean(1)

    def gap_ci(self) -> list[float] | None:
        """Interval of ``acc_source − acc_target`` itself: a gap whose interval holds 0 makes
        every share a ratio of noise."""
        return None if self.idx is None else interval(self.src - self.tgt, self.confidence)

    def accuracy_ci(self, hits: torch.Tensor) -> list[float] | None:
        if self.idx is None:
            return None
        return interval(hits.double()[self.idx].mean(1), self.confidence)

    def share_ci(self, hits: torch.Tensor) -> tuple[list[float] | None, int]:
        """Interval of the share over resamples where the gap is non-zero, and their count."""
        if self.idx is None:
            return None, 0
        p = hits.double()[self.idx].mean(1)
        gap = self.src - self.tgt
        ok = gap != 0
        return interval((p[ok] - self.tgt[ok]) / gap[ok], self.confidence), int(ok.sum())


# -- results -------------------------------------------------------------------------------------
@dataclass
class CMAPRow:
    """One patched set: a group, a cumulative prefix of groups, the circuit, or an input patch.

    ``share`` is ``None`` when the gap is 0; ``share_ci`` is the bootstrap interval over
    resamples with a non-zero gap (``share_resamples`` of them). ``random_*`` is the control:
    the same groups of each random circuit (empty for input rows). An empty group has
    ``empty=True`` and no numbers.
    """

    kind: str                  # "group" | "cumulative" | "circuit" | "input"
    name: str
    groups: list[str]
    n_heads: int               # distinct heads patched
    accuracy: float | None
    accuracy_ci: list[float] | None = None
    share: float | None = None
    share_ci: list[float] | None = None
    share_resamples: int = 0
    component: str | None = None
    random: list[float] = field(default_factory=list)
    random_mean: float | None = None
    random_sd: float | None = None
    random_share: float | None = None
    empty: bool = False
    n_units: int | None = None  # (head, position) units patched (None: a result saved before)
    # the null of "gain carried" (rows with random draws; :func:`~circuitdiff.core.stats.
    # excess_interval`): the paired interval of share − mean random share, each draw's share,
    # the row's rank among the draws (1 = above all); and, on the whole-circuit row, the same
    # statistics for each random draw against the other draws (leave-one-out): the calibration
    excess_ci: list[float] | None = None
    random_shares: list[float | None] = field(default_factory=list)
    rank: int | None = None
    random_checks: list[dict] = field(default_factory=list)

    #: the rows' format (2: the excess interval, random shares, rank and random checks); in the
    #: direction's cache key
    VERSION: ClassVar[int] = 2

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DirectionResult:
    """CMAP from ``source`` into ``target``: clean accuracies, rows, per-head maps."""

    direction: str
    source: str
    target: str
    source_accuracy: float
    target_accuracy: float
    n: int
    rows: list[CMAPRow]
    per_head: dict[str, dict] = field(default_factory=dict)  # position -> accuracy/share maps
    identical: bool = False
    seconds: float = 0.0
    gap_ci: list[float] | None = None

    @property
    def gap(self) -> float:
        return self.source_accuracy - self.target_accuracy

    @property
    def gap_uncertain(self) -> bool:
        """True when the gap's bootstrap interval contains 0 (shares are then unreliable)."""
        return self.gap_ci is not None and self.gap_ci[0] <= 0 <= self.gap_ci[1]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gap"] = self.gap
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DirectionResult":
        d = {k: v for k, v in d.items() if k != "gap"}
        d["rows"] = [CMAPRow(**r) for r in d["rows"]]
        return cls(**d)


@dataclass
class CMAPResult(Result):
    """CMAP of one (base, fine-tune) pair on one circuit: one :class:`DirectionResult` per
    direction (fine-tune → base first), plus any warnings (e.g. identical models)."""

    base: str
    finetuned: str
    circuit: dict
    config: dict
    directions: list[DirectionResult]
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def n(self) -> int:
        return self.directions[0].n if self.directions else 0

    def direction(self, name: str) -> DirectionResult:
        for d in self.directions:
            if d.direction == name:
                return d
        raise KeyError(f"no direction {name!r}; have {[d.direction for d in self.directions]}")

    def to_dict(self) -> dict:
        return {"base": self.base, "finetuned": self.finetuned, "circuit": self.circuit,
                "config": self.config, "n": self.n,
                "directions": [d.to_dict() for d in self.directions],
                "warnings": self.warnings, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict) -> "CMAPResult":
        return cls(d["base"], d["finetuned"], d["circuit"], d["config"],
                   [DirectionResult.from_dict(x) for x in d["directions"]],
                   d.get("warnings", []), d.get("seconds", 0.0))
