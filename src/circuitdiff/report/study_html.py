"""``report.html``: the study as one self-contained page, built from ``summary.json`` and the
figures in the run folder.

Order: summary and verdicts first, then the circuit (diagram, groups), discovery (scan and score
figures), faithfulness (table and bars), the fine-tunes' own circuits, knockout, DCM and
functional patching, CMAP, definitions of every metric, and the settings, versions, seeds and
timings. Figures are inlined (no network); a figure that is not in the folder is skipped, never
a broken link.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..core.circuit import Circuit, format_head
from ..core.runs import model_tag
from .html import HtmlPage, definitions, esc, figure, table, verdict
from ..core.stats import format_interval
from ..methods.verdicts import CLAIM_TITLES, VerdictRules, null_text
from .tables import fmt, short_name

#: one line per metric, shown at the end of the report
DEFINITIONS: dict[str, str] = {
    "accuracy": "share of prompts whose top token over the whole vocabulary at the last "
                "position is the queried box's object (chance: 1 / number of boxes).",
    "position scan": "accuracy with every head of one layer mean-ablated at one role; where "
                     "the drop is large, the model reads something there.",
    "path-patching score": "change in the receiver's correct-answer metric when only the path "
                           "sender → receiver carries counterfactual activations (negative: "
                           "the path matters).",
    "mean ablation": "a head's output at a position replaced by its mean over other prompts "
                     "of the task at that position.",
    "circuit accuracy": "accuracy with every (head, role) outside the circuit mean-ablated; "
                        "paper protocol: all heads at other positions ablated too; "
                        "keep-other-positions: those positions left intact.",
    "faithfulness": "circuit accuracy / model accuracy on the same prompts (1 = the circuit "
                    "alone recovers the model).",
    "random baseline": "circuit accuracy of random circuits with the same group sizes and "
                       "roles (heads drawn without replacement, seeded).",
    "unit overlap": "(role, layer, head) units two circuits share; recall = shared / units of "
                    "the base circuit, Jaccard = shared / units of either.",
    "attention knockout": "accuracy when attention from one set of positions to another is "
                          "blocked in every layer ≥ L (baseline: nothing blocked, same prompts).",
    "DCM": "a mask over a group's heads, learned so that patching the selected heads from a "
           "counterfactual makes the model say a desideratum's target (object value, position, "
           "box label); λ trades sparsity against accuracy and is chosen on validation prompts.",
    "functional patching": "the DCM-selected heads patched from the counterfactual in another "
                           "model: target accuracy there (does the function hold?).",
    "CMAP gap share": "(accuracy of the base with the fine-tune's activations of some heads "
                      "patched in − base accuracy) / (fine-tune accuracy − base accuracy).",
    "bootstrap interval": "95% percentile interval over 1000 resamples of the prompts (paired: "
                          "both sides of a ratio or difference use the same resample).",
    "verdict": "yes only when the interval clears the rule's threshold, no only when it lies "
               "wholly on the other side, undecided otherwise or when evidence is missing.",
}


def _table(header: Sequence[str], rows: Sequence[Sequence], caption: str = "") -> str:
    """A table, or nothing when there are no rows (an empty table reads as a failure)."""
    return table(header, rows, caption) if rows else ""


def _fig(folder: Path, rel: str, caption: str) -> str:
    p = folder / rel
    return figure(p, caption) if p.is_file() else ""


def _circuit_table(circuit: dict) -> str:
    c = Circuit.from_dict(circuit)
    rows = [[name, g.function or "-", g.position, len(g.heads),
             " ".join(format_head(h) for h in g.heads) or "(empty)"]
            for name, g in c.groups.items()]
    edges = ("<p class='muted'>Edges: " + esc("; ".join(str(e) for e in c.edges)) + "</p>"
             if c.edges else "")
    empty = [n for n, g in c.groups.items() if not g.heads]
    note = (f"<p class='muted'>Empty groups ({esc(', '.join(empty))}): path patching found no "
            f"head that sends to the previous group, usually because that group sits in layer 0 "
            f"where nothing can write to it.</p>" if empty else "")
    units = sum(len(g.heads) for g in c.groups.values())
    return (_table(["group", "function", "role", "heads", "which"], rows,
                  f"{units} (head, role) units of a {c.n_layers} × {c.n_heads} head grid")
            + edges + note)


def _rules_table(s: dict) -> str:
    """The verdict rules as one table (``VerdictRules.table()``: claim, statistic, null,
    threshold), the same for every fine-tune."""
    rows = s.get("rules_table") or VerdictRules.from_dict(
        s.get("config", {}).get("rules", {})).table()
    return ("<h3>Decision rules</h3>"
            + _table(["claim", "statistic", "null", "threshold"],
                     [[r["claim"], r["statistic"], r["null"], r["threshold"]] for r in rows],
                     "how each verdict is decided (applied to every fine-tune above)"))


def _summary_section(s: dict) -> str:
    parts = []
    acc = s.get("accuracy", {})
    if acc:
        chance = next(iter(acc.values())).get("chance")
        line = ", ".join(f"{short_name(m)} {a['accuracy']:.2f}" for m, a in acc.items())
        parts.append(f"<p>Accuracy on {next(iter(acc.values()))['n']} evaluation prompts: "
                     f"{esc(line)} (chance {fmt(chance)}).</p>")
    if "no_circuit" in s:
        parts.append(f"<p><b>No circuit:</b> {esc(s['no_circuit'])}</p>")
    circuit = s.get("circuit")
    if circuit:
        c = Circuit.from_dict(circuit)
        units = sum(len(g.heads) for g in c.groups.values())
        sizing = s.get("discovery", {}).get("sizing", {})
        extra = (f" sized to faithfulness {sizing.get('target')} on {sizing.get('n_validate')} "
                 f"held-out prompts" if sizing.get("target") else "")
        parts.append(f"<p>The base model's circuit ({esc(c.settings.get('chain', 'auto'))} "
                     f"chain{esc(extra)}): {len([g for g in c.groups.values() if g.heads])} "
                     f"groups, {units} (head, role) units.</p>")
    if s.get("circuit_source", "discovered") != "discovered":
        parts.append(f"<p><b>The circuit was not discovered here:</b> "
                     f"{esc(s['circuit_source'])}.</p>")
    name = s.get("circuit_name", "auto_circuit")
    base_rows = [r for r in s.get("faithfulness", []) if r["circuit"] == name]
    if base_rows:
        cells = ", ".join(f"{short_name(r['model'])} {fmt(r['faithfulness'])} "
                          f"{format_interval(r.get('faithfulness_ci'))}" for r in base_rows)
        rnd = [r["random_mean"] / r["full"] for r in base_rows
               if r.get("random_mean") is not None and r["full"] > 0]
        parts.append(f"<p>Its faithfulness on every model: {esc(cells)}"
                     + (f"; random circuits of its shape: ≤ {max(rnd):.2f}" if rnd else "")
                     + ".</p>")
    v = s.get("verdicts", {})
    for ft, claims in v.items():
        parts.append(f"<h3>{esc(ft)}</h3>")
        for key, d in claims.items():
            cal = (d.get("calibration") or {}).get("text", "")
            parts.append(verdict(CLAIM_TITLES.get(key, key), d["answer"], d["evidence"],
                                 null_text(key, d), cal and f"calibration: {cal}",
                                 bool(d.get("flagged"))))
    if v:
        parts.append(_rules_table(s))
    if not v and len(s.get("models", [])) > 1 and "no_circuit" not in s:
        parts.append("<p class='muted'>No verdicts: the steps they need were not run.</p>")
    return "".join(parts)


def _faithfulness_section(s: dict, folder: Path) -> str:
    rows = s.get("faithfulness", [])
    body = []
    for r in rows:
        by = r.get("by_protocol", {})
        rnd = ("-" if r.get("random_mean") is None
               else f"{r['random_mean']:.2f} ± {r.get('random_sd') or 0:.2f}")
        body.append([short_name(r["model"]), r["circuit"], r["full"], r["circuit_accuracy"],
                     rnd, r.get("faithfulness"), format_interval(r.get("faithfulness_ci")) or "-",
                     fmt(by.get("keep-other-positions", {}).get("faithfulness"))])
    n = rows[0]["n"] if rows else 0
    notes = []
    for r in rows:
        if r.get("random_mean") is not None and r["circuit_accuracy"] <= r["random_mean"] + 0.02:
            notes.append(f"{short_name(r['model'])} / {r['circuit']}: circuit accuracy "
                         f"{r['circuit_accuracy']:.2f} is at or below its random baseline "
                         f"({r['random_mean']:.2f}): the circuit explains nothing there.")
        acc = s.get("accuracy", {}).get(r["model"], {})
        if acc.get("chance") and r["circuit_accuracy"] < acc["chance"]:
            notes.append(f"{short_name(r['model'])} / {r['circuit']}: circuit accuracy "
                         f"{r['circuit_accuracy']:.2f} is below chance ({acc['chance']:.2f}): "
                         f"ablating everything outside this circuit breaks the task; the circuit "
                         f"is not where this model does it.")
        if r.get("warning"):
            notes.append(f"{short_name(r['model'])} / {r['circuit']}: {r['warning']}")
    return (_table(["model", "circuit", "model acc", "circuit acc", "random acc (mean ± sd)",
                   "faithfulness", "95% CI", "faithfulness, keep-other-positions"], body,
                  f"paper protocol; n={n} evaluation prompts")
            + "".join(f"<p class='muted'>{esc(x)}</p>" for x in notes)
            + _fig(folder, "faithfulness.png", f"Faithfulness with its 95% bootstrap interval, "
                                               f"random circuits hatched (n={n} prompts)"))


def _own_section(s: dict, folder: Path) -> str:
    own = s.get("own_circuits", {})
    body = []
    for m, d in own.items():
        if "overlap" not in d:
            body.append([short_name(m), "-", "-", "-", "-", "-", "-", d.get("no_circuit", "")])
            continue
        o = d["overlap"]
        own_f = (d.get("sizing") or {}).get("faithfulness_paper")
        body.append([short_name(m), o["n_other"], own_f, o["shared"], o["recall"],
                     o.get("coefficient"), o["jaccard"], (d.get("sizing") or {}).get("message", "")])
    figs = "".join(_fig(folder, f"own/{model_tag(m)}/circuit_flow.png",
                        f"{short_name(m)}'s own circuit (automatic chain, same settings as the "
                        f"base's)") for m in own)
    return (_table(["fine-tune", "units", "own faithfulness (held-out)", "shared with base",
                    "recall of base units", "overlap coefficient", "Jaccard", "note"], body,
                   "each fine-tune's own circuit against the base circuit")
            + figs)


def _knockout_section(s: dict, folder: Path) -> str:
    ko = s.get("knockout", {})
    parts = []
    body = []
    for m, curves in ko.items():
        for edge, c in curves.items():
            body.append([short_name(m), edge, c["baseline"], min(c["accuracy"]), c["n"]])
        parts.append(_fig(folder, f"knockout/{model_tag(m)}.png",
                          f"Attention knockout on {short_name(m)}: accuracy when attention "
                          f"along each edge is blocked in layers ≥ L "
                          f"(n={next(iter(curves.values()))['n']} prompts)"))
    n_eval = s.get("config", {}).get("evaluation", {}).get("n_prompts")
    note = (f"<p class='muted'>Knockout runs on the first {body[0][4]} of the {n_eval} evaluation "
            f"prompts, so its no-knockout baseline is the accuracy on those prompts and can differ "
            f"from the accuracy table.</p>" if body and n_eval and body[0][4] != n_eval else "")
    return (_table(["model", "edge blocked", "no knockout", "lowest accuracy", "n"], body)
            + note + "".join(parts))


def _dcm_section(s: dict, folder: Path) -> str:
    d = s.get("dcm")
    if not d:
        return ""
    body = [[r["group"], r["desideratum"], f"{len(r['selected'])}/{len(r['group_heads'])}",
             " ".join(r["selected"]) or "-", r["test_accuracy"],
             r["random_mean"], r["no_patch"], r["chosen_lambda"]] for r in d["rows"]]
    empty = "".join(f"<p class='muted'>{esc(n)}</p>" for n in d.get("notes", []))
    if d.get("empty_groups"):
        empty += (f"<p class='muted'>Groups with no heads, not trained: "
                  f"{esc(', '.join(d['empty_groups']))}</p>")
    fun = s.get("functional", [])
    fbody = [[short_name(r["model"]), r["group"], r["desideratum"], len(r["selected"]),
              r["accuracy"], r["random_mean"], r["no_patch"], r["n"]] for r in fun]
    n_test = d["rows"][0]["n_test"] if d["rows"] else 0
    return (_table(["group", "desideratum", "selected", "heads", "target acc", "random heads",
                   "no patch", "λ"], body,
                  f"DCM on {short_name(d['model'])}, test split n={n_test} prompts")
            + empty
            + _table(["model", "group", "desideratum", "heads", "target acc", "random heads",
                     "no patch", "n"], fbody, "functional patching: the base's DCM selections "
                                              "patched in every model")
            + _fig(folder, "functional.png", f"Functional patching across models "
                                             f"(n={n_test} prompts)"))


def _patched(row: dict, num: dict[str, str]) -> str:
    """What a CMAP row patches, short: ``G2 heads@labels`` for a group, ``G1 + G2 + G3`` for a
    cumulative row (the groups are named on their own rows), as in the bar chart's ticks."""
    if row["kind"] == "group":
        return f"{num.get(row['name'], '')} {row['name']}".strip()
    if row["kind"] == "cumulative":
        return " + ".join(num.get(g, g) for g in row.get("groups", row["name"].split("+")))
    if row["kind"] == "input":
        group, _, comp = row["name"].partition(":")
        return f"{num.get(group, group)} {comp}"
    return row["name"]


def _cmap_section(s: dict, folder: Path) -> str:
    parts = []
    for m, res in s.get("cmap", {}).items():
        if "skipped" in res:
            parts.append(f"<h3>{esc(short_name(m))}</h3><p class='muted'>{esc(res['skipped'])}</p>")
            continue
        d = res["directions"][0]
        num = {r["name"]: f"G{i + 1}" for i, r in
               enumerate(x for x in d["rows"] if x["kind"] == "group")}
        body = [[r["kind"], _patched(r, num), r["n_heads"], r["accuracy"], r["share"],
                 format_interval(r.get("share_ci")) or "-", r.get("random_share")]
                for r in d["rows"] if not r.get("empty")]
        parts.append(f"<h3>{esc(short_name(m))} → {esc(short_name(d['target']))}</h3>"
                     f"<p class='muted'>base accuracy {d['target_accuracy']:.2f}, fine-tune "
                     f"{d['source_accuracy']:.2f}, gap {d['gap']:+.2f} "
                     f"{esc(format_interval(d.get('gap_ci')))}; n={d['n']} prompts</p>"
                     + _table(["kind", "patched", "heads", "accuracy", "gap share", "95% CI",
                              "random share"], body)
                     + _fig(folder, f"cmap/{model_tag(m)}.png",
                            f"CMAP {short_name(m)} → base (n={d['n']} prompts)"))
    return "".join(parts)


def _settings_section(s: dict) -> str:
    run = s.get("run", {})
    t = s.get("timings", {})
    trows = [[k, v["seconds"], "reused" if v.get("reused") else "computed"] for k, v in t.items()]
    cfg = s.get("config", {})
    ev = cfg.get("evaluation", {})
    seeds = {"evaluation prompts": ev.get("seed"), "mean-ablation prompts": ev.get("mean_seed"),
             "discovery prompts": cfg.get("discovery", {}).get("seed"),
             "DCM prompts": cfg.get("dcm", {}).get("seed"),
             "CMAP prompts": cfg.get("cmap", {}).get("seed"),
             "random circuits": ev.get("random_seed")}
    versions = ", ".join(f"{k} {v}" for k, v in run.get("versions", {}).items())
    return (f"<p>Models: {esc(', '.join(s.get('models', [])))} (the first is the base). "
            f"Steps: {esc(', '.join(s.get('steps', [])))}. Run time {run.get('seconds', '?')} s; "
            f"Python {esc(run.get('python', '?'))}; {esc(versions)}.</p>"
            + _table(["seed of", "seed"], [[k, v] for k, v in seeds.items()])
            + _table(["step", "seconds", "this run"], trows,
                    "wall time per step (a reused step shows the time it took when computed)")
            + "<details><summary>all settings (summary.json → config)</summary><pre>"
            + esc(_pretty(cfg)) + "</pre></details>")


def _pretty(obj) -> str:
    import json

    return json.dumps(obj, indent=1)


def build_study_page(summary: dict, folder: str | Path) -> HtmlPage:
    """The report page for a study summary whose figures live in ``folder``."""
    folder = Path(folder)
    s = summary
    models = s.get("models", [])
    page = HtmlPage("circuitdiff study",
                    f"base {models[0] if models else '?'}; fine-tunes "
                    f"{', '.join(models[1:]) or 'none'}")
    page.add("Summary and verdicts", _summary_section(s))
    if s.get("circuit"):
        page.add("The base circuit",
                 _fig(folder, "discover/circuit_flow.png",
                      "The base model's circuit on an example prompt: groups as boxes at the "
                      "tokens they read, layers up; arrows say which input (q, k, v) of the "
                      "receiving group a sender writes, or the output"
                      f" (discovery n={s['config'].get('discovery', {}).get('n_prompts', '?')}"
                      f" prompts)")
                 + _circuit_table(s["circuit"]))
        n_disc = s["config"].get("discovery", {}).get("n_prompts", "?")
        n_val = s.get("discovery", {}).get("sizing", {}).get("n_validate", "?")
        disc = (_fig(folder, "discover/scan.png", "Position scan: accuracy with one layer's heads "
                     f"mean-ablated at one role (n={n_disc} prompts)")
                + _fig(folder, "discover/curve.png", "Faithfulness against circuit size on "
                       f"held-out prompts (n={n_val} prompts)")
                + _fig(folder, "discover/circuit_graph.png",
                       "Circuit graph: one box per group (its heads), columns by role, height "
                       "the group's mean layer; arrows coloured by edge kind as in the flow "
                       f"diagram (discovery n={n_disc} prompts)"))
        if s.get("paper_circuit"):
            heat = "".join(figure(p, f"paper chain: path-patching scores, {p.stem[8:]}")
                           for p in sorted((folder / "discover_paper").glob("heatmap_*.png")))
            disc += ("<h3>The paper's four-group chain on the same model</h3>"
                     + _fig(folder, "discover_paper/circuit_flow.png",
                            "The paper chain's circuit on the same example prompt")
                     + _circuit_table(s["paper_circuit"]) + heat)
        page.add("Discovery: scan and scores", disc)
    if s.get("faithfulness"):
        page.add("Faithfulness on every model", _faithfulness_section(s, folder))
    if s.get("own_circuits"):
        page.add("The fine-tunes' own circuits", _own_section(s, folder))
    if s.get("knockout"):
        page.add("Attention knockout", _knockout_section(s, folder))
    if s.get("dcm"):
        page.add("DCM: what each group encodes", _dcm_section(s, folder))
    if s.get("cmap"):
        page.add("CMAP: where the fine-tunes' gain lives", _cmap_section(s, folder))
    page.add("Definitions", definitions(DEFINITIONS))
    page.add("Settings, versions, seeds and timings", _settings_section(s))
    return page


def write_study_html(summary: dict, folder: str | Path, path: str | Path) -> Path:
    """Write ``report.html`` for ``summary`` (figures read from ``folder``)."""
    return build_study_page(summary, folder).save(path)
