"""Figures of position-aware discovery: the position scan heatmap, the circuit graph (groups as
heads × role, edges ``--q|k|v-->``) and the size-vs-faithfulness curve."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..core.circuit import Circuit, format_head
from ..core.task import PARTITION_ROLES
from .figures import integer_ticks, pyplot, save_figure, with_n
from .palette import EDGE_MEANING, EDGE_STYLE, group_colors


def scan_heatmap(result, path: str | Path, title: str = "") -> Path:
    """Accuracy with all heads of layer L mean-ablated at role R: layers (rows, integer ticks)
    × roles (columns), each measured cell annotated (unmeasured cells of a hybrid scan are grey,
    marked "–"), the unablated accuracy and n in the title. An attribution or hybrid scan adds a
    second panel: the estimated change of the answer's mean log-probability per cell."""
    plt = pyplot()
    import numpy as np

    acc = np.array(result.accuracy, dtype=float)
    est = None if result.estimate is None else np.array(result.estimate, dtype=float)
    panels = 1 if est is None else 2
    width = max(5.0, 0.9 * len(result.roles) + 2)
    fig, axes = plt.subplots(1, panels, figsize=(width * panels, max(2.8, 0.45 * acc.shape[0] + 1.6)),
                             squeeze=False)
    ax = axes[0, 0]
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("#dddddd")
    im = ax.imshow(np.ma.masked_invalid(acc), cmap=cmap, vmin=0,
                   vmax=max(result.baseline, 1e-6), aspect="auto", interpolation="nearest",
                   origin="lower")
    for (l, r), v in np.ndenumerate(acc):
        ax.text(r, l, "–" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7,
                color="#666666" if np.isnan(v) else "white" if v < 0.5 * result.baseline
                else "black")
    measured = int(np.isfinite(acc).sum())
    how = "" if measured == acc.size else f"; {measured} of {acc.size} cells measured, grey: not"
    for a in axes[0]:
        a.set_xticks(range(len(result.roles)))
        a.set_xticklabels(result.roles, rotation=35, ha="right", fontsize=8)
        a.set_xlabel("role where the layer's heads are mean-ablated")
        a.set_ylabel("layer")
        integer_ticks(a.yaxis)
    ax.set_title(f"{title or Path(result.model).name}: accuracy with all heads of one layer "
                 f"ablated at one role\n(unablated {result.baseline:.2f}, n={result.n} prompts"
                 f"{how})", fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy")
    if est is not None:
        bx = axes[0, 1]
        lim = max(float(np.abs(est).max()), 1e-6)
        im2 = bx.imshow(est, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto",
                        interpolation="nearest", origin="lower")
        bx.set_title(f"attribution estimate: change of mean log p(answer)\n(first order, "
                     f"n={result.n} prompts; blue = the ablation hurts)", fontsize=9)
        fig.colorbar(im2, ax=bx, label="Δ log p (estimate)")
    return save_figure(fig, path)


def _short_function(name: str, function: str) -> str:
    """A group's box label without its ``@ role`` (the column already says the role)."""
    return (function or name).split(" @ ")[0].split("@")[0].replace("_", " ")


def _wrap_heads(heads, per_line: int = 4, most: int = 16) -> str:
    """The group's heads, ``per_line`` to a line; past ``most`` (a real model's big groups) the
    first ``most`` in the group's order and a count of the rest, so boxes stay readable."""
    names = [format_head(h) for h in heads]
    rest = len(names) - most if len(names) > most else 0
    names = names[:most] if rest else names
    lines = [" ".join(names[i:i + per_line]) for i in range(0, len(names), per_line)]
    return "\n".join(lines + ([f"+{rest} more ({len(heads)} heads)"] if rest else []))


def circuit_graph(circuit: Circuit, path: str | Path, title: str = "") -> Path:
    """The circuit as a graph: one box per group (its function and heads), in a column of its
    own grouped by role, at the group's mean layer; arrows ``sender → receiver`` coloured and
    dashed by edge kind (:data:`~.palette.EDGE_STYLE`, as in the flow diagram), the output on top.
    Box colours are the groups' colours of the flow diagram (:func:`~.palette.group_colors`)."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator

    plt = pyplot()
    order = list(PARTITION_ROLES)
    groups = {n: g for n, g in circuit.groups.items() if g.heads}
    mean = {n: sum(l for l, _ in g.heads) / len(g.heads) for n, g in groups.items()}
    roles = sorted(dict.fromkeys(g.position for g in groups.values()),
                   key=lambda r: (order.index(r) if r in order else len(order), r))
    # every group its own slot: roles left to right, inside a role by mean layer
    slots = sorted(groups, key=lambda n: (roles.index(groups[n].position), mean[n], n))
    xy = {n: (float(i), mean[n]) for i, n in enumerate(slots)}
    colors = group_colors(circuit.groups)
    n_layers = circuit.n_layers
    out_y = n_layers - 0.2
    senders = [e.sender for e in circuit.edges if e.kind == "logits" and e.sender in xy]
    out_x = sum(xy[s][0] for s in senders) / len(senders) if senders else (len(slots) - 1) / 2
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 * len(slots) + 3.2),
                                    max(4.2, 0.9 * n_layers + 2.4)))
    drawn_kinds = []
    for e in circuit.edges:
        if e.sender not in xy or (e.receiver != "logits" and e.receiver not in xy):
            continue
        (x0, y0) = xy[e.sender]
        (x1, y1) = (out_x, out_y) if e.receiver == "logits" else xy[e.receiver]
        col, ls = EDGE_STYLE[e.kind]
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="-|>", color=col, lw=1.6, ls=ls,
                                    shrinkA=22, shrinkB=22, connectionstyle="arc3,rad=0.3"))
        drawn_kinds.append(e.kind)
    for n in slots:
        g = groups[n]
        ax.text(*xy[n], f"{_short_function(n, g.function)}\n{_wrap_heads(g.heads)}",
                ha="center", va="center", fontsize=8, zorder=4,
                bbox=dict(boxstyle="round", fc=colors[n], ec="black", alpha=0.85))
    if senders:
        ax.text(out_x, out_y, "output (logits)", ha="center", va="center", fontsize=8, zorder=4,
                bbox=dict(boxstyle="round", fc="#f3f3f3", ec="black"))
    ax.axhline(n_layers - 0.5, color="0.6", lw=0.8, ls=":")
    # role names under their slots
    centres = [sum(i for i, n in enumerate(slots) if groups[n].position == r)
               / sum(1 for n in slots if groups[n].position == r) for r in roles]
    ax.set_xticks(centres)
    ax.set_xticklabels(roles)
    for a, b in zip(roles, roles[1:]):
        last_a = max(i for i, n in enumerate(slots) if groups[n].position == a)
        ax.axvline(last_a + 0.5, color="0.85", lw=0.8)
    ax.set_xlim(-0.6, max(len(slots), 1) - 0.4)
    ax.set_ylim(-0.8, n_layers + 0.2)
    ax.yaxis.set_major_locator(FixedLocator(list(range(n_layers))))
    ax.set_xlabel("role (token positions the group reads at)")
    ax.set_ylabel("layer (mean over the group's heads)")
    empty = [n for n, g in circuit.groups.items() if not g.heads]
    head = with_n(f"{title or Path(circuit.model).name}: circuit graph",
                  circuit.settings.get("n_prompts"))
    ax.set_title(head + (f"\nempty (not drawn): {', '.join(empty)}" if empty else ""),
                 fontsize=9)
    handles = [Line2D([], [], color=EDGE_STYLE[k][0], ls=EDGE_STYLE[k][1], lw=1.8,
                      label=EDGE_MEANING[k]) for k in EDGE_STYLE if k in drawn_kinds]
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
                  frameon=False, title="edges", title_fontsize=8, alignment="left")
    return save_figure(fig, path)


def plot_size_curve(curve: Sequence[dict], path: str | Path, target: float,
                    title: str = "", n: int | None = None, ceiling: float | None = None) -> Path:
    """Faithfulness on held-out prompts against circuit size ((head, role) units) while heads
    are added in score order, pruning steps marked, the target as a dashed line and, when
    measured, the ceiling (every head kept at the circuit's roles) as a dotted one."""
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
    if ceiling is not None:
        ax.axhline(ceiling, color="tab:red", ls=":", lw=1.0,
                   label=f"ceiling {ceiling:.2f}: every head at the circuit's roles")
    ax.set_xlabel("circuit size: (head, role) units")
    ax.set_ylabel("faithfulness (paper protocol)")
    integer_ticks(ax.xaxis)
    ax.set_title(with_n(title or "size vs faithfulness", n, "held-out prompts"), fontsize=9)
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
                                     result.sizing.get("n_validate"),
                                     result.sizing.get("ceiling_faithfulness")))
    return paths


__all__ = ["auto_discovery_figures", "circuit_graph", "plot_size_curve", "scan_heatmap"]
