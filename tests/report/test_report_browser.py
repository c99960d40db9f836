"""The study report in a real browser (headless Chromium at 1400 px): the document is never wider
than the window, and no figure caption or table cell is drawn over another.

The page is built from the study fixture (``data/study_summary.json``, see
``test_figure_layout.py``) with its figures drawn into a temporary run folder under the names
the study uses."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from circuitdiff.core.circuit import Circuit
from circuitdiff.core.runs import model_tag

#: an unreadable figure (overlapping or clipped text) is an error in these tests
pytestmark = pytest.mark.filterwarnings(
    "error::circuitdiff.report.layout.FigureLayoutWarning")

DATA = Path(__file__).parent / "data"


def _study_folder(folder: Path) -> dict:
    """Draw the study's figures for the fixture summary into ``folder``; return the summary."""
    from circuitdiff.methods.cmap import DirectionResult
    from circuitdiff.methods.dcm import FunctionalRow
    from circuitdiff.methods.faithfulness import FaithfulnessRow
    from circuitdiff.methods.knockout import KnockoutCurve
    from circuitdiff.methods.scan import ScanResult
    from circuitdiff.report.cmap import plot_cmap_bars
    from circuitdiff.report.dcm import plot_functional_bars
    from circuitdiff.report.diagram import circuit_flow_figure
    from circuitdiff.report.figures import plot_faithfulness_bars, plot_knockout_curves
    from circuitdiff.report.scan import circuit_graph, plot_size_curve, scan_heatmap

    s = json.loads((DATA / "study_summary.json").read_text())
    ex = json.loads((DATA / "example_prompt.json").read_text())
    c = Circuit.from_dict(s["circuit"])
    d = s["discovery"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # figure readability is test_figure_layout's business
        circuit_flow_figure(c, ex["tokens"], ex["roles"], folder / "discover/circuit_flow.png",
                            "circuit of organism:base", n_prompts=100)
        circuit_graph(c, folder / "discover/circuit_graph.png", "organism:base")
        scan_heatmap(ScanResult.from_dict(d["scan"]), folder / "discover/scan.png")
        plot_size_curve(d["curve"], folder / "discover/curve.png", d["sizing"]["target"])
        plot_faithfulness_bars([FaithfulnessRow.from_dict(r) for r in s["faithfulness"]],
                               folder / "faithfulness.png")
        for m, curves in s["knockout"].items():
            plot_knockout_curves([KnockoutCurve(**k) for k in curves.values()],
                                 folder / f"knockout/{model_tag(m)}.png", m)
        plot_functional_bars([FunctionalRow.from_dict(r) for r in s["functional"]],
                             folder / "functional.png")
        for m, res in s.get("cmap", {}).items():
            if "skipped" not in res:
                plot_cmap_bars(DirectionResult.from_dict(res["directions"][0]),
                               folder / f"cmap/{model_tag(m)}.png")
    return s


@pytest.mark.slow
def test_study_report_fits_a_1400px_window(tmp_path, chromium):
    from circuitdiff.report.browser import check_layout
    from circuitdiff.report.study_html import write_study_html

    summary = _study_folder(tmp_path)
    page = write_study_html(summary, tmp_path, tmp_path / "report.html")
    res = check_layout(page, width=1400, browser=chromium)
    assert res.window == 1400, res
    assert res.measured > 50, res  # the tables and captions were measured
    assert res.document <= res.window, (f"document {res.document} px wide in a {res.window} px "
                                        f"window")
    assert res.overlaps == [], res.overlaps


@pytest.mark.slow
def test_layout_check_catches_a_wide_page_and_overlaps(tmp_path, chromium):
    from circuitdiff.report.browser import check_layout

    wide = tmp_path / "wide.html"
    wide.write_text("<!DOCTYPE html><html><body><table><tr><td style='white-space:nowrap'>"
                    + "x" * 400 + "</td></tr></table><figure><figcaption style='position:"
                    "relative;top:-2em'>caption drawn over the table</figcaption></figure>"
                    "</body></html>")
    res = check_layout(wide, width=1400, browser=chromium)
    assert res.document > res.window and res.overlaps and not res.ok
