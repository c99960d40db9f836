"""Figures of position-aware discovery: the position scan heatmap, the circuit graph (groups as
heads × role, edges ``--q|k|v-->``) and the size-vs-faithfulness curve."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..core.circuit import Circuit, format_head
from ..core.task import PARTITION_ROLES
from .figures import integer_ticks, pyplot, save_figure


def scan_heatmap(result, path: str | Path, title: str = "") -> Path:
    """Accuracy with all heads of layer L mean-ablated at role R: layers (rows, integer ticks)
    × roles (columns), each cell annotated, the unablated accuracy and n in the title."""
    plt = pyplot()
    import numpy as np

    acc = np.array(result.accuracy, dtype=float)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(result.roles) + 2),
                                    max(2.8, 0.45 * acc.shape[0] + 1.6)))
    im = ax.imshow(acc, cmap="viridis", vmin=0, vmax=max(result.baseline, 1e-6), aspect="auto",
                   interpolation="nearest", origin="lower")
    for (l, r), v in np.ndenumerate(acc):
        ax.text(r, l, f"{v:.2f}", ha="center", va="center", fontsize=7,
                color="white" if v < 0.5 * result.baseline else "black")
    ax.set_xticks(range(len(result.roles)))
    ax.set_xticklabels(result.roles, rotation=35, ha="right", fontsize=8)
    ax.set_xlabel("role where the layer's heads are mean-ablated")
    ax.set_ylabel("layer")
    integer_ticks(ax.yaxis)
    ax.set_title(f"{title or Path(result.model).name}: accuracy with all heads of one layer "
                 f"ablated at one role\n(unablated {result.baseline:.2f}, n={result.n} prompts)",
                 fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy")
    return save_figure(fig, path)


def circuit_graph(circuit: Circuit, path: str | Path, title: str = "") -> Path:
    """The circuit as a graph: one box per group (function, role, heads) placed by role
    (columns) and mean layer (rows), arrows ``sender --kind--> receiver``, the logits on top."""
    plt = pyplot()

    order = [r for r in PARTITION_ROLES]
    roles = list(dict.fromkeys(g.position for g in circuit.groups.values()))
    cols = sorted(roles, key=lambda r: (order.index(r) if r in order else len(order), r))
    xy: dict[str, tuple[float, float]] = {}
    per_cell: dict[tuple[str, float], int] = {}
    for name, g in circuit.groups.items():
        y = sum(l for l, _ in g.heads) / max(1, len(g.heads))
        cell = (g.position, round(y, 1))
        k = per_cell.get(cell, 0)
        per_cell[cell] = k + 1
        xy[name] = (cols.index(g.position) + 0.18 * k, y + 0.35 * k)
    top = max([y for _, y in xy.values()] + [circuit.n_layers - 1]) + 1.2
    xy["logits"] = ((len(cols) - 1) / 2, top)
    fig, ax = plt.subplots(figsize=(max(6.0, 2.6 * len(cols)), max(4.0, 1.1 * top + 1.5)))
    colors = {"q": "tab:blue", "k": "tab:orange", "v": "tab:green", "logits": "black"}
    for e in circuit.edges:
        (x0, y0), (x1, y1) = xy[e.sender], xy[e.receiver]
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="->", color=colors[e.kind], lw=1.4,
                                    shrinkA=18, shrinkB=18, connectionstyle="arc3,rad=0.12"))
        ax.text((x0 + x1) / 2, (y0 + y1) / 2, e.kind, color=colors[e.kind], fontsize=8,
                ha="center", va="center", bbox=dict(fc="white", ec="none", pad=0.5))
    for name, g in circuit.groups.items():
        x, y = xy[name]
        heads = " ".join(format_head(h) for h in g.heads)
        ax.text(x, y, f"{g.function or name}\n{heads}", ha="center", va="center", fontsize=7,
                bbox=dict(boxstyle="round", fc="lightyellow", ec="gray"))
    ax.text(*xy["logits"], "logits @ last", ha="center", va="center", fontsize=8,
            bbox=dict(boxstyle="round", fc="lightgray", ec="gray"))
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols)
    ax.set_xlim(-0.7, len(cols) - 0.3)
    ax.set_ylim(-0.8, top + 0.8)
    ax.set_xlabel("role (token positions the group reads at)")
    ax.set_ylabel("layer (mean over the group's heads)")
    integer_ticks(ax.yaxis)
    n = circuit.settings.get("n_prompts")
    ax.set_title(f"{title or Path(circuit.model).name}: circuit graph"
                 f"{f' (n={n} prompts)' if n else ''}; edges q / k / v / logits", fontsize=9)
    return save_figure(fig, path)


def plot_size_curve(curve: Sequence[dict], path: str | Path, target: float,
                    title: str = "", n: int | None = None) -> Path:
    """Faithfulness on held-out prompts against circuit size ((head, role) units) while heads
    are added in score order, pruning steps marked, the target as a dashed line."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.8))
    grow = [c for c in curve if c.get("step") != "prune"]
    prune = [c for c in curve if c.get("step") == "prune"]
    ax.plot([c["units"] for c in grow], [c["faithfulness"] for c in grow], marker="o", ms=3,
            label="adding heads in score order")
    if prune:
        ax.scatter([c["units"] for c in prune], [c["faithfulness"] for c in prune], marker="x",
                   color="tab:red", label="pruning trials")
    ax.axhline(target, color="k", ls="--", lw=0.8, label=f"target {target:.2f}")
    ax.set_xlabel("circuit size ((head, role) units)")
    ax.set_ylabel("faithfulness (paper protocol)")
    integer_ticks(ax.xaxis)
    ax.set_title((title or "size vs faithfulness") + (f" (n={n} held-out prompts)" if n else ""),
                 fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def auto_discovery_figures(result, out: str | Path, model_name: str) -> list[Path]:
    """``scan.png``, ``circuit_graph.png`` and ``curve.png`` of an automatic-chain result."""
    out = Path(out)
    name = Path(model_name).name
    paths = [circuit_graph(result.circuit, out / "circuit_graph.png", name)]
    if result.scan is not None:
        paths.append(scan_heatmap(result.scan, out / "scan.png", name))
    if result.curve:
        paths.append(plot_size_curve(result.curve, out / "curve.png",
                                     result.sizing.get("target", 0.9), name,
                                     result.sizing.get("n_validate")))
    return paths


__all__ = ["auto_discovery_figures", "circuit_graph", "plot_size_curve", "scan_heatmap"]
