"""``report.md``: the study's plain-text summary, built from ``summary.json`` alone."""

from __future__ import annotations

from ..core.circuit import Circuit
from ..methods.faithfulness import FaithfulnessRow
from .tables import format_table


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
