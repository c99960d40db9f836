"""The circuit-flow figure: a circuit drawn over the tokens of one example prompt.

Prakash et al. (ICLR 2024) explain their entity-tracking circuit with a picture of information
flow: head groups placed at the token where they act and at the layers their heads live in, and
arrows for which group feeds which (query, key or value of the receiver, or the logits). This
module generates that picture from a saved :class:`~circuitdiff.core.circuit.Circuit`, so the
figure always shows the circuit that was actually found rather than a hand-drawn idealisation.

* x axis: the tokens of one example prompt (:func:`example_layout` derives them, and every role's
  token indices, from the task's own tokenizer-aware positions);
* y axis: layers, layer 0 at the bottom;
* one coloured box per (group, covered token), spanning the layer range of the group's heads —
  a multi-position role such as ``labels`` gets a box at each of its tokens;
* one arrow per edge, coloured and dashed by kind (q / k / v / logits). A sender that covers
  several tokens is joined by a bracket over its boxes and sends one arrow from the bracket (a fan
  of seven arcs per edge would be a hairball); ``logits`` edges end at an *output* marker above
  the top layer;
* groups without heads are not drawn but listed under the title (``empty: …``), together with any
  edge that could not be drawn because one of its ends is empty.

:func:`circuit_flow_figure` can also return a :class:`FlowLayout` recording every box and arrow
it drew, which is what the tests check (and what a caller can use to annotate further).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Mapping, Sequence, overload

from ..core.circuit import Circuit, CircuitEdge
from ..core.task import Prompt, TaskError, encode, split_role
from .figures import integer_ticks, pyplot, save_figure, with_n
from .palette import EDGE_MEANING, EDGE_STYLE, GROUP_COLORS, group_colors  # noqa: F401 (re-export)

_COL_WIDTH = 0.84   # width of one token column taken by boxes (1.0 = touching neighbours)
_BOX_PAD = 0.38     # half-height of a one-layer box, in layers


@dataclass(frozen=True)
class DrawnBox:
    """One rectangle: ``group`` at token ``token`` (its index in the prompt), covering
    ``x0..x1`` (token axis) and ``y0..y1`` (layer axis)."""

    group: str
    token: int
    x0: float
    x1: float
    y0: float
    y1: float


@dataclass(frozen=True)
class DrawnArrow:
    """One arrow for ``edge``, from ``start`` to ``end`` (data coordinates, before clipping at
    the boxes); ``bracket`` lists the sender tokens joined by a bracket (empty when the sender
    has one token)."""

    edge: CircuitEdge
    start: tuple[float, float]
    end: tuple[float, float]
    bracket: tuple[int, ...] = ()


@dataclass
class FlowLayout:
    """What :func:`circuit_flow_figure` drew: boxes, arrows, the groups left out for having no
    heads, groups whose role covers no token of the example prompt, edges not drawn (an end is
    empty or absent), the y ticks, the full title text and the edge tags."""

    boxes: list[DrawnBox] = field(default_factory=list)
    arrows: list[DrawnArrow] = field(default_factory=list)
    empty_groups: list[str] = field(default_factory=list)
    absent_groups: list[str] = field(default_factory=list)  # role covers no token of the prompt
    skipped_edges: list[CircuitEdge] = field(default_factory=list)
    yticks: list[float] = field(default_factory=list)
    title: str = ""
    #: each edge tag drawn (q / k / v) and where: (the arrow it names, its centre)
    tags: list[tuple[DrawnArrow, tuple[float, float]]] = field(default_factory=list)

    def boxes_of(self, group: str) -> list[DrawnBox]:
        return [b for b in self.boxes if b.group == group]


# -- example prompt ------------------------------------------------------------------------------
def example_layout(tokenizer, prompt: Prompt, roles: Iterable[str] = ()
                   ) -> tuple[list[str], dict[str, list[int]]]:
    """Token strings of ``prompt`` and the token indices of every role, for one example prompt.

    The roles come from :func:`circuitdiff.core.task.encode` (the same tokenizer-offset positions
    every method uses), so the figure puts each group exactly where the methods read it. Every
    schema role defined for the prompt is returned; ``roles`` adds names with offsets
    (``prev_query_label+1``) — :func:`circuit_flow_figure` also resolves offsets itself from
    the base role. Token strings are ``tokenizer.decode([id])`` (leading space kept), one per id,
    special tokens (e.g. BOS) included, so index ``i`` of the list is token ``i`` of the prompt.
    """
    batch = encode([prompt], tokenizer)
    ids = batch.input_ids[0].tolist()
    tokens = [tokenizer.decode([i]) for i in ids]
    names = list(dict.fromkeys([*batch.role_names(), *roles]))
    out: dict[str, list[int]] = {}
    for name in names:
        idx = batch.role(name)[0]
        out[name] = [int(i) for i in idx.reshape(-1).tolist() if i >= 0]
    return tokens, out


def _resolve(role: str, role_positions: Mapping[str, Sequence[int]], n_tokens: int) -> list[int]:
    """Token indices of ``role``: looked up directly, else its base role shifted by the offset
    (``prev_query_label+1``). Missing roles and indices outside the prompt are errors."""
    if role in role_positions:
        idx = [int(i) for i in role_positions[role] if int(i) >= 0]
    else:
        base, k = split_role(role)
        if base not in role_positions:
            raise TaskError(f"role {role!r} is not in role_positions (given: "
                            f"{', '.join(role_positions) or 'none'})")
        idx = [int(i) + k for i in role_positions[base] if int(i) >= 0]
    bad = [i for i in idx if not 0 <= i < n_tokens]
    if bad:
        raise TaskError(f"role {role!r} points at token(s) {bad} outside the {n_tokens}-token "
                        f"example prompt")
    return sorted(dict.fromkeys(idx))


def _group_label(name: str, function: str, position: str, n_heads: int, layers: tuple[int, int]
                 ) -> str:
    text = function or name
    if "@" not in text:
        text = f"{text} @ {position}"
    span = f"L{layers[0]}" if layers[0] == layers[1] else f"L{layers[0]}–{layers[1]}"
    return f"{text} · {n_heads} head{'s' if n_heads != 1 else ''} ({span})"


def _tick_text(tok: str) -> str:
    t = tok.replace("\n", "\\n").strip()
    return t if t else "␣"


# -- the figure ----------------------------------------------------------------------------------
@overload
def circuit_flow_figure(circuit: Circuit, tokens: Sequence[str],
                        role_positions: Mapping[str, Sequence[int]], path: str | Path,
                        title: str = "", n_prompts: int | None = None,
                        return_layout: Literal[False] = False) -> Path: ...


@overload
def circuit_flow_figure(circuit: Circuit, tokens: Sequence[str],
                        role_positions: Mapping[str, Sequence[int]], path: str | Path,
                        title: str = "", n_prompts: int | None = None, *,
                        return_layout: Literal[True]) -> tuple[Path, FlowLayout]: ...


def circuit_flow_figure(circuit: Circuit, tokens: Sequence[str],
                        role_positions: Mapping[str, Sequence[int]], path: str | Path,
                        title: str = "", n_prompts: int | None = None,
                        return_layout: bool = False) -> Path | tuple[Path, FlowLayout]:
    """Draw ``circuit`` over the tokens of one example prompt and save it as a PNG at ``path``.

    ``tokens``: the example prompt's token strings (one column each); ``role_positions``: token
    indices of each role the groups are read at (see :func:`example_layout`; offset roles are
    derived from their base). Groups are boxes at (their tokens × the layer span of their heads),
    edges arrows by kind, ``logits`` edges go to an *output* marker above the top layer, empty
    groups are listed under the title. Returns the PNG path, or ``(path, FlowLayout)`` with
    ``return_layout=True``.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch, Patch, Rectangle
    from matplotlib.ticker import FixedLocator, MaxNLocator

    plt = pyplot()
    n_tok, n_layers = len(tokens), circuit.n_layers
    if n_tok == 0:
        raise ValueError("circuit_flow_figure needs the tokens of an example prompt (got none)")
    layout = FlowLayout()

    # groups that are drawn, their tokens, layer span and colour
    drawn: dict[str, list[int]] = {}
    span: dict[str, tuple[int, int]] = {}
    color: dict[str, str] = {}
    palette = group_colors(circuit.groups)  # the circuit graph's colours too
    for name, g in circuit.groups.items():
        if not g.heads:
            layout.empty_groups.append(name)
            continue
        toks = _resolve(g.position, role_positions, n_tok)
        if not toks:  # e.g. prev_query_label in a prompt whose query names no box
            layout.absent_groups.append(name)
            continue
        drawn[name] = toks
        layers = [layer for layer, _ in g.heads]
        span[name] = (min(layers), max(layers))
        color[name] = palette[name]

    # groups sharing a token share its column side by side (in group order)
    at_token: dict[int, list[str]] = {}
    for name, toks in drawn.items():
        for t in toks:
            at_token.setdefault(t, []).append(name)

    width = max(10.0, min(26.0, 0.17 * n_tok + 5.0))
    height = max(5.6, min(16.0, 0.3 * n_layers + 4.0))
    fig, ax = plt.subplots(figsize=(width, height))
    rects: dict[tuple[str, int], Rectangle] = {}
    meta: dict[int, DrawnBox | DrawnArrow] = {}  # artist id -> what it shows (for the layout)
    for name, toks in drawn.items():
        lo, hi = span[name]
        for t in toks:
            slot, m = at_token[t].index(name), len(at_token[t])
            w = _COL_WIDTH / m
            x0 = t - _COL_WIDTH / 2 + slot * w
            y0, y1 = lo - _BOX_PAD, hi + _BOX_PAD
            r = Rectangle((x0, y0), w, y1 - y0, facecolor=color[name], edgecolor="black",
                          lw=0.8, alpha=0.9, zorder=3)
            ax.add_patch(r)
            rects[(name, t)] = r
            meta[id(r)] = DrawnBox(name, t, x0, x0 + w, y0, y1)

    def centre(name: str, t: int) -> tuple[float, float]:
        r = rects[(name, t)]
        return r.get_x() + r.get_width() / 2, r.get_y() + r.get_height() / 2

    def nearest(name: str, x: float) -> int:
        return min(drawn[name], key=lambda t: (abs(t - x), t))

    out_y = n_layers - 0.05
    last_tok = None
    if "last" in role_positions or any(e.kind == "logits" for e in circuit.edges):
        try:
            last_tok = _resolve("last", role_positions, n_tok)[-1]
        except (TaskError, IndexError):
            last_tok = n_tok - 1
    n_brackets, left_edge, bottom_edge = 0, -0.7, -0.75
    for e in circuit.edges:
        kind_color, ls = EDGE_STYLE[e.kind]
        ends = [e.sender] + ([] if e.receiver == "logits" else [e.receiver])
        if any(end not in drawn for end in ends):
            layout.skipped_edges.append(e)
            continue
        s_toks = drawn[e.sender]
        kw = dict(arrowstyle="-|>", mutation_scale=13, color=kind_color, lw=1.6, ls=ls,
                  zorder=5, shrinkA=0, shrinkB=1)
        r_rect = None
        if e.receiver != "logits":
            r_tok = nearest(e.receiver, max(s_toks))
            r_rect = rects[(e.receiver, r_tok)]
        if len(s_toks) > 1:
            # bracket over the sender's boxes, one arrow from its end nearest the receiver
            # above every box in the sender's columns, so the bracket crosses none of them
            s_top = max(rects[(g, t)].get_y() + rects[(g, t)].get_height()
                        for t in s_toks for g in at_token[t])
            yb = s_top + 0.1 + 0.11 * n_brackets
            n_brackets += 1
            xs = [centre(e.sender, t)[0] for t in s_toks]
            for x, t in zip(xs, s_toks):
                r = rects[(e.sender, t)]
                ax.plot([x, x], [r.get_y() + r.get_height(), yb], color=kind_color, lw=0.9,
                        zorder=4, solid_capstyle="butt")
            ax.plot([min(xs), max(xs)], [yb, yb], color=kind_color, lw=1.6, ls=ls, zorder=4)
            if r_rect is None:
                end = (float(last_tok), out_y - 0.12)
            else:
                rx = r_rect.get_x() + r_rect.get_width() / 2
                ry0, ry1 = r_rect.get_y(), r_rect.get_y() + r_rect.get_height()
                end = (rx, min(max(yb, ry0 + 0.08), ry1 - 0.08))
            x_from = max(xs) if end[0] >= max(xs) else min(xs) if end[0] <= min(xs) else end[0]
            start = (x_from, yb)
            arrow = ax.add_patch(FancyArrowPatch(start, end, patchB=r_rect, **kw))
            # the tag sits on the bracket, between two of the sender's boxes; each bracket uses
            # a different gap, so the tags of brackets over the same tokens do not pile up
            gap = (n_brackets - 1) % max(1, len(xs) - 1)
            label_at = ((xs[gap] + xs[gap + 1]) / 2 if len(xs) > 1 else xs[0], yb)
            meta[id(arrow)] = DrawnArrow(e, start, end, tuple(s_toks))
        else:
            s_tok = s_toks[0]
            s_rect = rects[(e.sender, s_tok)]
            start = centre(e.sender, s_tok)
            if r_rect is None:
                end = (float(last_tok), out_y - 0.12)
                arrow = ax.add_patch(FancyArrowPatch(start, end, patchA=s_rect, **kw))
                label_at = None
            elif abs(start[0] - (r_rect.get_x() + r_rect.get_width() / 2)) < 1 and (
                    s_rect.get_y() < r_rect.get_y() + r_rect.get_height()
                    and r_rect.get_y() < s_rect.get_y() + s_rect.get_height()):
                # sender and receiver share a token column and layers: a U below both boxes
                start = (start[0], s_rect.get_y())
                end = (r_rect.get_x() + r_rect.get_width() / 2, r_rect.get_y())
                arrow = ax.add_patch(FancyArrowPatch(
                    start, end, connectionstyle="arc,angleA=-90,angleB=-90,armA=26,armB=26,"
                    "rad=4", **kw))
                label_at = (max(start[0], end[0]) + 0.9, min(start[1], end[1]) - 0.22)
                bottom_edge = min(bottom_edge, min(start[1], end[1]) - 0.6)
            elif abs(start[0] - (r_rect.get_x() + r_rect.get_width() / 2)) < 1:
                # same column, disjoint layers: a short arrow between the facing box edges
                below = s_rect.get_y() < r_rect.get_y()
                sx, rx = start[0], r_rect.get_x() + r_rect.get_width() / 2
                start = (sx, s_rect.get_y() + (s_rect.get_height() if below else 0.0))
                end = (rx, r_rect.get_y() + (0.0 if below else r_rect.get_height()))
                arrow = ax.add_patch(FancyArrowPatch(start, end, **kw))
                label_at = (max(sx, rx) + 0.75, (start[1] + end[1]) / 2)
            else:
                end = centre(e.receiver, r_tok)
                arrow = ax.add_patch(FancyArrowPatch(start, end, patchA=s_rect, patchB=r_rect,
                                                     connectionstyle="arc3,rad=-0.3", **kw))
                label_at = ((start[0] + end[0]) / 2, max(start[1], end[1]) + 0.35)
            meta[id(arrow)] = DrawnArrow(e, start, end)
        if label_at is not None and e.kind != "logits":
            layout.tags.append((meta[id(arrow)], label_at))
            ax.text(*label_at, e.kind, color=kind_color, fontsize=9, fontweight="bold",
                    ha="center", va="center", zorder=6,
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec=color[e.sender],
                              lw=1.8))

    if any(e.kind == "logits" and e not in layout.skipped_edges for e in circuit.edges):
        ax.text(last_tok + 0.5, out_y, "output (logits)", ha="right", va="bottom", fontsize=9,
                zorder=6, bbox=dict(boxstyle="round,pad=0.25", fc="#f3f3f3", ec="black", lw=0.8))
    ax.axhline(n_layers - 0.5, color="0.6", lw=0.8, ls=":", zorder=1)

    # axes: every token a column (small rotated labels, group tokens in bold), layers as integers
    ax.set_xlim(left_edge, n_tok + 0.2)
    ax.set_ylim(bottom_edge, n_layers + 0.45)
    ax.set_xticks(range(n_tok))
    fs = 8 if n_tok <= 80 else 6
    ax.set_xticklabels([_tick_text(t) for t in tokens], rotation=90, fontsize=fs)
    for t, lab in enumerate(ax.get_xticklabels()):
        if t in at_token:
            lab.set_fontweight("bold")
    for t in at_token:
        ax.axvspan(t - 0.5, t + 0.5, color="0.93", zorder=0, lw=0)
    integer_ticks(ax.yaxis)
    ticks = [v for v in MaxNLocator(integer=True, nbins=min(n_layers, 12)).tick_values(
        0, n_layers - 1) if 0 <= v <= n_layers - 1 and float(v).is_integer()]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    layout.yticks = [float(v) for v in ax.get_yticks()]
    ax.set_ylabel("layer")
    ax.set_xlabel("token of an example prompt")
    ax.grid(axis="y", color="0.85", lw=0.6, zorder=0)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)

    head = title or "circuit flow"
    if n_prompts is not None and with_n(head, n_prompts) != head:
        head += f" (n = {n_prompts} prompts)"
    sub = []
    if layout.empty_groups:
        sub.append("empty: " + ", ".join(f"{g} @ {circuit.groups[g].position}"
                                         for g in layout.empty_groups))
    if layout.absent_groups:
        sub.append("not in this prompt: " + ", ".join(
            f"{g} @ {circuit.groups[g].position}" for g in layout.absent_groups))
    if layout.skipped_edges:
        sub.append("edges not drawn: " + ", ".join(str(e) for e in layout.skipped_edges))
    layout.title = "\n".join([head, *sub])
    ax.set_title(layout.title, fontsize=11, loc="left")

    handles = [Patch(facecolor=color[n], edgecolor="black", alpha=0.9,
                     label=_group_label(n, circuit.groups[n].function,
                                        circuit.groups[n].position,
                                        len(circuit.groups[n].heads), span[n]))
               for n in drawn]
    kinds = list(dict.fromkeys(e.kind for e in circuit.edges if e not in layout.skipped_edges))
    handles += [Line2D([], [], color=EDGE_STYLE[k][0], ls=EDGE_STYLE[k][1], lw=1.8,
                       label=EDGE_MEANING[k]) for k in EDGE_STYLE if k in kinds]
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9,
                  frameon=False, title_fontsize=9, alignment="left",
                  title="groups (boxes) and edges\n(edge labels framed in the sender's colour)")
    # the layout is read back from the artists on the axes, so it shows what was really drawn
    shown = [meta[id(a)] for a in ax.patches if id(a) in meta]
    layout.boxes = [m for m in shown if isinstance(m, DrawnBox)]
    layout.arrows = [m for m in shown if isinstance(m, DrawnArrow)]
    saved = save_figure(fig, path, dpi=100)
    return (saved, layout) if return_layout else saved
