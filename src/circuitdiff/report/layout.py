"""Is a figure readable? Text boxes that overlap or leave the canvas, found with the renderer.

Every figure circuitdiff draws goes through :func:`~circuitdiff.report.figures.save_figure`,
which calls :func:`layout_problems` on the finished figure (after ``tight_layout``) and warns
with :class:`FigureLayoutWarning` for each problem: tick labels printed on top of each other, a
legend wider than the figure, an annotation over an axis label. The tests turn the warning into
a failure; a long study only warns (a crowded figure is still worth saving).

What is measured: every visible, non-empty text of the figure — titles, axis labels, tick labels
(those inside the axis' view), offset texts, ``ax.text`` / ``ax.annotate`` texts (with their
frame, when they have one), figure texts and the suptitle — and every legend as one box (its
entries are laid out by matplotlib and never overlap each other). Boxes come from
``get_window_extent`` with the Agg renderer, in display pixels.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

#: overlaps and overhangs up to this many pixels are tolerated (antialiasing, rounding)
TOLERANCE_PX = 1.5


class FigureLayoutWarning(UserWarning):
    """A figure has overlapping or clipped text (see :func:`layout_problems`)."""


@dataclass(frozen=True)
class TextBox:
    """One measured text (or legend): what it is, and its box ``x0, y0, x1, y1`` in pixels."""

    what: str
    x0: float
    y0: float
    x1: float
    y1: float

    def overlap(self, other: "TextBox") -> float:
        """Side of the overlap (the smaller of its width and height), 0 when apart."""
        w = min(self.x1, other.x1) - max(self.x0, other.x0)
        h = min(self.y1, other.y1) - max(self.y0, other.y0)
        return max(0.0, min(w, h))


def _short(text: str, n: int = 30) -> str:
    t = " ".join(text.split())
    return t if len(t) <= n else t[: n - 1] + "…"


def _text_box(text, renderer, what: str) -> TextBox | None:
    if not text.get_visible() or not text.get_text().strip():
        return None
    bb = text.get_window_extent(renderer)
    patch = text.get_bbox_patch()
    if patch is not None:
        pb = patch.get_window_extent(renderer)
        bb = bb.union([bb, pb])
    return TextBox(f"{what} {_short(text.get_text())!r}", bb.x0, bb.y0, bb.x1, bb.y1)


def _tick_labels(axis, renderer, name: str) -> list[TextBox]:
    lo, hi = sorted(axis.get_view_interval())
    out = []
    for tick in axis.get_major_ticks() + axis.get_minor_ticks():
        loc = tick.get_loc()
        if loc is None or not lo - 1e-9 <= loc <= hi + 1e-9:
            continue
        for lab in (tick.label1, tick.label2):
            if tick.get_visible() and lab.get_visible():
                b = _text_box(lab, renderer, f"{name} tick label")
                if b is not None:
                    out.append(b)
    return out


def text_boxes(fig) -> list[TextBox]:
    """Every visible text (and legend) of ``fig`` with its box in display pixels."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes: list[TextBox] = []

    def add(text, what: str) -> None:
        b = _text_box(text, renderer, what)
        if b is not None:
            boxes.append(b)

    for i, ax in enumerate(fig.axes):
        if not ax.get_visible():
            continue
        tag = f"axes {i}"
        for t in (ax.title, getattr(ax, "_left_title", None), getattr(ax, "_right_title", None)):
            if t is not None:
                add(t, f"{tag} title")
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            if not axis.get_visible():
                continue
            add(axis.label, f"{tag} {name} label")
            add(axis.get_offset_text(), f"{tag} {name} offset")
            boxes += _tick_labels(axis, renderer, f"{tag} {name}")
        for t in ax.texts:
            add(t, f"{tag} text")
        leg = ax.get_legend()
        if leg is not None and leg.get_visible():
            bb = leg.get_window_extent(renderer)
            boxes.append(TextBox(f"{tag} legend", bb.x0, bb.y0, bb.x1, bb.y1))
    sup = getattr(fig, "_suptitle", None)
    for t in fig.texts:
        if t is not sup:
            add(t, "figure text")
    if sup is not None:
        add(sup, "suptitle")
    for leg in fig.legends:
        bb = leg.get_window_extent(renderer)
        boxes.append(TextBox("figure legend", bb.x0, bb.y0, bb.x1, bb.y1))
    return boxes


def layout_problems(fig, tolerance: float = TOLERANCE_PX) -> list[str]:
    """Readability problems of ``fig``, one line each (empty when it reads at a glance): a text
    box that overlaps another by more than ``tolerance`` pixels, or that leaves the canvas."""
    boxes = text_boxes(fig)
    w, h = fig.canvas.get_width_height()
    out = []
    for b in boxes:
        if b.x0 < -tolerance or b.y0 < -tolerance or b.x1 > w + tolerance or b.y1 > h + tolerance:
            out.append(f"{b.what} lies outside the {w}x{h} px figure "
                       f"(box {b.x0:.0f},{b.y0:.0f}..{b.x1:.0f},{b.y1:.0f})")
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if a.overlap(b) > tolerance:
                out.append(f"{a.what} overlaps {b.what} by {a.overlap(b):.0f} px")
    return out


def warn_layout(fig, name: str = "figure") -> list[str]:
    """:func:`layout_problems` of ``fig``, each issued as a :class:`FigureLayoutWarning`."""
    problems = layout_problems(fig)
    for p in problems:
        warnings.warn(f"{name}: {p}", FigureLayoutWarning, stacklevel=3)
    return problems


__all__ = ["FigureLayoutWarning", "TextBox", "layout_problems", "text_boxes", "warn_layout"]
