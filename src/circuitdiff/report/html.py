"""A self-contained HTML page: sections, tables, figures inlined as base64 PNG, no network.

The page carries a few lines of JavaScript that record, on the ``<body>`` element, how many
images decoded (``data-images-ok`` / ``data-images``) and any script error (``data-errors``), so
a headless browser's ``--dump-dom`` shows whether the page rendered completely.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..core.runs import atomic_write_text

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#1d1d1f;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
*,*::before,*::after{box-sizing:border-box}
.tablewrap{max-width:100%;overflow-x:auto;margin:.6em 0 1.2em}
table{border-collapse:collapse;font-size:.92em;max-width:100%}
th,td{border:1px solid #d0d0d0;padding:.25em .6em;text-align:left;overflow-wrap:break-word}
th{background:#f3f4f6}
td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.88em;color:#555}
pre{white-space:pre-wrap;overflow-wrap:anywhere;max-width:100%}
.verdict{border-left:5px solid #999;padding:.4em .9em;margin:.6em 0;background:#fafafa}
.verdict.yes{border-color:#2e7d32}.verdict.no{border-color:#c62828}.verdict.undecided{border-color:#f9a825}
.verdict.flagged{background:#fff3e0}.flag{color:#c62828;font-weight:bold}
.verdict b{text-transform:uppercase;font-size:.85em;letter-spacing:.03em}
dl.defs dt{font-weight:600;margin-top:.4em}dl.defs dd{margin-left:1.2em;color:#333}
.muted{color:#666;font-size:.9em}code{background:#f3f4f6;padding:0 .25em;border-radius:3px}
"""

_CHECK_SCRIPT = """
window.addEventListener('error', function (e) {
  var b = document.body; b.dataset.errors = (b.dataset.errors || '') + e.message + ';';
});
window.addEventListener('load', function () {
  var imgs = Array.from(document.images);
  document.body.dataset.images = imgs.length;
  document.body.dataset.imagesOk = imgs.filter(function (i) {
    return i.complete && i.naturalWidth > 0; }).length;
});
"""


def esc(text) -> str:
    """``text`` escaped for HTML."""
    return html.escape(str(text))


def table(header: Sequence[str], rows: Sequence[Sequence], caption: str = "") -> str:
    """An HTML table; numbers are right-aligned, ``None`` shows as "undefined". Long cells wrap
    and a table still wider than the page scrolls inside its own box (never the page)."""
    def cell(v) -> str:
        if v is None:
            return "<td>undefined</td>"
        if isinstance(v, float):
            return f'<td class="num">{v:.2f}</td>'
        if isinstance(v, int):
            return f'<td class="num">{v}</td>'
        return f"<td>{esc(v)}</td>"
    cap = f"<caption class='muted'>{esc(caption)}</caption>" if caption else ""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows)
    return (f"<div class='tablewrap'><table>{cap}<thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table></div>")


def figure(png: str | Path, caption: str) -> str:
    """A PNG inlined as a data URI, with its caption (say n there)."""
    data = base64.b64encode(Path(png).read_bytes()).decode()
    return (f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def definitions(items: dict[str, str]) -> str:
    """A definition list: one line per term."""
    return "<dl class='defs'>" + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>"
                                         for k, v in items.items()) + "</dl>"


def verdict(claim: str, answer: str, evidence: str, null: str = "", calibration: str = "",
            flagged: bool = False) -> str:
    """A verdict card; ``answer`` is ``yes``, ``no`` or ``undecided``; ``null`` the null it was
    tested against, ``calibration`` its false-positive line; ``flagged`` (the null said yes)
    marks it visibly."""
    flag = (" <span class='flag'>⚠ flagged: random circuits also get yes</span>"
            if flagged else "")
    extra = "".join(f"<div class='muted'>{esc(x)}</div>" for x in (null, calibration) if x)
    return (f"<div class='verdict {esc(answer)}{' flagged' if flagged else ''}'><b>{esc(answer)}"
            f"</b> — {esc(claim)}{flag}<div class='muted'>{esc(evidence)}</div>{extra}</div>")


@dataclass
class HtmlPage:
    """Sections in order, rendered as one self-contained page."""

    title: str
    subtitle: str = ""
    sections: list[tuple[str, str]] = field(default_factory=list)

    def add(self, heading: str, body_html: str) -> None:
        self.sections.append((heading, body_html))

    def render(self) -> str:
        toc = "".join(f"<li><a href='#s{i}'>{esc(h)}</a></li>"
                      for i, (h, _) in enumerate(self.sections))
        body = "".join(f"<section id='s{i}'><h2>{esc(h)}</h2>{b}</section>"
                       for i, (h, b) in enumerate(self.sections))
        return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
                "<meta name='viewport' content='width=device-width, initial-scale=1'>"
                f"<title>{esc(self.title)}</title><style>{_STYLE}</style>"
                f"<script>{_CHECK_SCRIPT}</script></head><body>"
                f"<h1>{esc(self.title)}</h1><p class='muted'>{esc(self.subtitle)}</p>"
                f"<nav><ul>{toc}</ul></nav>{body}</body></html>")

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.render())
