"""Text tables: the faithfulness table (printed, JSON, CSV) and the circuit x model matrix."""

from __future__ import annotations

import csv
import io
from typing import Sequence

from ..core.runs import RunFolder, atomic_write_text
from ..methods.faithfulness import FaithfulnessRow


def fmt(x: float | None, nd: int = 2) -> str:
    """A number to ``nd`` decimals, or ``undefined`` for ``None``."""
    return "undefined" if x is None else f"{x:.{nd}f}"


def short_name(model: str) -> str:
    """Display name: a path's last component (full names stay in the JSON/CSV)."""
    return model.rstrip("/").rsplit("/", 1)[-1] if "/" in model else model


def format_table(rows: Sequence[FaithfulnessRow]) -> str:
    """The paper-shaped table: model | full | circuit | random (mean±sd) | faithfulness."""
    head = ["model", "circuit", "full", "circuit acc", "random (mean±sd)", "faithfulness"]
    body = [[short_name(r.model), r.circuit, fmt(r.full), fmt(r.circuit_accuracy),
             "-" if r.random_mean is None else f"{r.random_mean:.2f}±{r.random_sd:.2f}",
             fmt(r.faithfulness)] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), "-+-".join("-" * w for w in widths)] + [line(b) for b in body])


def table_csv(rows: Sequence[FaithfulnessRow]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "circuit", "full", "circuit_accuracy", "random_mean", "random_sd",
                "faithfulness", "n"])
    for r in rows:
        w.writerow([r.model, r.circuit, r.full, r.circuit_accuracy,
                    "" if r.random_mean is None else r.random_mean,
                    "" if r.random_sd is None else r.random_sd,
                    "undefined" if r.faithfulness is None else r.faithfulness, r.n])
    return buf.getvalue()


def save_table(folder: RunFolder, rows: Sequence[FaithfulnessRow], name: str = "faithfulness"):
    """Write ``name.json`` and ``name.csv`` into the run folder; returns both paths."""
    pj = folder.save_json(f"{name}.json", [r.to_dict() for r in rows])
    pc = atomic_write_text(folder.file(f"{name}.csv"), table_csv(rows))
    return pj, pc


def format_matrix(rows: Sequence[FaithfulnessRow]) -> str:
    """Circuit (rows) x model (columns): circuit accuracy (faithfulness)."""
    circuits = list(dict.fromkeys(r.circuit for r in rows))
    models = list(dict.fromkeys(r.model for r in rows))
    at = {(r.circuit, r.model): r for r in rows}
    cell = lambda r: "-" if r is None else (  # noqa: E731
        f"{r.circuit_accuracy:.2f} ({'undef' if r.faithfulness is None else f'{r.faithfulness:.2f}'})")
    head = ["circuit \\ model"] + [short_name(m) for m in models]
    body = [[c] + [cell(at.get((c, m))) for m in models] for c in circuits]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: " | ".join(x.ljust(w) for x, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), "-+-".join("-" * w for w in widths)] + [line(b) for b in body])


def format_overlaps(overlaps: dict[str, dict]) -> str:
    """One line per circuit pair: per group ``|A∩B|/|A|`` with precision and recall."""
    ratio = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    lines = []
    for key, ov in overlaps.items():
        a, b = key.split("|")
        cells = ", ".join(f"{g} {o['intersection']}/{o['n_reference']} "
                          f"(P {ratio(o['precision'])} R {ratio(o['recall'])})"
                          for g, o in ov.items())
        lines.append(f"overlap {a} (reference) vs {b}: {cells}")
    return "\n".join(lines)
