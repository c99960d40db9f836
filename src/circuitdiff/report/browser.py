"""Open a report in headless Chromium: did it render, with no errors and no outside requests?

Used by the study (when a ``chromium`` binary is on the PATH) to write a screenshot of the first
screen, and by the tests to check the page as a reader's browser shows it.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> str | None:
    """Path of a Chromium-family browser, or ``None``."""
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


@dataclass
class PageCheck:
    """What the browser saw: images decoded, script/console errors, outside references, tables."""

    images: int
    images_ok: int
    errors: list[str] = field(default_factory=list)
    outside_refs: list[str] = field(default_factory=list)
    table_rows: list[int] = field(default_factory=list)
    screenshot: str | None = None

    @property
    def ok(self) -> bool:
        return (self.images == self.images_ok and not self.errors and not self.outside_refs
                and all(n > 0 for n in self.table_rows))


def _run(browser: str, args: list[str], timeout: int) -> subprocess.CompletedProcess:
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--enable-logging=stderr", "--v=0"]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=timeout)


def _body_data(dom: str) -> dict[str, str]:
    """The ``data-*`` attributes of the dumped page's ``<body>`` (what its scripts recorded)."""
    body = re.search(r"<body([^>]*)>", dom)
    return dict(re.findall(r'data-([\w-]+)="([^"]*)"', body.group(1))) if body else {}


def check_page(html_path: str | Path, screenshot: str | Path | None = None,
               browser: str | None = None, timeout: int = 120) -> PageCheck:
    """Load ``html_path`` in headless Chromium; optionally save a 1280x900 screenshot."""
    browser = browser or find_browser()
    if browser is None:
        raise FileNotFoundError(f"no Chromium found (tried {', '.join(BROWSERS)}); "
                                f"apt-get install chromium")
    url = Path(html_path).resolve().as_uri()
    dom = _run(browser, ["--virtual-time-budget=5000", "--dump-dom", url], timeout)
    attrs = _body_data(dom.stdout)
    errors = [m for m in re.findall(r"CONSOLE[^\]]*\] (.*)", dom.stderr)]
    errors += [e for e in attrs.get("errors", "").split(";") if e]
    refs = re.findall(r'(?:src|href)="([^"#][^"]*)"', dom.stdout)
    refs += re.findall(r"url\((?!['\"]?data:)([^)]*)\)", dom.stdout)
    outside = [r for r in refs if not r.startswith("data:")]
    rows = [len(re.findall(r"<tr>", t)) - 1 for t in re.findall(r"<table.*?</table>",
                                                                  dom.stdout, re.S)]
    shot = None
    if screenshot is not None:
        shot = str(Path(screenshot).resolve())
        _run(browser, [f"--screenshot={shot}", "--window-size=1280,900", url], timeout)
    return PageCheck(int(attrs.get("images", 0)), int(attrs.get("images-ok", 0)), errors,
                     outside, rows, shot)


#: measures the page once it has loaded and writes the result onto <body> as data attributes:
#: the document's and the window's width, and every pair of figure captions / table cells /
#: headers / images whose boxes overlap (more than 1 px each way)
_LAYOUT_SCRIPT = """
<script>
window.addEventListener('load', function () {
  var doc = document.documentElement, b = document.body;
  b.dataset.docWidth = Math.max(doc.scrollWidth, b.scrollWidth);
  b.dataset.winWidth = window.innerWidth;
  var els = Array.from(document.querySelectorAll('figcaption, td, th, caption, figure img'));
  var boxes = els.map(function (e) { return [e, e.getBoundingClientRect()]; })
                 .filter(function (p) { return p[1].width > 0 && p[1].height > 0; });
  var bad = [];
  function name(e) { return e.tagName.toLowerCase() + ':' +
                     (e.textContent || e.alt || '').trim().slice(0, 40); }
  for (var i = 0; i < boxes.length; i++) {
    for (var j = i + 1; j < boxes.length; j++) {
      var a = boxes[i][1], c = boxes[j][1];
      var w = Math.min(a.right, c.right) - Math.max(a.left, c.left);
      var h = Math.min(a.bottom, c.bottom) - Math.max(a.top, c.top);
      if (w > 1 && h > 1 && !boxes[i][0].contains(boxes[j][0])
          && !boxes[j][0].contains(boxes[i][0])) {
        bad.push(name(boxes[i][0]) + ' | ' + name(boxes[j][0]));
      }
    }
  }
  b.dataset.overlaps = JSON.stringify(bad.slice(0, 50));
  b.dataset.measured = boxes.length;
});
</script>
"""


@dataclass
class LayoutCheck:
    """How the page lays out at one window width: the document's width, the window's, and the
    pairs of captions / table cells / images whose boxes overlap."""

    window: int
    document: int
    overlaps: list[str]
    measured: int

    @property
    def ok(self) -> bool:
        return self.measured > 0 and self.document <= self.window and not self.overlaps


def check_layout(html_path: str | Path, width: int = 1400, height: int = 900,
                 browser: str | None = None, timeout: int = 120) -> LayoutCheck:
    """Load ``html_path`` in headless Chromium at ``width`` x ``height`` px and measure it: is the
    document wider than the window, and do any figure captions, table cells or images overlap?
    The page is measured from a copy with a measuring script added before ``</body>`` (the
    report itself stays script-light)."""
    browser = browser or find_browser()
    if browser is None:
        raise FileNotFoundError(f"no Chromium found (tried {', '.join(BROWSERS)}); "
                                f"apt-get install chromium")
    src = Path(html_path).resolve()
    text = src.read_text(encoding="utf-8")
    at = text.rfind("</body>")
    text = (text[:at] + _LAYOUT_SCRIPT + text[at:]) if at >= 0 else text + _LAYOUT_SCRIPT
    probe = src.with_name(f".{src.stem}.layout-probe.html")
    try:
        probe.write_text(text, encoding="utf-8")
        dom = _run(browser, ["--virtual-time-budget=5000", f"--window-size={width},{height}",
                             "--dump-dom", probe.as_uri()], timeout)
    finally:
        probe.unlink(missing_ok=True)
    attrs = _body_data(dom.stdout)
    if "doc-width" not in attrs:
        raise RuntimeError(f"the page was not measured (is the browser working?): "
                           f"{dom.stderr[-500:]}")
    overlaps = json.loads(html.unescape(attrs.get("overlaps", "[]")))
    return LayoutCheck(int(attrs["win-width"]), int(attrs["doc-width"]), overlaps,
                       int(attrs.get("measured", 0)))
