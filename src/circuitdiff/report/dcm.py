"""DCM tables (printed, JSON, CSV) and figures: the λ curve per group and the functional-patching
bars across models."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

from ..core.runs import RunFolder, atomic_write_text
from ..methods.dcm import DesideratumResult, FunctionalRow
from .figures import integer_ticks, pyplot, save_figure, with_n
from .palette import RANDOM_HATCH, model_colors
from .tables import fmt, short_name


def _grid(head: list[str], body: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), "-+-".join("-" * w for w in widths)] + [line(b) for b in body])


def _rand(mean: float | None, sd: float | None) -> str:
    return "-" if mean is None else f"{mean:.2f}±{sd:.2f}"


def format_dcm_table(rows: Sequence[DesideratumResult], empty_groups: Sequence[str] = ()) -> str:
    """group | position | desideratum | λ | selected/size | heads | target acc | random | whole
    group | no patch; empty groups listed as such."""
    head = ["group", "position", "desideratum", "λ", "selected", "target acc", "random (mean±sd)",
            "whole group", "no patch", "heads"]
    body = [[r.group, r.position, r.desideratum, f"{r.chosen_lambda:g}",
             f"{len(r.selected)}/{len(r.group_heads)}", fmt(r.test_accuracy),
             _rand(r.random_mean, r.random_sd), fmt(r.whole_group), fmt(r.no_patch),
             " ".join(r.selected) or "-"] for r in rows]
    body += [[g, "-", "(empty group)", "-", "0/0", "-", "-", "-", "-", "-"] for g in empty_groups]
    return _grid(head, body)


def dcm_csv(rows: Sequence[DesideratumResult]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["group", "position", "desideratum", "lambda", "n_selected", "group_size",
                "fraction", "selected", "test_accuracy", "random_mean", "random_sd",
                "whole_group", "no_patch", "n_train", "n_val", "n_test"])
    for r in rows:
        w.writerow([r.group, r.position, r.desideratum, r.chosen_lambda, len(r.selected),
                    len(r.group_heads), r.fraction, " ".join(r.selected), r.test_accuracy,
                    "" if r.random_mean is None else r.random_mean,
                    "" if r.random_sd is None else r.random_sd, r.whole_group, r.no_patch,
                    r.n_train, r.n_val, r.n_test])
    return buf.getvalue()


def curve_csv(rows: Sequence[DesideratumResult]) -> str:
    """Every point of every λ sweep: one line per (group, desideratum, λ)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["group", "desideratum", "lambda", "chosen", "n_selected", "fraction",
                "val_accuracy", "test_accuracy", "selected", "mask"])
    for r in rows:
        for c in r.curve:
            w.writerow([r.group, r.desideratum, c["lambda"], c["lambda"] == r.chosen_lambda,
                        c["n_selected"], c["fraction"], c["val_accuracy"], c["test_accuracy"],
                        " ".join(c["selected"]), " ".join(str(x) for x in c["mask"])])
    return buf.getvalue()


def format_functional_table(rows: Sequence[FunctionalRow]) -> str:
    """(group, desideratum) rows × model columns: target accuracy (random mean)."""
    models = list(dict.fromkeys(r.model for r in rows))
    keys = list(dict.fromkeys((r.group, r.desideratum) for r in rows))
    at = {(r.group, r.desideratum, r.model): r for r in rows}
    head = ["group / desideratum", "heads"] + [short_name(m) for m in models]
    body = []
    for g, d in keys:
        first = next(r for r in rows if (r.group, r.desideratum) == (g, d))
        cells = [f"{g} / {d}", str(len(first.selected))]
        for m in models:
            r = at.get((g, d, m))
            cells.append("-" if r is None else
                         f"{r.accuracy:.2f} (rand {fmt(r.random_mean)})")
        body.append(cells)
    return _grid(head, body)


def functional_csv(rows: Sequence[FunctionalRow]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "group", "desideratum", "n_heads", "selected", "accuracy", "no_patch",
                "random_mean", "random_sd", "n"])
    for r in rows:
        w.writerow([r.model, r.group, r.desideratum, len(r.selected), " ".join(r.selected),
                    r.accuracy, r.no_patch, "" if r.random_mean is None else r.random_mean,
                    "" if r.random_sd is None else r.random_sd, r.n])
    return buf.getvalue()


def _write_text(folder: RunFolder, name: str, text: str) -> Path:
    return atomic_write_text(folder.file(name), text)


def save_dcm_tables(folder: RunFolder, rows: Sequence[DesideratumResult],
                    empty_groups: Sequence[str], stem: str) -> tuple[Path, Path]:
    """``<stem>.json`` (rows with their λ curves + empty groups), ``<stem>.csv`` (the chosen λ
    per row) and ``<stem>_curve.csv`` (every λ) in the run folder."""
    pj = folder.save_json(f"{stem}.json", {"rows": [r.to_dict() for r in rows],
                                           "empty_groups": list(empty_groups)})
    _write_text(folder, f"{stem}_curve.csv", curve_csv(rows))
    return pj, _write_text(folder, f"{stem}.csv", dcm_csv(rows))


def save_functional_tables(folder: RunFolder, rows: Sequence[FunctionalRow],
                           stem: str = "functional") -> tuple[Path, Path]:
    pj = folder.save_json(f"{stem}.json", [r.to_dict() for r in rows])
    return pj, _write_text(folder, f"{stem}.csv", functional_csv(rows))


def plot_lambda_curve(rows: Sequence[DesideratumResult], path: str | Path,
                      title: str = "") -> Path:
    """Per desideratum of one group: heads selected (left) and test target accuracy (right)
    against λ (log scale), the chosen λ marked."""
    plt = pyplot()
    fig, (ax_n, ax_a) = plt.subplots(1, 2, figsize=(8, 3.4))
    for r in rows:
        lams = [c["lambda"] for c in r.curve]
        line, = ax_n.plot(lams, [c["n_selected"] for c in r.curve], marker="o", ms=3,
                          label=r.desideratum)
        ax_a.plot(lams, [c["test_accuracy"] for c in r.curve], marker="o", ms=3,
                  color=line.get_color(), label=r.desideratum)
        ax_a.plot([r.chosen_lambda], [r.test_accuracy], marker="*", ms=10,
                  color=line.get_color())
    size = len(rows[0].group_heads) if rows else 0
    for ax in (ax_n, ax_a):
        ax.set_xscale("log")
        ax.set_xlabel("λ (sparsity penalty)")
    ax_n.set_ylabel(f"heads selected (of {size})")
    ax_n.set_ylim(-0.3, size + 0.3)
    integer_ticks(ax_n.yaxis)
    ax_a.set_ylabel("target accuracy (test)")
    ax_a.set_ylim(-0.02, 1.02)
    ax_a.legend(fontsize=7)
    head = with_n(title or "DCM λ sweep", rows[0].n_test if rows else None, "test prompts")
    fig.suptitle(head + ("; ★ = λ chosen on validation" if rows else ""), fontsize=9)
    return save_figure(fig, path)


def _wrap(text: str, width: int = 14) -> str:
    """A long group name on short lines (``object_mover@labels`` → ``object mover\n@labels``)."""
    import textwrap

    spaced = text.replace("_", " ").replace("@", " @").replace("+", " + ")
    return "\n".join(textwrap.wrap(spaced, width)) or text


def plot_functional_bars(rows: Sequence[FunctionalRow], path: str | Path,
                         title: str = "") -> Path:
    """Grouped bars: per (group, desideratum), target accuracy in each model with the selected
    heads patched, and the random-head baseline (hatched) next to it. Model colours come from
    :func:`~.palette.model_colors`; the legend sits right of the axes."""
    plt = pyplot()
    models = list(dict.fromkeys(r.model for r in rows))
    keys = list(dict.fromkeys((r.group, r.desideratum) for r in rows))
    at = {(r.group, r.desideratum, r.model): r for r in rows}
    width = 0.8 / max(1, 2 * len(models))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(keys) + 1.5) + 2.6, 4.4))
    colors = model_colors(models)
    for mi, m in enumerate(models):
        c = colors[m]
        xs = [k + (2 * mi) * width - 0.4 + width / 2 for k in range(len(keys))]
        acc = [at[(g, d, m)].accuracy if (g, d, m) in at else 0.0 for g, d in keys]
        rnd = [(at[(g, d, m)].random_mean or 0.0) if (g, d, m) in at else 0.0 for g, d in keys]
        ax.bar(xs, acc, width, color=c, label=f"{short_name(m)}: selected heads")
        ax.bar([x + width for x in xs], rnd, width, color=c, alpha=0.35, hatch=RANDOM_HATCH,
               label=f"{short_name(m)}: random heads")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{_wrap(g)}\n→ {d}" for g, d in keys], fontsize=7)
    ax.set_xlabel("group (heads selected by DCM) → desideratum")
    ax.set_ylabel("target accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_title(with_n(title or "functional patching across models",
                        rows[0].n if rows else None), fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return save_figure(fig, path)
