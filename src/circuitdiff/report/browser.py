"""Open a report in headless Chromium: did it render, with no errors and no outside requests?

Used by the study (when a ``chromium`` binary is on the PATH) to write a screenshot of the first
screen, and by the tests to check the page as a reader's browser shows it.
"""

from __future__ import annotations

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


def check_page(html_path: str | Path, screenshot: str | Path | None = None,
               browser: str | None = None, timeout: int = 120) -> PageCheck:
    """Load ``html_path`` in headless Chromium; optionally save a 1280x900 screenshot."""
    browser = browser or find_browser()
    if browser is None:
        raise FileNotFoundError(f"no Chromium found (tried {', '.join(BROWSERS)}); "
                                f"apt-get install chromium")
    url = Path(html_path).resolve().as_uri()
    dom = _run(browser, ["--virtual-time-budget=5000", "--dump-dom", url], timeout)
    body = re.search(r"<body([^>]*)>", dom.stdout)
    attrs = dict(re.findall(r'data-([\w-]+)="([^"]*)"', body.group(1))) if body else {}
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
