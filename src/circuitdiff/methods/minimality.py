"""Minimality: is every head of the circuit needed?

A helper of :func:`circuitdiff.methods.evaluation.run` (``AnalysisConfig.minimality``), which
gives it a batched evaluator over the evaluation's prompts and means and caches its result.

For each head ``H`` of a group, find a partner set ``K`` (other heads of the group, at most
``max_partner_frac`` = 30% of it) that maximises ``H``'s marginal effect

    effect(H | K) = acc(C \\ K) / acc(C \\ (K ∪ {H})) − 1

and keep ``H`` if the best effect is ≥ ``threshold`` (0.01). Candidate partner sets are the
prefixes of ``H``'s partners ranked by *pair-drop* score ``effect(H | {H'})``, so the search is
``n²/2`` pair drops plus ``n · 0.3n`` prefix sets per group of ``n`` heads. Every ablation variant
is a keep mask; they are evaluated in two batched rounds (pairs, then prefixes) with variants
stacked along the batch dimension (:func:`circuitdiff.methods.ablation.variant_accuracies`), never one
forward per variant. Identical variants are evaluated once.

"Removing H" removes it at its group's *position* (from every group read there): a head listed
by two groups at one position would otherwise never look necessary to either.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from .ablation import HeadMeans, KeepMasks, circuit_keep, variant_accuracies
from ..core.circuit import Circuit, CircuitGroup, Head, format_head
from ..core.config import check_finite
from ..core.model import LoadedModel
from ..core.task import Prompt

Removal = frozenset  # of (position, layer, head)
Evaluator = Callable[[Sequence[KeepMasks]], Sequence[float]]


def marginal_effect(acc_without_k: float, acc_without_kh: float) -> float:
    """``acc(C∖K) / acc(C∖(K∪H)) − 1``; ``inf`` if removing H drops accuracy to 0 from > 0."""
    if acc_without_kh <= 0:
        return math.inf if acc_without_k > 0 else 0.0
    return acc_without_k / acc_without_kh - 1


@dataclass
class HeadScore:
    head: str
    effect: float
    partners: list[str]
    kept: bool


@dataclass
class MinimalityResult:
    circuit: Circuit                       # the pruned circuit
    scores: dict[str, list[HeadScore]]     # per group
    threshold: float
    n_variants: int = 0
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        fix = lambda x: "inf" if x == math.inf else x  # noqa: E731
        return {"threshold": self.threshold, "n_variants": self.n_variants,
                "settings": self.settings, "pruned": self.circuit.to_dict(),
                "scores": {g: [{**asdict(s), "effect": fix(s.effect)} for s in ss]
                           for g, ss in self.scores.items()}}


def _keep(base: dict[str, torch.Tensor], removed: Removal) -> dict[str, torch.Tensor]:
    out = {p: m.clone() for p, m in base.items()}
    for p, layer, head in removed:
        out[p][layer, head] = False
    return out


def batched_evaluator(loaded: LoadedModel, prompts: Sequence[Prompt], means: HeadMeans,
                      keep_other_positions: bool = False, batch_size: int = 32,
                      max_rows: int = 256, progress: bool = False,
                      metric: str = "accuracy") -> Evaluator:
    """Accuracy of many keep-mask variants, stacked along the batch dimension."""
    return lambda variants: variant_accuracies(loaded, prompts, means, variants,
                                               keep_other_positions, batch_size, max_rows, progress,
                                               metric)


def minimality(circuit: Circuit, evaluate: Evaluator, threshold: float = 0.01,
               max_partner_frac: float = 0.3) -> MinimalityResult:
    """Score every head of every group and return the pruned circuit (see module doc).

    ``evaluate`` maps a list of keep masks to accuracies — :func:`batched_evaluator` in
    practice; tests pass a one-variant-at-a-time evaluator to check the batching.
    """
    check_finite("minimality", threshold=threshold, max_partner_frac=max_partner_frac)
    base = circuit_keep(circuit)
    cache: dict[Removal, float] = {}
    n_evaluated = 0

    def ensure(sets: Sequence[Removal]) -> None:
        nonlocal n_evaluated
        todo = list(dict.fromkeys(s for s in sets if s not in cache))
        if todo:
            for s, a in zip(todo, evaluate([_keep(base, s) for s in todo])):
                cache[s] = float(a)
            n_evaluated += len(todo)

    def key(pos: str, heads) -> Removal:
        return frozenset((pos, l, h) for l, h in heads)

    groups = {g: (grp.position, list(grp.heads)) for g, grp in circuit.groups.items()}
    # round 1: nothing, single drops, pair drops (all groups at once)
    first = [frozenset()]
    for pos, heads in groups.values():
        first += [key(pos, [h]) for h in heads]
        first += [key(pos, [a, b]) for i, a in enumerate(heads) for b in heads[i + 1:]]
    ensure(first)

    # rank partners per head by pair-drop score, then round 2: prefix partner sets
    plans: dict[str, list[tuple[Head, list[list[Head]]]]] = {}
    second = []
    for g, (pos, heads) in groups.items():
        k_max = int(max_partner_frac * len(heads))
        plans[g] = []
        for h in heads:
            others = [o for o in heads if o != h]
            pair = {o: marginal_effect(cache[key(pos, [o])], cache[key(pos, [o, h])])
                    for o in others}
            ranked = sorted(others, key=lambda o: (-pair[o], o))
            prefixes = [ranked[:k] for k in range(0, min(k_max, len(ranked)) + 1)]
            plans[g].append((h, prefixes))
            for K in prefixes:
                second += [key(pos, K), key(pos, K + [h])]
    ensure(second)

    scores: dict[str, list[HeadScore]] = {}
    pruned = {}
    for g, (pos, heads) in groups.items():
        scores[g] = []
        for h, prefixes in plans[g]:
            effects = [marginal_effect(cache[key(pos, K)], cache[key(pos, K + [h])])
                       for K in prefixes]
            best = max(range(len(effects)), key=lambda i: (effects[i], -i))
            scores[g].append(HeadScore(format_head(h), effects[best],
                                       [format_head(o) for o in prefixes[best]],
                                       effects[best] >= threshold))
        pruned[g] = CircuitGroup([h for h, s in zip(heads, scores[g]) if s.kept], pos)
    out = Circuit(pruned, circuit.n_layers, circuit.n_heads, circuit.model,
                  {**circuit.settings, "minimality": {"threshold": threshold,
                                                      "max_partner_frac": max_partner_frac}})
    return MinimalityResult(out, scores, threshold, n_evaluated)
