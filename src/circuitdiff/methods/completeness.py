"""Completeness: does the circuit contain *all* heads that matter?

A helper of :func:`circuitdiff.methods.evaluation.run` (``AnalysisConfig.completeness``), which
gives it the prompts and means of the evaluation and caches its points.

For subsets ``K`` of the circuit (whole groups, and random halves of every group) compare
``F(C \\ K)`` — accuracy of the circuit minus ``K`` (everything else mean-ablated, as in circuit
evaluation) — with ``F(M \\ K)`` — the full model with only ``K``'s heads mean-ablated at their
groups' positions (all other heads and positions intact). A complete circuit has
``|F(C \\ K) − F(M \\ K)|`` small for every ``K``. All subsets of one kind run batched.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from .ablation import HeadMeans, circuit_keep, variant_accuracies, without
from ..core.circuit import Circuit, Head, format_head
from ..core.model import LoadedModel
from ..core.stats import draw_rng
from ..core.task import Prompt


@dataclass
class CompletenessPoint:
    subset: str
    removed: dict[str, list[str]]
    circuit_minus_k: float
    model_minus_k: float

    @property
    def difference(self) -> float:
        return abs(self.circuit_minus_k - self.model_minus_k)

    def to_dict(self) -> dict:
        return {**asdict(self), "difference": self.difference}

    @classmethod
    def from_dict(cls, d: dict) -> "CompletenessPoint":
        """The point :meth:`to_dict` wrote (its derived ``difference`` is dropped)."""
        return cls(d["subset"], d["removed"], d["circuit_minus_k"], d["model_minus_k"])


def completeness_subsets(circuit: Circuit, n_halves: int = 5, seed: int = 0
                         ) -> list[tuple[str, dict[str, list[Head]]]]:
    """Whole groups, then ``n_halves`` random halves (half of every group, seeded)."""
    out = [(f"group:{g}", {g: list(grp.heads)}) for g, grp in circuit.groups.items()]
    for i in range(n_halves):
        rng = draw_rng(seed, i)
        out.append((f"half:{i}", {g: rng.sample(grp.heads, len(grp.heads) // 2)
                                  for g, grp in circuit.groups.items()}))
    return out


def _model_minus(circuit: Circuit, removed: dict[str, list[Head]]) -> dict[str, torch.Tensor]:
    """Keep masks for the full model with ``removed`` heads ablated at their groups' positions."""
    keep = {p: torch.ones(circuit.n_layers, circuit.n_heads, dtype=torch.bool)
            for p in circuit.positions()}
    for g, heads in removed.items():
        p = circuit.groups[g].position
        for layer, head in heads:
            keep[p][layer, head] = False
    return keep


def completeness(loaded: LoadedModel, prompts: Sequence[Prompt], means: HeadMeans,
                 circuit: Circuit, n_halves: int = 5, seed: int = 0,
                 keep_other_positions: bool = False, batch_size: int = 32, max_rows: int = 256,
                 progress: bool = False) -> list[CompletenessPoint]:
    """``F(C∖K)`` and ``F(M∖K)`` for every subset of :func:`completeness_subsets`."""
    circuit.validate(loaded.arch)
    subsets = completeness_subsets(circuit, n_halves, seed)
    c_acc = variant_accuracies(loaded, prompts, means,
                               [circuit_keep(without(circuit, r)) for _, r in subsets],
                               keep_other_positions, batch_size, max_rows, progress)
    # the whole circuit may lose every head at a position: keep the position's mask anyway
    m_acc = variant_accuracies(loaded, prompts, means, [_model_minus(circuit, r) for _, r in subsets],
                               True, batch_size, max_rows, progress)
    return [CompletenessPoint(name, {g: [format_head(h) for h in hs] for g, hs in r.items()}, c, m)
            for (name, r), c, m in zip(subsets, c_acc, m_acc)]
