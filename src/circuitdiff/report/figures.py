"""Every figure circuitdiff draws: headless backend, atomic writes, labelled axes, integer layer
ticks, the number of prompts once in each title, colours from :mod:`.palette`, and a readability
check (:mod:`.layout`: no overlapping or clipped text) before each figure is saved."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch

from ..core.distributed import is_main
from ..core.runs import temp_path
from .layout import warn_layout
from .palette import MODEL_COLORS, RANDOM_HATCH
from .tables import short_name


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` atomically (a killed run never leaves half a PNG) and close it.

    Before saving, the figure's text is measured (:func:`~.layout.warn_layout`): overlapping or
    clipped labels are reported as a :class:`~.layout.FigureLayoutWarning` (the tests make it
    an error). Under ``torchrun`` only rank 0 writes (every rank holds the same figure)."""
    path = Path(path)
    if not is_main():
        pyplot().close(fig)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.set_dpi(dpi)  # measure at the resolution that is saved
    warn_layout(fig, path.name)
    tmp = temp_path(path)
    try:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
        tmp.replace(path)
    finally:
        pyplot().close(fig)
        tmp.unlink(missing_ok=True)
    return path


def with_n(title: str, n: int | None, what: str = "prompts") -> str:
    """``title`` with `` (n=N prompts)`` appended, unless ``n`` is unknown or the title already
    says ``n=N`` (a caller's title may carry it: never print it twice)."""
    if n is None or re.search(rf"\bn\s*=\s*{n}\b", title):
        return title
    return f"{title} (n={n} {what})"


def integer_ticks(axis) -> None:
    """Ticks on whole numbers only (layers and heads are integers)."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def score_heatmap(scores: torch.Tensor, title: str, path: str | Path,
                  heads: Sequence[tuple[int, int]] = ()) -> Path:
    """``[layers, heads]`` scores as a diverging heatmap, chosen heads outlined."""
    plt = pyplot()

    s = scores.float().numpy()
    lim = float(abs(scores[torch.isfinite(scores)]).max()) if torch.isfinite(scores).any() else 1.0
    fig, ax = plt.subplots(figsize=(max(4, s.shape[1] * 0.25 + 2), max(3, s.shape[0] * 0.2 + 1)))
    im = ax.imshow(s, cmap="RdBu", vmin=-lim or -1, vmax=lim or 1, aspect="auto",
                   interpolation="nearest")
    for layer, head in heads:
        ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, lw=1.2))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="path-patching score")
    integer_ticks(ax.yaxis)
    integer_ticks(ax.xaxis)
    return save_figure(fig, path, dpi=100)


def plot_completeness(points: Sequence, path: str | Path,
                      title: str = "") -> Path:
    """Scatter of F(C∖K) against F(M∖K) with the diagonal, saved as PNG (matplotlib Agg)."""
    plt = pyplot()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for kind, marker in (("group", "s"), ("half", "o")):
        pts = [p for p in points if p.subset.startswith(kind)]
        ax.scatter([p.circuit_minus_k for p in pts], [p.model_minus_k for p in pts],
                   marker=marker, label="whole group" if kind == "group" else "random half")
    placed: list[tuple[float, float]] = []
    for p in points:
        if p.subset.startswith("group"):
            xy = (p.circuit_minus_k, p.model_minus_k)
            # points that (nearly) coincide get their names stacked, not printed on each other
            k = sum(abs(x - xy[0]) < 0.06 and abs(y - xy[1]) < 0.06 for x, y in placed)
            placed.append(xy)
            ax.annotate(p.subset.split(":", 1)[1], xy, xytext=(4, 3 + 10 * k),
                        textcoords="offset points", fontsize=7)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("F(C \\ K)  (circuit minus K)")
    ax.set_ylabel("F(M \\ K)  (model minus K)")
    ax.set_title(title or "completeness", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_knockout_curves(curves: Sequence, path: str | Path, title: str = "") -> Path:
    """Accuracy against the first blocked layer, one line per edge (PNG, matplotlib Agg)."""
    plt = pyplot()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for c in curves:
        ax.plot(c.layers, c.accuracy, marker="o", ms=3, label=c.edge)
    if curves:
        ax.axhline(curves[0].baseline, color="k", ls="--", lw=0.8, label="no knockout")
    ax.set_xlabel("attention blocked in layers ≥ L")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    integer_ticks(ax.xaxis)
    ax.set_title(with_n(title or "attention knockout", curves[0].n if curves else None),
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return save_figure(fig, path)


def discovery_heatmaps(result, out: str | Path, model_name: str) -> list[Path]:
    """``heatmap_<group>.png`` in ``out`` for every scored group of a discovery result."""
    n = result.circuit.settings.get("n_prompts")
    paths = []
    for group, g in result.circuit.groups.items():
        if not g.heads and result.circuit.settings.get("truncated_at"):
            continue  # a truncated (empty) group has no scores to show
        paths.append(score_heatmap(result.scores[group],
                                   with_n(f"{group} @ {g.position}", n) + "\n"
                                   f"{Path(model_name).name}",
                                   Path(out) / f"heatmap_{group}.png", g.heads))
    return paths


def plot_faithfulness_bars(rows: Sequence, path: str | Path, title: str = "") -> Path:
    """Per model, faithfulness of each circuit (bar, with its bootstrap interval) next to the
    random circuits' (hatched, mean ± sd, random accuracy / model accuracy)."""
    plt = pyplot()
    models = list(dict.fromkeys(r.model for r in rows))
    circuits = list(dict.fromkeys(r.circuit for r in rows))
    at = {(r.model, r.circuit): r for r in rows}
    slots = [(c, False) for c in circuits] + [(c, True) for c in circuits
                                              if any(at.get((m, c)) and at[(m, c)].random_mean
                                                     is not None for m in models)]
    width = 0.8 / max(1, len(slots))
    fig, ax = plt.subplots(figsize=(max(5.5, 1.5 * len(models) + 2), 3.8))
    for si, (c, rnd) in enumerate(slots):
        color = MODEL_COLORS[circuits.index(c) % len(MODEL_COLORS)]
        xs, vals, lo, hi = [], [], [], []
        for mi, m in enumerate(models):
            r = at.get((m, c))
            if r is None or r.full <= 0:
                continue
            if rnd:
                if r.random_mean is None:
                    continue
                v, e = r.random_mean / r.full, (r.random_sd or 0.0) / r.full
                lo.append(e)
                hi.append(e)
            else:
                v = r.faithfulness or 0.0
                ci = getattr(r, "faithfulness_ci", None)
                lo.append(v - ci[0] if ci else 0.0)
                hi.append(ci[1] - v if ci else 0.0)
            xs.append(mi - 0.4 + (si + 0.5) * width)
            vals.append(v)
        ax.bar(xs, vals, width, yerr=[lo, hi], capsize=2, color=color,
               alpha=0.35 if rnd else 1.0, hatch=RANDOM_HATCH if rnd else None,
               label=f"{c}: random circuits (mean ± sd)" if rnd else f"{c} (95% CI)")
    ax.axhline(1.0, color="k", ls="--", lw=0.8)
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels([short_name(m) for m in models], fontsize=8)
    ax.set_xlabel("model")
    ax.set_ylabel("faithfulness (circuit acc / model acc)")
    ax.set_ylim(0, 1.45)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2])
    ax.set_title(with_n(title or "faithfulness of the base circuits on every model",
                        rows[0].n if rows else None), fontsize=9)
    ax.legend(fontsize=7, ncol=2, loc="upper center")
    return save_figure(fig, path)
