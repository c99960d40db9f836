"""The HTML page is self-contained and renders in a real browser (headless Chromium)."""

from __future__ import annotations

from circuitdiff.report.browser import check_page
from circuitdiff.report.figures import pyplot, save_figure
from circuitdiff.report.html import HtmlPage, figure, table, verdict


def _page(tmp_path, extra: str = "") -> HtmlPage:
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png = save_figure(fig, tmp_path / "f.png")
    page = HtmlPage("title", "subtitle")
    page.add("table", table(["a", "b"], [[1, 0.5], [2, None]]))
    page.add("figure", figure(png, "a line (n=2)"))
    page.add("verdict", verdict("claim", "undecided", "evidence") + extra)
    return page


def test_page_renders_in_chromium(tmp_path, chromium):
    browser = chromium
    path = _page(tmp_path).save(tmp_path / "p.html")
    text = path.read_text()
    assert "http" not in text.replace("http-equiv", "")  # nothing fetched from outside
    res = check_page(path, tmp_path / "shot.png", browser)
    assert res.ok, res
    assert res.images == 1 and res.table_rows == [2]
    assert (tmp_path / "shot.png").stat().st_size > 10_000


def test_checker_catches_errors_and_outside_requests(tmp_path, chromium):
    browser = chromium
    bad = "<img src='http://example.invalid/x.png'><script>undefinedFn()</script><table><tr><th>h</th></tr></table>"
    res = check_page(_page(tmp_path, bad).save(tmp_path / "bad.html"), None, browser)
    assert not res.ok
    assert any("undefinedFn" in e for e in res.errors)
    assert res.outside_refs == ["http://example.invalid/x.png"]
    assert res.images_ok < res.images and 0 in res.table_rows
