"""``report.md``: the study's plain-text summary, built from ``summary.json`` alone."""

from __future__ import annotations

from typing import Sequence

from ..core.circuit import Circuit
from ..methods.faithfulness import PROTOCOLS, FaithfulnessRow
from .tables import fmt, format_table, short_name


def format_protocols(rows: Sequence[FaithfulnessRow]) -> str:
    """Circuit accuracy and faithfulness of every row under both ablation protocols (paper:
    every head outside the circuit's roles ablated; keep-other-positions: those positions left
    intact), with the rows' disagreement warnings below."""
    head = ["model", "circuit"] + [f"{p} acc (F)" for p in PROTOCOLS]
    body = []
    for r in rows:
        cells = []
        for p in PROTOCOLS:
            d = r.by_protocol.get(p)
            cells.append("-" if d is None else
                         f"{fmt(d['circuit_accuracy'])} ({fmt(d['faithfulness'])})")
        body.append([short_name(r.model), r.circuit] + cells)
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    warn = [f"warning: {short_name(r.model)} / {r.circuit}: {r.warning}" for r in rows
            if r.warning]
    return "\n".join([line(head), "-+-".join("-" * w for w in widths)] +
                     [line(b) for b in body] + warn)


def study_report(summary: dict) -> str:
    """Markdown for a study summary (see :func:`circuitdiff.study.run_study`)."""
    ev = summary["config"]["evaluation"]
    out = ["# circuitdiff study\n",
           f"models: {', '.join(summary['models'])}; {ev['n_boxes']} boxes, "
           f"{ev['n_prompts']} evaluation prompts, seed {ev['seed']}\n"]
    for name, acc in summary.get("accuracy", {}).items():
        out.append(f"\n{name}: {ev['n_boxes']}-box accuracy {acc['accuracy']:.3f} "
                   f"(in-context {acc['in_context_accuracy']:.3f}, n={acc['n']})\n")
    if "circuit" in summary:
        circuit = Circuit.from_dict(summary["circuit"])
        out.append("\n## Circuit of the base model (path patching)\n\n")
        for g, grp in circuit.groups.items():
            out.append(f"- **{g}** ({grp.position}): "
                       f"{' '.join(f'{l}.{h}' for l, h in grp.heads) or '(empty)'}\n")
    if "knockout" in summary:
        out.append("\n## Attention knockout (base model; accuracy when blocked in layers ≥ L)\n\n")
        for name, c in summary["knockout"].items():
            out.append(f"- {name} (unblocked {c['baseline']:.2f}): " + ", ".join(
                f"L={l}: {a:.2f}" for l, a in zip(c["layers"], c["accuracy"])) + "\n")
    if "faithfulness" in summary:
        rows = [FaithfulnessRow.from_dict(r) for r in summary["faithfulness"]]
        out.append("\n## The base circuit on every model\n\n```\n" + format_table(rows) + "\n```\n")
    return "".join(out)
