"""One verdict per fine-tune, each a test against a null, with its false-positive rate.

The three claims of the paper, asked of every fine-tune against its base. Each is a
*statistical* claim: an interval (paired bootstrap over prompts, :mod:`circuitdiff.core.stats`)
must clear a threshold AND beat a null — what random circuits of the same shape, or no
patching at all, would give. A number without its null is not evidence.

* **uses the base circuit** — (a) the base circuit is faithful on the fine-tune (interval at or
  above ``faithful``); (b) the fine-tune's own circuit is itself faithful (interval at or above
  ``own_faithful``); (c) its (head, role) units overlap the base circuit's more than random
  circuits of its shape would (exact hypergeometric null per position, p < ``alpha``) and its
  Jaccard with the base circuit reaches ``stability`` × the Jaccard of two discoveries of the
  base on disjoint prompts (the ceiling: discovery's own noise). Containment alone is not
  overlap: a huge own circuit holds every base unit by chance and fails (c).
* **same functions** — every DCM selection that *found a function* on the base (its validation
  target accuracy beats both no patching and random heads of its size, with an interval) keeps
  it on the fine-tune (paired difference fine-tune − base, interval at or above ``−margin``).
  A selection that found nothing is reported as "no function found", never tested.
* **gain carried by the circuit** — patching the fine-tune's circuit activations into the base
  recovers at least ``carried`` of the accuracy gap (share interval) AND more than random
  circuits of the same shape do by ``excess`` (paired interval of share − mean random share)
  AND it ranks above (nearly) every random draw: permutation p = rank / (draws + 1) ≤ ``alpha``,
  exact under the null whatever the shares' distribution. The mean alone is no null: random
  circuits of a large shape often hold the few heads that carry a gain (heavy tail).

Each answer is ``yes``, ``no`` or ``undecided``: yes only when every interval clears its bar, no
only when one lies wholly on the other side, undecided otherwise (and whenever a piece of
evidence is missing or the gap itself is not distinguishable from 0). :func:`calibration` runs
the same rules on random circuits of the base circuit's shape: their rate of "yes" is the
false-positive rate printed beside each verdict (a verdict whose null says yes is flagged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from ..core.circuit import Circuit
from ..core.config import Config, check_finite
from ..core.stats import difference_interval, format_interval, overlap_null, upper_tail

YES, NO, UNDECIDED = "yes", "no", "undecided"
CLAIMS: tuple[str, ...] = ("uses_base_circuit", "same_functions", "gain_carried")
CLAIM_TITLES = {"uses_base_circuit": "uses the base circuit",
                "same_functions": "same functions (DCM)",
                "gain_carried": "gain carried by the circuit (CMAP)"}


@dataclass
class VerdictRules(Config):
    """Thresholds and nulls of the three verdicts (recorded in the summary and the report)."""

    #: the base circuit's faithfulness on the fine-tune: interval at or above this
    faithful: float = 0.8
    #: the fine-tune's own circuit's faithfulness: interval at or above this, else its overlap
    #: says nothing
    own_faithful: float = 0.5
    #: every null's p-value must be at or below this: the overlap's exact null (below) and the
    #: CMAP circuit's rank among its random draws (rank / (draws + 1) ≤ alpha)
    alpha: float = 0.05
    #: the fine-tune's Jaccard with the base circuit must reach this fraction of the Jaccard of
    #: two discoveries of the base on disjoint prompts (discovery's own stability)
    stability: float = 0.5
    #: a Jaccard below this (with the null not beaten) is "different circuits"
    overlap_no: float = 0.2
    #: the fine-tune may lose at most this much of a DCM target accuracy
    margin: float = 0.1
    #: CMAP gap share of the whole circuit: interval at or above this
    carried: float = 0.5
    #: CMAP: the circuit's share must beat the mean random-circuit share by this (interval)
    excess: float = 0.1
    #: bootstrap resamples, their seed and the intervals' confidence
    bootstrap: int = 1000
    seed: int = 0
    confidence: float = 0.95

    def __post_init__(self) -> None:
        check_finite("verdict rules", faithful=self.faithful, own_faithful=self.own_faithful,
                     alpha=self.alpha, stability=self.stability, overlap_no=self.overlap_no,
                     margin=self.margin, carried=self.carried, excess=self.excess,
                     confidence=self.confidence)
        if not 0 < self.confidence < 1:
            raise ValueError(f"verdict rules: confidence must be in (0, 1), got {self.confidence}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"verdict rules: alpha must be in (0, 1), got {self.alpha}")
        if self.bootstrap < 1:
            raise ValueError(f"verdict rules: bootstrap must be >= 1, got {self.bootstrap}")

    def table(self) -> list[dict]:
        """The rules as rows (claim, statistic, null, threshold) for the README and report."""
        pct = f"{self.confidence:.0%}"
        return [
            {"claim": "uses the base circuit",
             "statistic": f"base circuit's faithfulness on the fine-tune ({pct} CI); own "
                          f"circuit's faithfulness ({pct} CI); unit overlap (shared, Jaccard)",
             "null": "random circuits of the own circuit's shape (exact hypergeometric); two "
                     "discoveries of the base on disjoint prompts (ceiling)",
             "threshold": f"CI ≥ {self.faithful}; own CI ≥ {self.own_faithful}; p < "
                          f"{self.alpha} and Jaccard ≥ {self.stability} × ceiling"},
            {"claim": "same functions",
             "statistic": f"DCM target accuracy, fine-tune − base ({pct} CI, paired)",
             "null": "a selection counts only if it beats no patching and random heads of its "
                     "size (CI)",
             "threshold": f"CI ≥ −{self.margin} for every selection that found a function"},
            {"claim": "gain carried",
             "statistic": f"CMAP gap share of the circuit; share − mean random share ({pct} "
                          f"CI, paired)",
             "null": "random circuits of the circuit's shape patched the same way (their mean "
                     "and the circuit's rank among them: a permutation test)",
             "threshold": f"share CI ≥ {self.carried}, excess CI ≥ {self.excess} and rank p ≤ "
                          f"{self.alpha} (rank / (draws + 1): ≥ {min_draws(self)} draws)"}]


def _units(c: Circuit) -> set[tuple[str, int, int]]:
    return {(g.position, l, h) for g in c.groups.values() for l, h in g.heads}


def unit_overlap(reference: Circuit, other: Circuit, grid: tuple[int, int] | None = None
                 ) -> dict[str, Any]:
    """Overlap of two circuits' (role, layer, head) units: shared count, recall (of
    ``reference``), precision, Jaccard, the overlap coefficient (shared / units of the smaller
    circuit; ``None`` over an empty set) and — given the head ``grid`` ``(layers, heads)`` —
    ``null_p``: the exact probability that a random circuit of ``other``'s shape (its units per
    position, heads drawn uniformly without replacement) shares at least as many units with
    ``reference``, and ``null_mean``, the shared count such circuits have on average."""
    a, b = _units(reference), _units(other)
    shared = len(a & b)
    ratio = lambda x, y: None if y == 0 else x / y  # noqa: E731
    out = {"shared": shared, "n_reference": len(a), "n_other": len(b),
           "recall": ratio(shared, len(a)), "precision": ratio(shared, len(b)),
           "jaccard": ratio(shared, len(a | b)),
           "coefficient": ratio(shared, min(len(a), len(b)))}
    if grid is not None:
        population = grid[0] * grid[1]
        positions = sorted({u[0] for u in a | b})
        strata = [(population, sum(1 for u in a if u[0] == p), sum(1 for u in b if u[0] == p))
                  for p in positions]
        dist = overlap_null(strata)
        out["null_p"] = upper_tail(dist, shared)
        out["null_mean"] = sum(i * q for i, q in enumerate(dist))
    return out


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


def overlap_answer(overlap: dict, ceiling: float | None, rules: VerdictRules) -> str:
    """Does the own circuit overlap the base circuit beyond chance and near discovery's own
    stability? yes: null beaten (p < alpha) and Jaccard ≥ stability × ceiling; no: null not
    beaten or Jaccard under ``overlap_no``; undecided otherwise (or without the numbers)."""
    p, jac = overlap.get("null_p"), overlap.get("jaccard")
    if p is None or jac is None:
        return UNDECIDED
    if p >= rules.alpha or jac < rules.overlap_no:
        return NO
    if ceiling is not None and jac >= rules.stability * ceiling:
        return YES
    return UNDECIDED


def uses_rule(faith_ci: Sequence[float] | None, own_ci: Sequence[float] | None,
              overlap: dict | None, ceiling: float | None, rules: VerdictRules) -> str:
    """The decision of "uses the base circuit" from its three pieces of evidence."""
    faithful = against(faith_ci, rules.faithful)
    if faithful == NO:
        return NO
    own = against(own_ci, rules.own_faithful)
    if overlap is None or own != YES:
        return UNDECIDED  # an own circuit that is not faithful says nothing by its overlap
    ov = overlap_answer(overlap, ceiling, rules)
    if ov == NO:
        return NO
    return YES if faithful == YES and ov == YES else UNDECIDED


def uses_base_circuit(results: dict, spec: str, rules: VerdictRules, circuit_name: str) -> dict:
    rule = (f"yes when the base circuit's faithfulness on the fine-tune has its interval at or "
            f"above {rules.faithful}, the fine-tune's own circuit is faithful (interval ≥ "
            f"{rules.own_faithful}) and shares more units with the base circuit than random "
            f"circuits of its shape (p < {rules.alpha}) with a Jaccard of at least "
            f"{rules.stability} × the base's rediscovery Jaccard; no when the faithfulness "
            f"interval lies below {rules.faithful} or the overlap is no better than random")
    row = next((r for r in results.get("faithfulness", [])
                if r["model"] == spec and r["circuit"] == circuit_name), None)
    if row is None:
        return _verdict(UNDECIDED, rule, "faithfulness was not measured (step faithfulness)")
    ci = row.get("faithfulness_ci")
    f = row.get("faithfulness")
    ftxt = f"base circuit faithfulness {'-' if f is None else f'{f:.2f}'} {_ci(ci)} (n={row['n']})"
    own = results.get("own_circuits", {}).get(spec)
    if own is None or "overlap" not in own:
        why = ("its own circuit was not found" if own else "own circuits were not computed "
               "(step own_circuits)")
        return _verdict(NO if against(ci, rules.faithful) == NO else UNDECIDED, rule,
                        f"{ftxt}; {why}", faithfulness=f, faithfulness_ci=ci)
    o = own["overlap"]
    own_f, own_ci = own.get("faithfulness"), own.get("faithfulness_ci")
    ceiling = (results.get("stability") or {}).get("jaccard")
    answer = uses_rule(ci, own_ci, o, ceiling, rules)
    p = o.get("null_p")
    otxt = (f"own circuit: {o['n_other']} units, faithfulness "
            f"{'-' if own_f is None else f'{own_f:.2f}'} {_ci(own_ci)}; shares {o['shared']} of "
            f"the base's {o['n_reference']} units (Jaccard {o['jaccard'] or 0:.2f}, overlap "
            f"coefficient {o['coefficient'] or 0:.2f}; random circuits of its shape share "
            f"{o.get('null_mean', float('nan')):.1f} on average, p = "
            f"{'-' if p is None else f'{p:.2g}'}; two discoveries of the base: Jaccard "
            f"{'-' if ceiling is None else f'{ceiling:.2f}'})")
    return _verdict(answer, rule, f"{ftxt}; {otxt}", faithfulness=f, faithfulness_ci=ci,
                    own_faithfulness=own_f, own_faithfulness_ci=own_ci,
                    jaccard=o.get("jaccard"), coefficient=o.get("coefficient"),
                    shared=o["shared"], n_base=o["n_reference"], n_own=o["n_other"],
                    null_p=p, null_mean=o.get("null_mean"), ceiling=ceiling)


def function_found(row: dict) -> bool:
    """A DCM row found a function on the base: its ``found`` flag (validation target accuracy
    beats no patching and random heads of its size with an interval)."""
    return bool(row.get("found", False))


def same_functions(results: dict, base: str, spec: str, rules: VerdictRules) -> dict:
    rule = (f"each DCM selection that found a function on the base (validation accuracy above "
            f"no patching and random heads of its size, with an interval) must keep its target "
            f"accuracy on the fine-tune: yes when every paired difference (fine-tune − base) has "
            f"its interval at or above −{rules.margin}, no when one lies wholly below")
    rows = results.get("functional", [])
    if not rows:
        return _verdict(UNDECIDED, rule, "functional patching was not run (steps dcm, functional)")
    found = {(r["group"], r["desideratum"]) for r in (results.get("dcm") or {}).get("rows", [])
             if function_found(r)}
    at = {(r["model"], r["group"], r["desideratum"]): r for r in rows}
    checks, answers = [], []
    for (m, g, d), b in at.items():
        if m != base or (g, d) not in found:
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
        return _verdict(UNDECIDED, rule, "no function found: no DCM selection beats both no "
                                         "patching and random heads on the base")
    answer = NO if NO in answers else (YES if all(a == YES for a in answers) else UNDECIDED)
    ev = "; ".join(f"{c['group']}/{c['desideratum']}: {c['base']:.2f} → {c['fine_tune']:.2f} "
                   f"(Δ {_ci(c['difference_ci'])})" for c in checks)
    return _verdict(answer, rule, ev, checks=checks)


def rank_p(rank: int | None, draws: int) -> float | None:
    """The permutation p-value of a set's rank among ``draws`` random sets of its shape:
    ``rank / (draws + 1)`` (rank 1 = above every draw; ties count against the set). Under the
    null — the set is one more random draw — every rank is equally likely, so ``P(p ≤ α) ≤ α``
    exactly, whatever the shares' distribution (heavy-tailed included). None without a rank."""
    if rank is None or draws < 1:
        return None
    return rank / (draws + 1)


def min_draws(rules: VerdictRules) -> int:
    """Random draws the gain rule needs before a rank can reach ``alpha``: ``⌈1/α⌉ − 1``."""
    return max(1, math.ceil(1 / rules.alpha - 1e-9) - 1)


def gain_rule(share_ci: Sequence[float] | None, excess_ci: Sequence[float] | None,
              rank: int | None, draws: int, rules: VerdictRules) -> str:
    """yes: share interval ≥ ``carried``, (share − mean random share) interval ≥ ``excess``
    AND the set's rank among the ``draws`` random sets has permutation p ≤ ``alpha``
    (:func:`rank_p`: it beats every or nearly every draw, not only their mean — random circuits
    of a large shape often hold the few heads that carry a gain, so their shares are
    heavy-tailed and the mean alone is no null); no: the share interval lies below ``carried``
    or the excess interval below 0 (no better than random circuits); undecided otherwise (too
    few draws for the rank test included) or without the intervals."""
    share, excess = against(share_ci, rules.carried), against(excess_ci, rules.excess)
    if share == NO or (excess_ci and excess_ci[1] < 0):
        return NO
    p = rank_p(rank, draws)
    ranked = p is not None and p <= rules.alpha
    return YES if share == YES and excess == YES and ranked else UNDECIDED


def _gap_text(d: dict) -> str:
    return (f"accuracy {d['target_accuracy']:.2f} (base) → {d['source_accuracy']:.2f} "
            f"(fine-tune), gap {d['gap']:+.2f} {_ci(d.get('gap_ci'))}, n={d['n']}")


def gain_carried(results: dict, spec: str, rules: VerdictRules) -> dict:
    rule = (f"patching the fine-tune's activations of the whole circuit into the base: yes when "
            f"the gap-share interval is at or above {rules.carried}, the interval of (share − "
            f"mean share of random circuits of its shape) at or above {rules.excess}, and the "
            f"circuit's rank among the random circuits has permutation p = rank / (draws + 1) "
            f"≤ {rules.alpha} (at least {min_draws(rules)} draws); no when the share lies below "
            f"{rules.carried} or no better than random; undecided otherwise, and when the gain "
            f"itself is not distinguishable from 0")
    res = results.get("cmap", {}).get(spec)
    if res is None:
        return _verdict(UNDECIDED, rule, "CMAP was not run (step cmap)")
    if "skipped" in res:
        return _verdict(UNDECIDED, rule, res["skipped"], gap=res["gap"], gap_ci=res["gap_ci"])
    d = res["directions"][0]
    gap, gap_ci = d["gap"], d.get("gap_ci")
    if gap_ci is None or gap_ci[0] <= 0:
        return _verdict(UNDECIDED, rule, f"{_gap_text(d)}: no gain to explain", gap=gap,
                        gap_ci=gap_ci)
    whole = next((r for r in d["rows"] if r["kind"] == "circuit"), None)
    if whole is None or whole.get("share") is None:
        return _verdict(UNDECIDED, rule, f"{_gap_text(d)}; the circuit row is missing", gap=gap)
    ci, excess_ci = whole.get("share_ci"), whole.get("excess_ci")
    shares = [x for x in whole.get("random_shares") or [] if x is not None]
    rnd = sum(shares) / len(shares) if shares else None
    rank, p = whole.get("rank"), rank_p(whole.get("rank"), len(shares))
    few = (f" (too few draws for the rank test: {len(shares)} < {min_draws(rules)})"
           if shares and len(shares) < min_draws(rules) else "")
    ev = (f"{_gap_text(d)}; the circuit ({_size(whole)}) carries {whole['share']:.2f} {_ci(ci)} "
          f"of it; random circuits of its shape: "
          + ("not measured" if rnd is None else
             f"{rnd:.2f} on average over {len(shares)}, excess {_ci(excess_ci)}, the circuit "
             f"ranks {rank} of {len(shares) + 1} (p = {p:.3f}){few}"))
    return _verdict(gain_rule(ci, excess_ci, rank, len(shares), rules), rule, ev, gap=gap,
                    gap_ci=gap_ci, share=whole["share"], share_ci=ci, excess_ci=excess_ci,
                    random_share=rnd, rank=rank, draws=len(shares), rank_p=p)


def null_text(claim: str, verdict: dict) -> str:
    """The null a verdict was tested against, in one line, with the numbers it quotes (empty
    when the verdict has none, e.g. undecided for missing evidence)."""
    n = verdict.get("numbers") or {}
    f = lambda x, spec=".2f": "-" if x is None else format(x, spec)  # noqa: E731
    if claim == "uses_base_circuit" and n.get("null_p") is not None:
        return (f"null: random circuits of the own circuit's shape share {f(n.get('null_mean'), '.1f')} "
                f"units with the base circuit on average, it shares {n.get('shared')} "
                f"(p = {f(n['null_p'], '.2g')}); ceiling: two discoveries of the base, Jaccard "
                f"{f(n.get('ceiling'))} vs {f(n.get('jaccard'))}")
    if claim == "gain_carried" and n.get("share") is not None:
        if n.get("random_share") is None:
            return "null: random circuits of its shape were not measured"
        return (f"null: random circuits of its shape carry {f(n['random_share'])} on average "
                f"(the circuit {f(n['share'])}); excess {_ci(n.get('excess_ci'))}; rank "
                f"{n.get('rank') or '-'} of {(n.get('draws') or 0) + 1} (p = "
                f"{f(n.get('rank_p'), '.3f')})")
    if claim == "same_functions" and n.get("checks"):
        return ("null: each selection counted only because it beat no patching and random "
                "heads of its size on the base")
    return ""


def _size(row: dict) -> str:
    """A CMAP row's size as the circuit counts it: (head, role) units, and the distinct heads
    among them when fewer (a row saved before units were counted: its heads)."""
    heads, units = row["n_heads"], row.get("n_units")
    if units is None:
        return f"{heads} heads"
    return f"{units} (head, role) units" + (f", {heads} distinct heads" if heads != units else "")


def verdicts(results: dict, base: str, fine_tunes: Sequence[str], rules: VerdictRules,
             circuit_name: str) -> dict[str, dict]:
    """``{fine_tune: {claim: {answer, rule, evidence, numbers, calibration}}}`` from the study's
    step results; each verdict carries the false-positive rate of its rule on random circuits
    (:func:`calibration`) and ``flagged`` when that null said yes."""
    out = {}
    for spec in fine_tunes:
        cal = calibration(results, spec, rules, circuit_name)
        v = {"uses_base_circuit": uses_base_circuit(results, spec, rules, circuit_name),
             "same_functions": same_functions(results, base, spec, rules),
             "gain_carried": gain_carried(results, spec, rules)}
        for claim, verdict in v.items():
            verdict["calibration"] = cal.get(claim)
            verdict["flagged"] = bool(cal.get(claim) and cal[claim]["yes"] > 0)
        out[spec] = v
    return out


def calibration(results: dict, spec: str, rules: VerdictRules, circuit_name: str
                ) -> dict[str, dict | None]:
    """The verdict rules run on random circuits of the base circuit's shape, per claim:
    ``{"draws": n, "yes": k, "rate": k / n, "text": "random circuits: k of n get yes"}`` (None
    where the step did not record its random draws).

    * gain carried: each CMAP random draw in turn plays the circuit, the other draws its null
      (``random_checks`` of the circuit row: share and excess intervals, leave-one-out);
    * uses the base circuit: each random circuit of the base's shape plays the base circuit: its
      faithfulness interval on the fine-tune (faithfulness rows' ``random_faithfulness_ci``) and
      its overlap with the fine-tune's own circuit (``own_circuits[spec]["random_overlaps"]``);
    * same functions: each DCM row's random head sets in turn play the selection
      (``random_found`` of the DCM rows: how many of them the selection rule would accept).
    """
    def summary(answers: list[str]) -> dict | None:
        if not answers:
            return None
        k = sum(a == YES for a in answers)
        return {"draws": len(answers), "yes": k, "rate": k / len(answers),
                "text": f"random circuits: {k} of {len(answers)} get yes"}

    out: dict[str, dict | None] = {}
    res = (results.get("cmap") or {}).get(spec) or {}
    whole = None
    if res.get("directions"):
        whole = next((r for r in res["directions"][0]["rows"] if r["kind"] == "circuit"), None)
    checks = (whole or {}).get("random_checks", [])
    out["gain_carried"] = summary([gain_rule(c.get("share_ci"), c.get("excess_ci"), c.get("rank"),
                                             len(checks) - 1, rules) for c in checks])
    row = next((r for r in results.get("faithfulness", [])
                if r["model"] == spec and r["circuit"] == circuit_name), None)
    own = (results.get("own_circuits") or {}).get(spec) or {}
    ceiling = (results.get("stability") or {}).get("jaccard")
    rand_ci = (row or {}).get("random_faithfulness_ci") or []
    rand_ov = own.get("random_overlaps") or []
    out["uses_base_circuit"] = summary([uses_rule(ci, own.get("faithfulness_ci"), ov, ceiling, rules)
                                        for ci, ov in zip(rand_ci, rand_ov)])
    dcm_rows = (results.get("dcm") or {}).get("rows", [])
    draws = [(r.get("random_found"), r.get("random_draws")) for r in dcm_rows
             if r.get("random_draws")]
    if draws:
        n = sum(d for _, d in draws)
        k = sum(f or 0 for f, _ in draws)
        out["same_functions"] = {"draws": n, "yes": k, "rate": k / n,
                                 "text": f"random head sets: {k} of {n} found a function"}
    else:
        out["same_functions"] = None
    return out
