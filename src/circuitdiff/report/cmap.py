"""CMAP tables and figures: the gap-share table, a bar chart per direction (with the random
control) and the per-head heatmaps. Reads a :class:`~circuitdiff.methods.cmap.CMAPResult`;
computes nothing new."""

from __future__ import annotations

from pathlib import Path

from ..core.runs import RunFolder, atomic_write_text, safe_name
from ..methods.cmap import CMAPResult, DirectionResult
from ..core.stats import format_interval
from .figures import integer_ticks, pyplot, save_figure, with_n
from .palette import MODEL_COLORS, RANDOM_COLOR, RANDOM_HATCH
from .tables import fmt, short_name


def _ci(ci: list[float] | None) -> str:
    return "" if ci is None else " " + format_interval(ci)


def direction_header(d: DirectionResult) -> str:
    """One line: source → target, their clean accuracies, the gap and n."""
    gap = "0 (share undefined)" if d.gap == 0 else f"{d.gap:+.2f}" + _ci(d.gap_ci)
    note = ("; the gap's interval contains 0: shares are unreliable"
            if d.gap != 0 and d.gap_uncertain else "")
    return (f"{short_name(d.source)} -> {short_name(d.target)}: source acc {d.source_accuracy:.2f}, "
            f"target acc {d.target_accuracy:.2f}, gap {gap} (n={d.n}, {d.seconds:.0f} s){note}")


def format_direction(d: DirectionResult) -> str:
    """The CMAP table of one direction: the (head, position) units patched and the distinct
    heads among them, patched accuracy and gap share with intervals, and the random control
    (mean±sd of accuracy, and its share)."""
    head = ["kind", "patched", "units", "heads", "accuracy [CI]", "gap share [CI]", "random acc",
            "random share"]
    body = []
    for r in d.rows:
        if r.empty:
            body.append([r.kind, r.name, "0", "0", "(empty group)", "-", "-", "-"])
            continue
        rnd = "-" if r.random_mean is None else f"{r.random_mean:.2f}±{r.random_sd:.2f}"
        body.append([r.kind, r.name, str(r.n_units), str(r.n_heads),
                     fmt(r.accuracy) + _ci(r.accuracy_ci),
                     fmt(r.share) + _ci(r.share_ci), rnd,
                     "-" if r.random_mean is None else fmt(r.random_share)])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([direction_header(d), line(head), "-+-".join("-" * w for w in widths)]
                     + [line(b) for b in body])


def format_cmap(result: CMAPResult) -> str:
    """Every direction's table, then any warnings."""
    parts = [format_direction(d) for d in result.directions]
    parts += [f"warning: {w}" for w in result.warnings]
    return "\n\n".join(parts)


def _group_numbers(d: DirectionResult) -> dict[str, str]:
    """``G1``, ``G2``, … for the circuit's groups in order (empty ones keep their number)."""
    names = [r.name for r in d.rows if r.kind == "group"]
    return {n: f"G{i + 1}" for i, n in enumerate(names)}


def _bar_label(row, num: dict[str, str]) -> str:
    """A short tick label: ``G2``, ``G1–G3`` (cumulative), ``circuit`` or ``G2 V`` (input)."""
    if row.kind == "group":
        return num.get(row.name, row.name)
    if row.kind == "cumulative":
        tags = [num.get(g, g) for g in row.groups]
        return f"{tags[0]}–{tags[-1]}" if len(tags) > 2 else "+".join(tags)
    if row.kind == "input":
        group, _, comp = row.name.partition(":")
        return f"{num.get(group, group)} {comp}"
    return row.name


def plot_cmap_bars(d: DirectionResult, path: str | Path) -> Path:
    """Bar per patched set (groups, cumulative, circuit, input): gap share with its bootstrap
    interval, next to the random control of equal size. Plots accuracy instead when the gap is
    0 (share undefined). Tick labels are short (``G1``, ``G1–G3`` for groups 1 to 3 together,
    ``G2 Q`` for one input of group 2); the legend right of the axes names the groups."""
    from matplotlib.lines import Line2D

    plt = pyplot()
    rows = [r for r in d.rows if not r.empty]
    num = _group_numbers(d)
    use_share = d.gap != 0
    value = (lambda r: r.share) if use_share else (lambda r: r.accuracy)  # noqa: E731
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(rows) + 1.5) + 3.2, 4.2))
    xs = list(range(len(rows)))
    vals = [value(r) for r in rows]
    ci = [r.share_ci if use_share else r.accuracy_ci for r in rows]
    err = [[v - c[0] if c else 0 for v, c in zip(vals, ci)],
           [c[1] - v if c else 0 for v, c in zip(vals, ci)]]
    ax.bar([x - 0.2 for x in xs], vals, width=0.4, yerr=err, capsize=2, color=MODEL_COLORS[0],
           label="patched (95% CI)")
    rnd = [(x, r.random_share if use_share else r.random_mean) for x, r in zip(xs, rows)
           if r.random_mean is not None]
    if rnd:
        ax.bar([x + 0.2 for x, _ in rnd], [v for _, v in rnd], width=0.4, color=RANDOM_COLOR,
               hatch=RANDOM_HATCH, label="random heads, same size")
    if use_share:
        ax.axhline(1.0, color="k", ls="--", lw=0.8, label="source accuracy")
        ax.axhline(0.0, color="k", lw=0.8)
    else:
        ax.axhline(d.target_accuracy, color="k", ls="--", lw=0.8, label="target accuracy")
    ax.set_xticks(xs)
    labels = [_bar_label(r, num) for r in rows]
    long = max((len(t) for t in labels), default=0) > 7
    ax.set_xticklabels(labels, rotation=45 if long else 0, ha="right" if long else "center",
                       fontsize=8)
    ax.set_xlabel("patched heads (G = group; G1–G3: groups 1 to 3 together)")
    ax.set_ylabel("gap share\n(0 = target, 1 = source accuracy)" if use_share else "accuracy")
    noise = ("\nthe gap's interval contains 0: shares are unreliable"
             if use_share and d.gap_uncertain else "")
    ax.set_title(with_n(f"CMAP {short_name(d.source)} → {short_name(d.target)}", d.n) + noise,
                 fontsize=9)
    handles, texts = ax.get_legend_handles_labels()
    key = [(Line2D([], [], ls="none"), f"{tag}: {name}") for name, tag in num.items()]
    ax.legend(handles + [h for h, _ in key], texts + [t for _, t in key], fontsize=7,
              loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
              handlelength=1.5)
    return save_figure(fig, path)


def plot_per_head(d: DirectionResult, position: str, path: str | Path) -> Path:
    """``[layers, heads]`` heatmap of single-head CMAP at ``position``: gap share (accuracy
    change when the gap is 0)."""
    import numpy as np

    plt = pyplot()
    maps = d.per_head[position]
    use_share = d.gap != 0
    grid = maps["share"] if use_share else [[a - d.target_accuracy for a in row]
                                            for row in maps["accuracy"]]
    a = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
    lim = float(np.nanmax(np.abs(a))) if np.isfinite(a).any() else 1.0
    lim = lim or 1.0
    L, H = a.shape
    fig, ax = plt.subplots(figsize=(max(5.0, H * 0.35 + 2), max(3.4, L * 0.3 + 1.6)))
    im = ax.imshow(a, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    integer_ticks(ax.xaxis)
    integer_ticks(ax.yaxis)
    ax.set_title(with_n(f"single-head CMAP at {position}", d.n) + "\n"
                 f"{short_name(d.source)} →\n{short_name(d.target)}", fontsize=8)
    fig.colorbar(im, ax=ax, label="gap share\n(0 = target, 1 = source accuracy)" if use_share
                 else "accuracy change vs target")
    return save_figure(fig, path, dpi=100)


def save_cmap_report(result: CMAPResult, folder: RunFolder, prefix: str = "cmap") -> list[Path]:
    """Write ``<prefix>/table.txt``, ``<prefix>/result.json``, a bar chart per direction and a
    heatmap per direction and per-head position; returns the paths."""
    paths = [result.save(folder.file(f"{prefix}/result.json"))]
    paths.append(atomic_write_text(folder.file(f"{prefix}/table.txt"), format_cmap(result) + "\n"))
    for d in result.directions:
        tag = safe_name(d.direction.replace("->", "_to_"))
        paths.append(plot_cmap_bars(d, folder.file(f"{prefix}/bars_{tag}.png")))
        for pos in d.per_head:
            png = folder.file(f"{prefix}/heads_{tag}_{safe_name(pos)}.png")
            paths.append(plot_per_head(d, pos, png))
    return paths
