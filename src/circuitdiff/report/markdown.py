"""``report.md``: the study's plain-text summary, built from ``summary.json`` alone."""

from __future__ import annotations

from typing import Sequence

from ..core.circuit import Circuit
from ..methods.faithfulness import PROTOCOLS, FaithfulnessRow
from ..methods.verdicts import null_text
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
    if "no_circuit" in summary:
        out.append(f"\n**No circuit:** {summary['no_circuit']}\n")
    if summary.get("circuit_source", "discovered") != "discovered":
        out.append(f"\nThe circuit was not discovered here: {summary['circuit_source']}.\n")
    for key, title in (("circuit", "Circuit of the base model (path patching)"),
                       ("paper_circuit", "The paper's four-group chain on the same model")):
        if key not in summary:
            continue
        circuit = Circuit.from_dict(summary[key])
        chain = circuit.settings.get("chain", "paper")
        out.append(f"\n## {title} — {chain} chain\n\n")
        for g, grp in circuit.groups.items():
            label = f"{grp.function} ({g})" if grp.function else g
            out.append(f"- **{label}** @ `{grp.position}`: "
                       f"{' '.join(f'{l}.{h}' for l, h in grp.heads) or '(empty)'}\n")
        if circuit.edges:
            out.append("\nEdges: " + "; ".join(f"`{e}`" for e in circuit.edges) + "\n")
        if key == "circuit" and "discovery" in summary:
            s = summary["discovery"]["sizing"]
            out.append(
                f"\nSized on {s['n_validate']} held-out prompts to faithfulness "
                f"{s['target']:.2f}: reached {s['faithfulness_paper']:.2f} (paper protocol), "
                f"{s['faithfulness_keep_other_positions']:.2f} (keep-other-positions) with "
                f"{s['units']} (head, role) units ({s['unit_fraction']:.0%} of the heads at its "
                f"{len(s['roles'])} roles). Figures: `discover/scan.png`, "
                f"`discover/circuit_graph.png`, `discover/curve.png`.\n")
            if s.get("message"):
                out.append(f"\n{s['message']}\n")
        if circuit.settings.get("truncated_at"):
            out.append(f"\n{circuit.settings['truncated_at']} and later groups are empty: no "
                       f"head can send to the previous group (it sits in layer 0).\n")
    if "knockout" in summary:
        n_eval = ev["n_prompts"]
        out.append("\n## Attention knockout (accuracy when blocked in layers ≥ L)\n\n")
        for model, curves in summary["knockout"].items():
            for name, c in curves.items():
                out.append(f"- {short_name(model)} / {name} (unblocked {c['baseline']:.2f}, "
                           f"n={c['n']}): " + ", ".join(
                               f"L={l}: {a:.2f}" for l, a in zip(c["layers"], c["accuracy"]))
                           + "\n")
            n_ko = next(iter(curves.values()))["n"] if curves else n_eval
        if summary["knockout"] and n_ko != n_eval:
            out.append(f"\nKnockout uses the first {n_ko} of the {n_eval} evaluation prompts, so "
                       f"its unblocked baseline can differ from the accuracy table.\n")
    if "faithfulness" in summary:
        rows = [FaithfulnessRow.from_dict(r) for r in summary["faithfulness"]]
        out.append("\n## The base circuit(s) on every model\n\n```\n" + format_table(rows) +
                   "\n```\n\nUnder both ablation protocols (paper: every head outside the "
                   "circuit's roles ablated; keep-other-positions: those positions intact), "
                   "circuit accuracy (faithfulness):\n\n```\n" + format_protocols(rows) +
                   "\n```\n")
    if summary.get("own_circuits"):
        out.append("\n## The fine-tunes' own circuits\n\n")
        for m, d in summary["own_circuits"].items():
            o = d.get("overlap")
            out.append(f"- {short_name(m)}: " + (d.get("no_circuit", "no circuit") if o is None else
                       f"{o['n_other']} units, {o['shared']} shared with the base's "
                       f"{o['n_reference']} (overlap coefficient {fmt(o.get('coefficient'))}, Jaccard "
                       f"{fmt(o['jaccard'])}; random circuits of its shape share "
                       f"{fmt(o.get('null_mean'))}, p = {fmt(o.get('null_p'))}); its faithfulness "
                       f"{fmt(d.get('faithfulness'))}") + "\n")
        if summary.get("stability"):
            out.append(f"- the base circuit rediscovered on other prompts: Jaccard "
                       f"{fmt(summary['stability'].get('jaccard'))} (the overlap ceiling)\n")
    if summary.get("verdicts"):
        out.append("\n## Verdicts (yes / no / undecided; rules in report.html)\n\n")
        for m, claims in summary["verdicts"].items():
            for claim, d in claims.items():
                flag = " ⚠ FLAGGED (random circuits also get yes)" if d.get("flagged") else ""
                out.append(f"- **{short_name(m)}** — {claim.replace('_', ' ')}: "
                           f"**{d['answer']}**{flag} — {d['evidence']}\n")
                null = null_text(claim, d)
                cal = (d.get("calibration") or {}).get("text")
                if null:
                    out.append(f"  - {null}\n")
                if cal:
                    out.append(f"  - calibration: {cal}\n")
    if summary.get("timings"):
        out.append("\n## Timings\n\n" + ", ".join(
            f"{k} {v['seconds']} s" + (" (reused)" if v.get("reused") else "")
            for k, v in summary["timings"].items()) + "\n")
    return "".join(out)
