"""Every figure reads at a glance: no text box (tick label, axis label, title, legend,
annotation) overlaps another or leaves the canvas, measured with matplotlib's renderer
(:mod:`circuitdiff.report.layout`), on the results of a real study run.

``data/study_summary.json`` is the summary of ``circuitdiff study`` on the embedded organisms
(default settings; trimmed: no per-prompt hits; rebuilt by ``data/make_study_summary.py``), and
``data/example_prompt.json`` the tokens and role positions of the flow diagram's example prompt
(organisms tokenizer, discovery seed). Each figure function is run on them and every
``savefig`` is measured (the hook below), so a test fails whatever the function's own checks.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from circuitdiff.core.circuit import Circuit
from circuitdiff.report.layout import FigureLayoutWarning, layout_problems

#: an unreadable figure (overlapping or clipped text) is an error in these tests
pytestmark = pytest.mark.filterwarnings(
    "error::circuitdiff.report.layout.FigureLayoutWarning")

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def summary() -> dict:
    return json.loads((DATA / "study_summary.json").read_text())


@pytest.fixture(scope="module")
def example() -> dict:
    return json.loads((DATA / "example_prompt.json").read_text())


@pytest.fixture
def measured(monkeypatch):
    """Every figure saved while the test runs, with its layout problems (measured just before
    ``savefig``, i.e. exactly what lands in the PNG)."""
    from matplotlib.figure import Figure

    seen: list[tuple[str, list[str]]] = []
    original = Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        seen.append((str(fname), layout_problems(self)))
        return original(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FigureLayoutWarning)  # the hook reports them
        yield seen


def _clean(seen: list[tuple[str, list[str]]], n: int = 1) -> None:
    assert len(seen) >= n, "the figure function saved no figure"
    bad = {Path(f).name: p for f, p in seen if p}
    assert not bad, "unreadable figure(s):\n" + "\n".join(
        f"{f}: " + "\n    ".join(p) for f, p in bad.items())


# -- the checker itself ----------------------------------------------------------------------------
def test_checker_finds_overlap_and_clipping():
    from circuitdiff.report.figures import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.set_xticks([0, 0.02])
    ax.set_xticklabels(["a long tick label", "another long one"])
    ax.text(0.5, 0.5, "here")
    ax.text(0.5, 0.5, "here too")
    ax.set_title("a title far wider than this small three-inch figure could ever show")
    problems = layout_problems(fig)
    plt.close(fig)
    assert any("tick label 'a long tick label' overlaps" in p for p in problems)
    assert any("'here' overlaps" in p and "'here too'" in p for p in problems)
    assert any("title" in p and "outside" in p for p in problems)
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0, 1], [0, 1], label="line")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.legend()
    fig.tight_layout()
    assert layout_problems(fig) == []
    plt.close(fig)


def test_save_figure_checks_every_figure(tmp_path):
    from circuitdiff.report.figures import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.text(0.5, 0.5, "x" * 80)  # far wider than the figure
    with pytest.warns(FigureLayoutWarning, match="outside"):
        save_figure(fig, tmp_path / "w.png")
    assert (tmp_path / "w.png").exists()


def test_only_rank_0_writes_figures(tmp_path, monkeypatch):
    """Under torchrun every rank holds the same figure; rank 0 alone writes the run folder."""
    import circuitdiff.report.figures as figures

    plt = figures.pyplot()
    monkeypatch.setattr(figures, "is_main", lambda: False)  # this process plays rank 1
    fig, _ = plt.subplots(figsize=(2, 2))
    assert figures.save_figure(fig, tmp_path / "sub" / "r1.png") == tmp_path / "sub" / "r1.png"
    assert not (tmp_path / "sub").exists() and not plt.fignum_exists(fig.number)
    monkeypatch.setattr(figures, "is_main", lambda: True)
    fig, _ = plt.subplots(figsize=(2, 2))
    figures.save_figure(fig, tmp_path / "r0.png")
    assert (tmp_path / "r0.png").exists()


# -- every figure function on the study's results --------------------------------------------------
def test_circuit_graph(summary, measured, tmp_path):
    from circuitdiff.report.scan import circuit_graph

    c = Circuit.from_dict(summary["circuit"])
    circuit_graph(c, tmp_path / "g.png", "organism:base")
    _clean(measured)


def test_circuit_graph_paper_chain(summary, measured, tmp_path):
    from circuitdiff.report.scan import circuit_graph

    circuit_graph(Circuit.from_dict(summary["paper_circuit"]), tmp_path / "p.png", "paper")
    _clean(measured)


def test_circuit_graph_of_a_real_model_sized_circuit_lists_the_top_heads(measured, tmp_path,
                                                                          monkeypatch):
    """Groups of a real model's circuit hold hundreds of heads (Qwen-0.5B: 24 x 14): each box
    shows its first 16 and counts the rest, and the figure still lays out cleanly."""
    from matplotlib.axes import Axes

    from circuitdiff.core.circuit import CircuitGroup
    from circuitdiff.report.scan import circuit_graph

    heads = [(l, h) for l in range(24) for h in range(14)]
    c = Circuit({"big": CircuitGroup(heads[:200], "last", function="value fetcher"),
                 "small": CircuitGroup(heads[:3], "query_label")}, 24, 14, "qwen")
    texts = []
    real = Axes.text
    monkeypatch.setattr(Axes, "text", lambda ax, x, y, t, *a, **k: (texts.append(t),
                                                                    real(ax, x, y, t, *a, **k))[1])
    circuit_graph(c, tmp_path / "big.png", "qwen")
    big = next(t for t in texts if "value" in t)
    assert "+184 more (200 heads)" in big and big.count(".") == 16
    assert next(t for t in texts if "0.2" in t and "more" not in t)
    _clean(measured)


def test_circuit_graph_integer_layers_and_edge_colours(summary, tmp_path, monkeypatch):
    """Layer ticks are the model's layers (0..n_layers-1), and each edge kind has the flow
    diagram's colour and line style."""
    from matplotlib.figure import Figure

    from circuitdiff.report.palette import EDGE_STYLE
    from circuitdiff.report.scan import circuit_graph

    c = Circuit.from_dict(summary["circuit"])
    got = {}
    original = Figure.savefig

    def savefig(self, fname, *a, **k):
        ax = self.axes[0]
        got["yticks"] = [t for t in ax.get_yticks() if ax.get_ylim()[0] <= t <= ax.get_ylim()[1]]
        got["arrows"] = [(p.arrow_patch.get_edgecolor(), p.arrow_patch.get_linestyle())
                         for p in ax.texts if getattr(p, "arrow_patch", None) is not None]
        return original(self, fname, *a, **k)

    monkeypatch.setattr(Figure, "savefig", savefig)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FigureLayoutWarning)
        circuit_graph(c, tmp_path / "g.png")
    assert got["yticks"] == list(range(c.n_layers))
    from matplotlib.colors import to_rgba
    from matplotlib.lines import Line2D

    for e, (colour, style) in zip(c.edges, got["arrows"]):
        want_colour, want_ls = EDGE_STYLE[e.kind]
        assert to_rgba(colour)[:3] == pytest.approx(to_rgba(want_colour)[:3]), e.kind
        probe = Line2D([], [], ls=want_ls)
        assert style == probe.get_linestyle() or (style, want_ls) in (("solid", "-"),), e.kind


def test_flow_diagram(summary, example, measured, tmp_path, monkeypatch):
    """Readable, and every edge tag (q / k / v) sits among the boxes it names — beside its
    sender — not piled left of the first box."""
    from matplotlib.figure import Figure

    from circuitdiff.report.diagram import circuit_flow_figure

    tags: list[tuple[str, float, float]] = []  # (tag, its x, lowest box x) per figure
    measuring = Figure.savefig

    def savefig(self, *a, **k):
        ax = self.axes[0]
        boxes = [p.get_x() for p in ax.patches if type(p).__name__ == "Rectangle"
                 and p.get_width() < 1]
        tags.extend((t.get_text(), t.get_position()[0], min(boxes)) for t in ax.texts
                    if t.get_text() in ("q", "k", "v"))
        return measuring(self, *a, **k)

    monkeypatch.setattr(Figure, "savefig", savefig)
    for key in ("circuit", "paper_circuit"):
        circuit_flow_figure(Circuit.from_dict(summary[key]), example["tokens"], example["roles"],
                            tmp_path / f"{key}.png", "circuit of organism:base", n_prompts=100)
    _clean(measured, 2)
    assert len(tags) >= 5
    misplaced = [(t, round(x, 2)) for t, x, left in tags if x < left - 0.5]
    assert not misplaced, f"edge tags left of every box (piled at the far left): {misplaced}"


def test_flow_diagram_tags_beside_their_senders(summary, example, tmp_path):
    """Each bracketed edge's tag lies within its sender's token span."""
    from circuitdiff.report.diagram import circuit_flow_figure

    c = Circuit.from_dict(summary["circuit"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FigureLayoutWarning)
        _, lay = circuit_flow_figure(c, example["tokens"], example["roles"], tmp_path / "f.png",
                                     return_layout=True)
    bracketed = [(a, xy) for a, xy in lay.tags if a.bracket]
    assert len(bracketed) == 4, lay.tags  # k and v from labels and from separators
    for arrow, (x, _) in bracketed:
        assert min(arrow.bracket) <= x <= max(arrow.bracket), (arrow.edge, x, arrow.bracket)


def test_scan_and_size_curve(summary, measured, tmp_path):
    from circuitdiff.methods.scan import ScanResult
    from circuitdiff.report.scan import plot_size_curve, scan_heatmap

    d = summary["discovery"]
    scan_heatmap(ScanResult.from_dict(d["scan"]), tmp_path / "scan.png", "organism:base")
    plot_size_curve(d["curve"], tmp_path / "curve.png", d["sizing"]["target"], "organism:base",
                    d["sizing"]["n_validate"])
    _clean(measured, 2)


def test_faithfulness_bars(summary, measured, tmp_path):
    from circuitdiff.methods.faithfulness import FaithfulnessRow
    from circuitdiff.report.figures import plot_faithfulness_bars

    plot_faithfulness_bars([FaithfulnessRow.from_dict(r) for r in summary["faithfulness"]],
                           tmp_path / "f.png")
    _clean(measured)


def test_knockout_curves(summary, measured, tmp_path):
    from circuitdiff.methods.knockout import KnockoutCurve
    from circuitdiff.report.figures import plot_knockout_curves

    for m, curves in summary["knockout"].items():
        n = next(iter(curves.values()))["n"]
        plot_knockout_curves([KnockoutCurve(**c) for c in curves.values()],
                             tmp_path / "k.png", f"{m}, n={n}")  # the study's own title
    _clean(measured, len(summary["knockout"]))


def test_knockout_title_says_n_once(summary, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from circuitdiff.methods.knockout import KnockoutCurve
    from circuitdiff.report.figures import plot_knockout_curves

    titles = []
    original = Figure.savefig

    def savefig(self, *a, **k):
        titles.append(self.axes[0].get_title())
        return original(self, *a, **k)

    monkeypatch.setattr(Figure, "savefig", savefig)
    m, curves = next(iter(summary["knockout"].items()))
    n = next(iter(curves.values()))["n"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FigureLayoutWarning)
        plot_knockout_curves([KnockoutCurve(**c) for c in curves.values()], tmp_path / "k.png",
                             f"{m}, n={n}")
        plot_knockout_curves([KnockoutCurve(**c) for c in curves.values()], tmp_path / "k.png",
                             m)
    assert [t.count(f"n={n}") for t in titles] == [1, 1], titles


def test_dcm_figures(summary, measured, tmp_path):
    from circuitdiff.methods.dcm import DesideratumResult, FunctionalRow
    from circuitdiff.report.dcm import plot_functional_bars, plot_lambda_curve

    rows = [DesideratumResult.from_dict(r) for r in summary["dcm"]["rows"]]
    for group in dict.fromkeys(r.group for r in rows):
        plot_lambda_curve([r for r in rows if r.group == group], tmp_path / f"l_{group}.png",
                          group)
    plot_functional_bars([FunctionalRow.from_dict(r) for r in summary["functional"]],
                         tmp_path / "functional.png")
    _clean(measured, 2)


def test_cmap_figures(summary, measured, tmp_path):
    from circuitdiff.methods.cmap import DirectionResult
    from circuitdiff.report.cmap import plot_cmap_bars, plot_per_head

    done = 0
    for m, res in summary["cmap"].items():
        if "skipped" in res:
            continue
        for i, dd in enumerate(res["directions"]):
            d = DirectionResult.from_dict(dd)
            plot_cmap_bars(d, tmp_path / f"bars_{done}_{i}.png")
            for pos in d.per_head:
                plot_per_head(d, pos, tmp_path / f"heads_{done}_{i}_{pos}.png")
        done += 1
    assert done, "the fixture has no CMAP result"
    _clean(measured, done)


def test_score_heatmap_and_completeness(measured, tmp_path):
    from circuitdiff.report.figures import plot_completeness, score_heatmap

    g = torch.Generator().manual_seed(0)
    score_heatmap(torch.randn(4, 8, generator=g) / 10, "value_fetcher @ last (n=100 prompts)\n"
                  "organism:base", tmp_path / "h.png", [(1, 2), (3, 0)])

    class P:
        def __init__(self, subset, c, m):
            self.subset, self.circuit_minus_k, self.model_minus_k = subset, c, m

    pts = [P("group:value_fetcher", 0.2, 0.3), P("group:position_transmitter", 0.5, 0.55),
           P("half:0", 0.6, 0.5), P("half:1", 0.7, 0.8)]
    plot_completeness(pts, tmp_path / "c.png", "completeness (n=100 prompts)")
    _clean(measured, 2)


def test_discovery_figures_draw_the_ceiling_of_an_unreachable_target(tmp_path, monkeypatch):
    """A discovery that kept every candidate (``--keep-all``) draws its curve with the ceiling
    the sizing measured, as the unreachable-target path does."""
    from types import SimpleNamespace

    from circuitdiff.core.circuit import CircuitGroup
    from circuitdiff.report import scan as scan_figs

    seen = {}
    monkeypatch.setattr(scan_figs, "plot_size_curve",
                        lambda curve, path, target, title="", n=None, ceiling=None:
                        seen.update(target=target, n=n, ceiling=ceiling))
    c = Circuit({"g": CircuitGroup([(1, 2)], "last")}, 4, 8, "m")
    res = SimpleNamespace(circuit=c, scan=None, curve=[{"units": 1, "faithfulness": 0.3}],
                          sizing={"target": 0.8, "n_validate": 100,
                                  "ceiling_faithfulness": 0.76})
    scan_figs.auto_discovery_figures(res, tmp_path, "m")
    assert seen == {"target": 0.8, "n": 100, "ceiling": 0.76}
