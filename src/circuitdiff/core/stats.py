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


def ratio_interval(numerator_hits: Sequence, denominator_hits: Sequence, resamples: int = 1000,
                   seed: int = 0, confidence: float = 0.95) -> list[float] | None:
    """Paired bootstrap interval of ``mean(numerator) / mean(denominator)`` over prompts (e.g.
    faithfulness: circuit accuracy / model accuracy); resamples with a zero denominator are
    dropped. ``None`` when the hits are missing or no resample is usable."""
    num, den = _hits(numerator_hits), _hits(denominator_hits)
    if num.numel() == 0 or num.numel() != den.numel():
        return None
    idx = resample_indices(num.numel(), resamples, seed)
    if idx is None:
        return None
    n, d = num[idx].mean(1), den[idx].mean(1)
    ok = d > 0
    return interval(n[ok] / d[ok], confidence)


def difference_interval(a_hits: Sequence, b_hits: Sequence, resamples: int = 1000, seed: int = 0,
                        confidence: float = 0.95) -> list[float] | None:
    """Paired bootstrap interval of ``mean(a) - mean(b)`` over the same prompts."""
    a, b = _hits(a_hits), _hits(b_hits)
    if a.numel() == 0 or a.numel() != b.numel():
        return None
    idx = resample_indices(a.numel(), resamples, seed)
    if idx is None:
        return None
    return interval(a[idx].mean(1) - b[idx].mean(1), confidence)


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
