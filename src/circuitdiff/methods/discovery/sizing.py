"""Sizing the automatic chain's circuit by faithfulness on held-out prompts: grow a
score-ordered prefix of candidate (group, head) units until its faithfulness lower bound reaches
the target, then prune (see :mod:`.auto`, step 5)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ...core.circuit import Head, format_head
from ...core.model import LoadedModel
from ...core.task import Prompt
from ..ablation import HeadMeans, variant_accuracies, variant_correct
from ..faithfulness import faithfulness

#: the growth step: every GROW_STEP-th prefix first, then every prefix of the last step
GROW_STEP = 4


@dataclass
class Group:
    """A group while the chain runs: heads in score order with their scores."""

    key: str
    role: str
    heads: list[Head]
    scores: list[float]
    function: str = ""
    extra: list[Head] = field(default_factory=list)         # non-significant senders, score < 0
    extra_scores: list[float] = field(default_factory=list)


def _masks(units: Sequence[tuple[str, Head]], roles: dict[str, str], n_layers: int,
           n_heads: int, all_roles: Sequence[str]) -> dict[str, torch.Tensor]:
    """Keep masks per role (every role of ``all_roles`` present, possibly empty) for
    ``(group, head)`` units."""
    m = {r: torch.zeros(n_layers, n_heads, dtype=torch.bool) for r in all_roles}
    for g, (l, h) in units:
        m[roles[g]][l, h] = True
    return m


def size_circuit(loaded: LoadedModel, prompts: Sequence[Prompt], means: HeadMeans,
          groups: dict[str, Group], cfg, full_correct: torch.Tensor, all_roles: list[str],
          progress: bool = False) -> tuple[list[tuple[str, Head]], list[dict], dict]:
    """Choose the circuit's (group, head) units: fixed ``cfg.sizes`` per group, or the smallest
    score-ordered prefix whose faithfulness *lower bound* (``cfg.size_z`` paired standard errors
    below the estimate: a circuit chosen on noise would not hold on other prompts) reaches
    ``cfg.target``, then pruned under the same criterion. Returns the units, the curve and a
    summary (faithfulness of the result under both protocols)."""
    L, H = loaded.arch.n_layers, loaded.arch.n_heads
    roles = {k: g.role for k, g in groups.items()}
    ev = dict(batch_size=cfg.batch_size, max_rows=cfg.max_rows)
    full_c = full_correct.double()
    full = float(full_c.mean())

    def masks(units):
        return _masks(units, roles, L, H, all_roles)

    def measure(variants: list[dict], n: int | None = None) -> list[tuple[float, float, float]]:
        """(accuracy, faithfulness, its lower bound) of each variant (on the first ``n``
        prompts)."""
        n = len(prompts) if n is None else n
        c = variant_correct(loaded, prompts[:n], means, variants, progress=progress,
                            **ev).double()  # [V, n]
        base = full_c[:n]
        acc = c.mean(1)
        ref = float(base.mean())
        se = (base[None] - c).std(1) / n ** 0.5 / ref
        f = acc / ref
        return [(float(a), float(x), float(x - cfg.size_z * e)) for a, x, e in zip(acc, f, se)]

    def n_units(units) -> int:
        return len({(roles[g], h) for g, h in units})

    def point(units, step: str, **extra) -> dict:
        return {"units": n_units(units), "step": step, **extra}

    if cfg.sizes is not None:
        units = [(k, h) for i, (k, g) in enumerate(groups.items())
                 for h in g.heads[:cfg.sizes[min(i, len(cfg.sizes) - 1)]]]
        (acc, f, lb), = measure([masks(units)])
        curve = [point(units, "fixed sizes", accuracy=acc, faithfulness=f, lower_bound=lb)]
        return units, curve, _summary(loaded, prompts, means, masks(units), full, units, roles,
                                      cfg, ev, f)

    # every group's significant heads by relative score (every group's best first), then its
    # other senders with a negative score, also by relative score
    def by_relative(pairs) -> list[tuple[str, Head]]:
        order = sorted(((k, h, s / min(groups[k].scores)) for k, h, s in pairs),
                       key=lambda x: -x[2])
        return [(k, h) for k, h, _ in order]
    candidates = by_relative((k, h, s) for k, g in groups.items()
                             for h, s in zip(g.heads, g.scores)) + \
        by_relative((k, h, s) for k, g in groups.items()
                    for h, s in zip(g.extra, g.extra_scores))
    ceiling = {r: torch.ones(L, H, dtype=torch.bool) for r in all_roles}
    prefixes = [candidates[:i] for i in range(1, len(candidates) + 1)]
    # grow coarse to fine: every GROW_STEP-th prefix (stacked, a chunk at a time, stopping at the
    # first chunk where one reaches the target), then every prefix inside the last step
    measured: dict[int, tuple[float, float, float]] = {}
    if cfg.sizing == "bisect":
        measured = _bisect_grow(len(prefixes), lambda j: measure([masks(prefixes[j])])[0],
                                cfg.target)
    else:
        coarse = list(range(GROW_STEP - 1, len(prefixes), GROW_STEP))
        if not coarse or coarse[-1] != len(prefixes) - 1:
            coarse.append(len(prefixes) - 1)
        chunk = max(1, cfg.max_rows // max(1, min(len(prompts), cfg.batch_size)))
        for i in range(0, len(coarse), chunk):
            todo = coarse[i:i + chunk]
            measured.update(zip(todo, measure([masks(prefixes[j]) for j in todo])))
            if any(measured[j][2] >= cfg.target for j in todo):
                break
        first = min((j for j in measured if measured[j][2] >= cfg.target), default=None)
        if first is not None:
            fine = [j for j in range(max(0, first - GROW_STEP + 1), first) if j not in measured]
            measured.update(zip(fine, measure([masks(prefixes[j]) for j in fine])))
    order = sorted(measured)
    grown = [measured[j] for j in order]
    curve = [point(prefixes[j], "grow", added=f"{prefixes[j][-1][0]}:"
                   f"{format_head(prefixes[j][-1][1])}", accuracy=a, faithfulness=f,
                   lower_bound=lb) for j, (a, f, lb) in zip(order, grown)]
    ceiling_f = None
    reach = [order[i] for i, (_, _, lb) in enumerate(grown) if lb >= cfg.target]
    note = ""
    if not reach:
        ceiling_f = measure([ceiling])[0][1]
        if max(f for _, f, _ in grown) < cfg.target:
            msg = (f"target faithfulness {cfg.target:.2f} is unreachable: all {len(candidates)} "
                   f"candidate heads ({n_units(candidates)} head x role units: every sender with "
                   f"a negative score on the traced edges) reach {grown[-1][1]:.2f}, and keeping "
                   f"every head at the circuit's roles ({', '.join(all_roles)}) reaches "
                   f"{ceiling_f:.2f} (full model accuracy {full:.2f} on {len(prompts)} held-out "
                   f"prompts = faithfulness 1.00). Lower --target or give fixed --sizes.")
            units = candidates
            return units, curve, _summary(loaded, prompts, means, masks(units), full, units,
                                          roles, cfg, ev, grown[-1][1], message=msg,
                                          ceiling=ceiling_f,
                                          unreachable=cfg.on_unreachable == "error")
        best = max(order, key=lambda j: (measured[j][2], -j))
        note = (f"faithfulness {cfg.target:.2f} is reached as an estimate but not with "
                f"{cfg.size_z:g} standard errors to spare on {len(prompts)} held-out prompts; "
                f"kept the prefix with the best lower bound ({measured[best][2]:.2f}); use more "
                f"--n-validate prompts for a firmer size")
        reach = [best]
    units = prefixes[reach[0]]
    if cfg.sizing == "bisect":  # no pruning: its single-removal screen costs a forward per unit
        out = _summary(loaded, prompts, means, masks(units), full, units, roles, cfg, ev,
                       measured[reach[0]][1], message=note, ceiling=ceiling_f)
        out["lower_bound"] = measured[reach[0]][2]
        return units, curve, out
    ok = lambda lb: lb >= min(cfg.target, measured[reach[0]][2])  # noqa: E731
    # prune: single removals that keep the criterion, then the longest run of them (least harm
    # first) that still keeps it, found by bisection over the run's length
    # (single removals are screened on the first half of the prompts; every accepted removal
    # set is then checked on all of them)
    half = max(1, len(prompts) // 2)
    drops = measure([masks([u for u in units if u != v]) for v in units], half)
    removable = sorted((i for i, (_, f, _) in enumerate(drops) if f >= cfg.target),
                       key=lambda i: -drops[i][1])

    def without_first(n: int) -> list[tuple[str, Head]]:
        gone = set(removable[:n])
        return [u for j, u in enumerate(units) if j not in gone]

    lo, hi = 0, len(removable)  # invariant: removing the first lo keeps the criterion
    while lo < hi:
        mid = (lo + hi + 1) // 2
        trial = without_first(mid)
        (a, f, lb), = measure([masks(trial)])
        curve.append(point(trial, "prune", accuracy=a, faithfulness=f, lower_bound=lb,
                           removed=[f"{units[i][0]}:{format_head(units[i][1])}"
                                    for i in removable[:mid]]))
        lo, hi = (mid, hi) if ok(lb) else (lo, mid - 1)
    units = without_first(lo)
    (_, final_f, final_lb), = measure([masks(units)])
    out = _summary(loaded, prompts, means, masks(units), full, units, roles, cfg, ev, final_f,
                   message=note, ceiling=ceiling_f)
    out["lower_bound"] = final_lb
    return units, curve, out


def _bisect_grow(n: int, measure_one, target: float) -> dict[int, tuple[float, float, float]]:
    """Measure prefixes ``j`` (``j + 1`` units) of doubling length until one's lower bound
    reaches ``target``, then bisect between the last miss and that hit; O(log n) measurements.
    Returns every measured ``j`` with its (accuracy, faithfulness, lower bound)."""
    measured: dict[int, tuple[float, float, float]] = {}
    lo, hi, j = -1, None, 0
    while True:
        measured[j] = measure_one(j)
        if measured[j][2] >= target:
            hi = j
            break
        lo = j
        if j == n - 1:
            return measured
        j = min(n - 1, 2 * j + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        measured[mid] = measure_one(mid)
        lo, hi = (lo, mid) if measured[mid][2] >= target else (mid, hi)
    return measured


def _summary(loaded, prompts, means, keep, full, units, roles, cfg, ev, faith_paper: float,
             message: str = "", ceiling: float | None = None, unreachable: bool = False) -> dict:
    """Faithfulness of the chosen units on the held-out prompts under both protocols."""
    kept_acc = variant_accuracies(loaded, prompts, means, [keep], keep_other_positions=True,
                                  **ev)[0]
    L, H = loaded.arch.n_layers, loaded.arch.n_heads
    n_units = len({(roles[g], h) for g, h in units})
    return {"full_accuracy": full, "n_validate": len(prompts), "target": cfg.target,
            "faithfulness_paper": faith_paper,
            "faithfulness_keep_other_positions": faithfulness(full, kept_acc),
            "units": n_units, "roles": sorted({roles[g] for g, _ in units}),
            "unit_fraction": n_units / (L * H * max(1, len({roles[g] for g, _ in units}))),
            "ceiling_faithfulness": ceiling, "message": message, "unreachable": unreachable}


__all__ = ["GROW_STEP", "Group", "size_circuit"]
