"""One verdict per fine-tune, each with its rule, its numbers and a bootstrap interval.

The three claims of the paper, asked of every fine-tune against its base:

* **uses the base circuit** — the base circuit is faithful on the fine-tune (faithfulness
  interval above ``faithful``) and the fine-tune's own circuit, itself faithful, overlaps it
  (at least ``overlap`` of the smaller circuit's (head, role) units are in the other: a
  fine-tune that needs fewer heads for the same target is still "the same circuit");
* **same functions** — every DCM selection that does something on the base (target accuracy at
  least ``min_effect`` above random heads) does it on the fine-tune too (paired difference of
  target accuracy, fine-tune − base, with its interval above ``−margin``);
* **gain carried by the circuit** — patching the fine-tune's circuit activations into the base
  recovers at least ``carried`` of the accuracy gap (CMAP gap share interval).

Each answer is ``yes``, ``no`` or ``undecided``: yes only when the whole interval clears the
threshold, no only when it lies wholly on the other side, undecided otherwise (and whenever a
piece of evidence is missing or the gap itself is not distinguishable from 0). Intervals are
paired bootstraps over prompts (:mod:`circuitdiff.core.stats`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..core.circuit import Circuit
from ..core.stats import difference_interval, format_interval

YES, NO, UNDECIDED = "yes", "no", "undecided"
CLAIMS: tuple[str, ...] = ("uses_base_circuit", "same_functions", "gain_carried")
CLAIM_TITLES = {"uses_base_circuit": "uses the base circuit",
                "same_functions": "same functions (DCM)",
                "gain_carried": "gain carried by the circuit (CMAP)"}


@dataclass
class VerdictRules:
    """Thresholds of the three verdicts (also recorded in the summary)."""

    faithful: float = 0.8       # base circuit faithfulness on the fine-tune
    overlap: float = 0.5        # overlap coefficient: shared units / units of the smaller circuit
    overlap_no: float = 0.2     # below this the circuits are different
    own_faithful: float = 0.5   # an own circuit below this faithfulness says nothing by overlap
    min_effect: float = 0.2     # a DCM selection "does something" on the base: above random by this
    margin: float = 0.1         # the fine-tune may lose at most this much of a DCM target accuracy
    carried: float = 0.5        # CMAP gap share of the whole circuit
    bootstrap: int = 1000
    seed: int = 0
    confidence: float = 0.95


def unit_overlap(reference: Circuit, other: Circuit) -> dict[str, Any]:
    """Overlap of two circuits' (role, layer, head) units: shared count, recall (of
    ``reference``), precision, Jaccard and the overlap coefficient (shared / units of the smaller
    circuit); ``None`` over an empty set."""
    def units(c: Circuit) -> set[tuple[str, int, int]]:
        return {(g.position, l, h) for g in c.groups.values() for l, h in g.heads}

    a, b = units(reference), units(other)
    shared = len(a & b)
    ratio = lambda x, y: None if y == 0 else x / y  # noqa: E731
    return {"shared": shared, "n_reference": len(a), "n_other": len(b),
            "recall": ratio(shared, len(a)), "precision": ratio(shared, len(b)),
            "jaccard": ratio(shared, len(a | b)),
            "coefficient": ratio(shared, min(len(a), len(b)))}


def _ci(ci: Sequence[float] | None) -> str:
    return format_interval(ci, "[-]")


def against(ci: Sequence[float] | None, threshold: float) -> str:
    """yes when the interval lies at or above ``threshold``, no when wholly below, else
    undecided (also when there is no interval)."""
    if not ci:
        return UNDECIDED
    if ci[0] >= threshold:
        return YES
    if ci[1] < threshold:
        return NO
    return UNDECIDED


def _verdict(answer: str, rule: str, evidence: str, **numbers) -> dict:
    return {"answer": answer, "rule": rule, "evidence": evidence, "numbers": numbers}


def uses_base_circuit(results: dict, spec: str, rules: VerdictRules, circuit_name: str) -> dict:
    pct = rules.confidence * 100
    rule = (f"yes when the base circuit's faithfulness on the fine-tune has its {pct:.0f}% "
            f"interval at or above {rules.faithful} and the fine-tune's own circuit (itself at "
            f"faithfulness ≥ {rules.own_faithful}) shares at least {rules.overlap:.0%} of the "
            f"smaller circuit's (head, role) units; no when the interval lies below "
            f"{rules.faithful} or the overlap is under {rules.overlap_no:.0%}")
    row = next((r for r in results.get("faithfulness", [])
                if r["model"] == spec and r["circuit"] == circuit_name), None)
    if row is None:
        return _verdict(UNDECIDED, rule, "faithfulness was not measured (step faithfulness)")
    ci = row.get("faithfulness_ci")
    faithful = against(ci, rules.faithful)
    f = row.get("faithfulness")
    ftxt = f"faithfulness {'-' if f is None else f'{f:.2f}'} {_ci(ci)} (n={row['n']})"
    own = results.get("own_circuits", {}).get(spec)
    if own is None or "overlap" not in own:
        why = ("its own circuit was not found" if own else "own circuits were not computed "
               "(step own_circuits)")
        return _verdict(NO if faithful == NO else UNDECIDED, rule, f"{ftxt}; {why}",
                        faithfulness=f, faithfulness_ci=ci)
    o = own["overlap"]
    smaller = min(o["n_reference"], o["n_other"])
    coef = o["shared"] / smaller if smaller else 0.0
    own_f = (own.get("sizing") or {}).get("faithfulness_paper")
    otxt = (f"own circuit ({o['n_other']} units) shares {o['shared']} with the base's "
            f"{o['n_reference']} ({coef:.0%} of the smaller; Jaccard {o['jaccard'] or 0:.2f})")
    if own_f is not None and own_f < rules.own_faithful:
        return _verdict(NO if faithful == NO else UNDECIDED, rule,
                        f"{ftxt}; {otxt}, but that own circuit reaches only faithfulness "
                        f"{own_f:.2f} on its held-out prompts, so its overlap says nothing",
                        faithfulness=f, faithfulness_ci=ci, overlap=coef, own_faithfulness=own_f)
    if faithful == NO or coef < rules.overlap_no:
        answer = NO
    elif faithful == YES and coef >= rules.overlap:
        answer = YES
    else:
        answer = UNDECIDED
    return _verdict(answer, rule, f"{ftxt}; {otxt}", faithfulness=f, faithfulness_ci=ci,
                    overlap=coef, jaccard=o["jaccard"], own_faithfulness=own_f)


def same_functions(results: dict, base: str, spec: str, rules: VerdictRules) -> dict:
    pct = rules.confidence * 100
    rule = (f"each DCM selection whose target accuracy on the base is at least "
            f"{rules.min_effect} above random heads must keep it on the fine-tune: yes when every "
            f"paired difference (fine-tune − base) has its {pct:.0f}% interval at or above "
            f"−{rules.margin}, no when one lies wholly below, else undecided")
    rows = results.get("functional", [])
    if not rows:
        return _verdict(UNDECIDED, rule, "functional patching was not run (steps dcm, functional)")
    at = {(r["model"], r["group"], r["desideratum"]): r for r in rows}
    checks, answers = [], []
    for (m, g, d), b in at.items():
        if m != base or b["random_mean"] is None or b["accuracy"] - b["random_mean"] < rules.min_effect:
            continue
        ft = at.get((spec, g, d))
        if ft is None:
            continue
        ci = difference_interval(ft.get("hits", []), b.get("hits", []), rules.bootstrap,
                                 rules.seed, rules.confidence)
        a = against(ci, -rules.margin)
        answers.append(a)
        checks.append({"group": g, "desideratum": d, "base": b["accuracy"],
                       "fine_tune": ft["accuracy"], "difference_ci": ci, "answer": a})
    if not checks:
        return _verdict(UNDECIDED, rule, "no DCM selection does anything on the base above "
                                         "random heads: nothing to compare")
    answer = NO if NO in answers else (YES if all(a == YES for a in answers) else UNDECIDED)
    ev = "; ".join(f"{c['group']}/{c['desideratum']}: {c['base']:.2f} → {c['fine_tune']:.2f} "
                   f"(Δ {_ci(c['difference_ci'])})" for c in checks)
    return _verdict(answer, rule, ev, checks=checks)


def gain_carried(results: dict, spec: str, rules: VerdictRules) -> dict:
    pct = rules.confidence * 100
    rule = (f"patching the fine-tune's activations of the whole circuit into the base: yes when "
            f"the {pct:.0f}% interval of the gap share is at or above {rules.carried}, no when "
            f"wholly below; undecided when the fine-tune's gain itself is not distinguishable "
            f"from 0")
    res = results.get("cmap", {}).get(spec)
    if res is None:
        return _verdict(UNDECIDED, rule, "CMAP was not run (step cmap)")
    if "skipped" in res:
        return _verdict(UNDECIDED, rule, res["skipped"], gap=res["gap"], gap_ci=res["gap_ci"])
    d = res["directions"][0]
    gap, gap_ci = d["gap"], d.get("gap_ci")
    gtxt = (f"accuracy {d['target_accuracy']:.2f} (base) → {d['source_accuracy']:.2f} "
            f"(fine-tune), gap {gap:+.2f} {_ci(gap_ci)}, n={d['n']}")
    if gap_ci is None or gap_ci[0] <= 0:
        return _verdict(UNDECIDED, rule, f"{gtxt}: no gain to explain", gap=gap, gap_ci=gap_ci)
    whole = next((r for r in d["rows"] if r["kind"] == "circuit"), None)
    if whole is None or whole.get("share") is None:
        return _verdict(UNDECIDED, rule, f"{gtxt}; the circuit row is missing", gap=gap)
    ci = whole.get("share_ci")
    rnd = whole.get("random_share")
    return _verdict(against(ci, rules.carried), rule,
                    f"{gtxt}; the circuit ({_size(whole)}) carries {whole['share']:.2f} "
                    f"{_ci(ci)} of it" + ("" if rnd is None else f" (random heads: {rnd:.2f})"),
                    gap=gap, gap_ci=gap_ci, share=whole["share"], share_ci=ci)


def _size(row: dict) -> str:
    """A CMAP row's size as the circuit counts it: (head, role) units, and the distinct heads
    among them when fewer (a row saved before units were counted: its heads)."""
    heads, units = row["n_heads"], row.get("n_units")
    if units is None:
        return f"{heads} heads"
    return f"{units} (head, role) units" + (f", {heads} distinct heads" if heads != units else "")


def verdicts(results: dict, base: str, fine_tunes: Sequence[str], rules: VerdictRules,
             circuit_name: str) -> dict[str, dict]:
    """``{fine_tune: {claim: {answer, rule, evidence, numbers}}}`` from the study's step results."""
    return {spec: {"uses_base_circuit": uses_base_circuit(results, spec, rules, circuit_name),
                   "same_functions": same_functions(results, base, spec, rules),
                   "gain_carried": gain_carried(results, spec, rules)}
            for spec in fine_tunes}
