"""Statistics every method shares: bootstrap intervals over prompts, and seeded draws.

Every interval here resamples *prompts* (with replacement, seeded) and recomputes the statistic
on each resample; paired statistics (a ratio of two accuracies on the same prompts, a difference
between two models on the same prompts) reuse the same resample indices for both sides.
"""

from __future__ import annotations

from typing import Sequence

import torch


def resample_indices(n: int, resamples: int, seed: int = 0) -> torch.Tensor | None:
    """``[resamples, n]`` prompt indices drawn with replacement (``None`` when nothing to draw)."""
    if resamples <= 0 or n <= 0:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (resamples, n), generator=g)


def interval(values: torch.Tensor, confidence: float = 0.95) -> list[float] | None:
    """The central ``confidence`` percentile interval of ``values`` (``None`` if empty)."""
    if values.numel() == 0:
        return None
    a = (1 - confidence) / 2
    q = torch.quantile(values.double(), torch.tensor([a, 1 - a], dtype=torch.float64))
    return [float(q[0]) + 0.0, float(q[1]) + 0.0]  # + 0.0: no "-0.0"


def _hits(x: Sequence) -> torch.Tensor:
    return torch.as_tensor([float(v) for v in x], dtype=torch.float64)


def _paired_means(a_hits: Sequence, b_hits: Sequence, resamples: int, seed: int
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Means of ``a`` and ``b`` over the same bootstrap resamples of prompts (``[resamples]``
    each); ``None`` when the hits are missing, unpaired or nothing is drawn."""
    a, b = _hits(a_hits), _hits(b_hits)
    if a.numel() == 0 or a.numel() != b.numel():
        return None
    idx = resample_indices(a.numel(), resamples, seed)
    return None if idx is None else (a[idx].mean(1), b[idx].mean(1))


def ratio_interval(numerator_hits: Sequence, denominator_hits: Sequence, resamples: int = 1000,
                   seed: int = 0, confidence: float = 0.95) -> list[float] | None:
    """Paired bootstrap interval of ``mean(numerator) / mean(denominator)`` over prompts (e.g.
    faithfulness: circuit accuracy / model accuracy); resamples with a zero denominator are
    dropped. ``None`` when the hits are missing or no resample is usable."""
    means = _paired_means(numerator_hits, denominator_hits, resamples, seed)
    if means is None:
        return None
    n, d = means
    ok = d > 0
    return interval(n[ok] / d[ok], confidence)


def difference_interval(a_hits: Sequence, b_hits: Sequence, resamples: int = 1000, seed: int = 0,
                        confidence: float = 0.95) -> list[float] | None:
    """Paired bootstrap interval of ``mean(a) - mean(b)`` over the same prompts."""
    means = _paired_means(a_hits, b_hits, resamples, seed)
    return None if means is None else interval(means[0] - means[1], confidence)


def format_interval(ci: Sequence[float] | None, missing: str = "") -> str:
    """``[lo, hi]`` to two decimals, or ``missing`` when there is no interval."""
    return missing if not ci else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def mean_interval(hits: Sequence, resamples: int = 1000, seed: int = 0,
                  confidence: float = 0.95) -> list[float] | None:
    """Bootstrap interval of an accuracy over prompts."""
    h = _hits(hits)
    idx = resample_indices(h.numel(), resamples, seed)
    return None if idx is None else interval(h[idx].mean(1), confidence)


# -- seeded draws ---------------------------------------------------------------------------------
def draw_rng(seed: int, index: int) -> "random.Random":
    """The generator of draw ``index`` under ``seed`` (random circuits, completeness halves, DCM
    examples): ``random.Random(seed * 1_000_003 + index)``, one formula for every seeded draw, so
    each draw is reproducible on its own, whatever else was drawn."""
    import random

    return random.Random(seed * 1_000_003 + index)


def sub_seed(seed: int, name: str) -> int:
    """A seed for the stream called ``name`` under ``seed``: a stable hash of both (same on every
    machine and Python), so two uses with different names never share a stream the way
    ``seed + 1`` for two purposes does."""
    import hashlib

    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


# -- nulls -------------------------------------------------------------------------------------------
def _log_comb(n: int, k: int) -> float:
    import math

    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def hypergeom_pmf(population: int, marked: int, drawn: int) -> list[float]:
    """``P(shared = s)`` for ``s = 0..drawn``: ``drawn`` units taken at random without
    replacement from ``population`` units of which ``marked`` are marked (exact)."""
    import math

    if not (0 <= marked <= population and 0 <= drawn <= population):
        raise ValueError(f"hypergeometric needs 0 <= marked, drawn <= population, got "
                         f"{marked}, {drawn}, {population}")
    total = _log_comb(population, drawn)
    out = []
    for s in range(drawn + 1):
        if s > marked or drawn - s > population - marked:
            out.append(0.0)
        else:
            out.append(math.exp(_log_comb(marked, s) + _log_comb(population - marked, drawn - s)
                                - total))
    return out


def overlap_null(strata: Sequence[tuple[int, int, int]]) -> list[float]:
    """Exact distribution of the number of shared units between a fixed circuit and a random one
    of a given shape: one stratum per position, ``(population, fixed units there, random units
    there)``; strata are independent, so the distribution is the convolution of their
    hypergeometrics. ``P(shared = s)`` for ``s = 0..total``."""
    dist = [1.0]
    for population, marked, drawn in strata:
        pmf = hypergeom_pmf(population, marked, drawn)
        new = [0.0] * (len(dist) + len(pmf) - 1)
        for i, a in enumerate(dist):
            if a:
                for j, b in enumerate(pmf):
                    new[i + j] += a * b
        dist = new
    return dist


def upper_tail(dist: Sequence[float], observed: int) -> float:
    """``P(X >= observed)`` for a distribution given as probabilities of ``0..len-1``."""
    return float(min(1.0, sum(dist[max(0, observed):])))


def excess_interval(hits: torch.Tensor, random_hits: torch.Tensor, source_hits: torch.Tensor,
                    target_hits: torch.Tensor, resamples: int = 1000, seed: int = 0,
                    confidence: float = 0.95) -> dict:
    """Gap shares of a patched set and of its random controls on the same bootstrap resamples.

    ``hits [n]``: correct after patching the set; ``random_hits [draws, n]``: after patching
    each random set of the same shape; ``source_hits``/``target_hits [n]``: the two models
    unpatched. A share is ``(patched − target) / (source − target)`` per resample (resamples
    with no gap are dropped). Returns the share's interval, the interval of (share − mean random
    share) — paired, so the random draws' own noise is in it — each random draw's share, and
    the set's rank among the draws (1 = above all of them)."""
    n = hits.numel()
    idx = resample_indices(n, resamples, seed)
    if idx is None:
        return {"share_ci": None, "excess_ci": None, "random_shares": [], "rank": None}
    src = source_hits.double()[idx].mean(1)
    tgt = target_hits.double()[idx].mean(1)
    gap = src - tgt
    ok = gap != 0
    share = (hits.double()[idx].mean(1) - tgt) / gap
    out: dict = {"share_ci": interval(share[ok], confidence)}
    full_gap = float(source_hits.double().mean() - target_hits.double().mean())

    def point(h: torch.Tensor) -> float | None:
        if full_gap == 0:
            return None
        return (float(h.double().mean()) - float(target_hits.double().mean())) / full_gap + 0.0

    if random_hits.numel() == 0:
        out.update(excess_ci=None, random_shares=[], rank=None)
        return out
    rnd = (random_hits.double()[:, idx].mean(2) - tgt) / gap        # [draws, resamples]
    out["excess_ci"] = interval((share - rnd.mean(0))[ok], confidence)
    out["random_shares"] = [point(h) for h in random_hits]
    mine = point(hits)
    out["rank"] = None if mine is None else 1 + sum(
        1 for s in out["random_shares"] if s is not None and s >= mine)
    return out
