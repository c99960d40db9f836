"""Bootstrap intervals and the three verdicts: yes only when the interval clears the rule."""

from __future__ import annotations

import pytest

from circuitdiff.core.circuit import Circuit, CircuitGroup
from circuitdiff.core.stats import difference_interval, mean_interval, ratio_interval
from circuitdiff.methods.verdicts import (NO, UNDECIDED, YES, VerdictRules, against,
                                          gain_carried, same_functions, unit_overlap,
                                          uses_base_circuit, verdicts)

RULES = VerdictRules(bootstrap=300)


def test_intervals_cover_the_estimate_and_collapse_when_there_is_no_spread():
    full = [1] * 80 + [0] * 20
    circ = [1] * 60 + [0] * 40
    lo, hi = ratio_interval(circ, full, 500)
    assert lo < 0.6 / 0.8 < hi and hi - lo < 0.4
    assert ratio_interval(full, full, 200) == [1.0, 1.0]          # paired: identical sides
    assert difference_interval(circ, circ, 200) == [0.0, 0.0]
    assert ratio_interval([], [], 100) is None and ratio_interval([1], [1], 0) is None
    lo, hi = mean_interval(circ, 500)
    assert lo < 0.6 < hi


def test_against_is_three_valued():
    assert against([0.85, 0.95], 0.8) == YES
    assert against([0.5, 0.7], 0.8) == NO
    assert against([0.7, 0.9], 0.8) == UNDECIDED
    assert against(None, 0.8) == UNDECIDED


def _circuit(units):
    groups = {}
    for i, (pos, heads) in enumerate(units.items()):
        groups[f"g{i}"] = CircuitGroup(heads, pos)
    return Circuit(groups, 4, 8, "m")


def test_unit_overlap_counts_head_role_units():
    a = _circuit({"last": [(1, 0), (1, 1)], "labels": [(0, 3)]})
    b = _circuit({"last": [(1, 0)], "labels": [(0, 3), (0, 4)], "separators": [(0, 3)]})
    o = unit_overlap(a, b, grid=(4, 8))
    assert (o["shared"], o["n_reference"], o["n_other"]) == (2, 3, 4)
    assert o["recall"] == pytest.approx(2 / 3) and o["jaccard"] == pytest.approx(2 / 5)
    assert o["coefficient"] == pytest.approx(2 / 3)
    # the exact null: at "last" 1 of 2 base heads drawn among 32, at "labels" 2 of 1
    assert o["null_mean"] == pytest.approx(1 * 2 / 32 + 2 * 1 / 32)
    assert 0 < o["null_p"] < 0.01


def test_overlap_null_matches_simulated_random_circuits():
    import random

    base = _circuit({"last": [(1, h) for h in range(5)], "labels": [(0, 1), (0, 2)]})
    own = _circuit({"last": [(1, 0), (1, 1), (2, 3)], "labels": [(0, 1), (3, 3), (2, 2)]})
    o = unit_overlap(base, own, grid=(4, 8))
    grid = [(l, h) for l in range(4) for h in range(8)]
    rng, hits = random.Random(0), 0
    for _ in range(4000):
        r = _circuit({"last": rng.sample(grid, 3), "labels": rng.sample(grid, 3)})
        hits += unit_overlap(base, r)["shared"] >= o["shared"]
    assert abs(hits / 4000 - o["null_p"]) < 0.02


def _faith(model, hits_full, hits_circ):
    return {"model": model, "circuit": "auto_circuit", "n": len(hits_full),
            "faithfulness": sum(hits_circ) / sum(hits_full),
            "faithfulness_ci": ratio_interval(hits_circ, hits_full, 300)}


def _own(base, own, ci=(0.85, 0.99)):
    return {"ft": {"overlap": unit_overlap(base, own, grid=(4, 8)), "faithfulness": 0.92,
                   "faithfulness_ci": list(ci)}}


BASE = _circuit({"last": [(1, h) for h in range(6)], "labels": [(0, 1), (0, 2), (0, 5)]})
STABLE = {"jaccard": 0.8}


def test_uses_base_circuit_needs_faithfulness_overlap_beyond_chance_and_stability():
    good = _faith("ft", [1] * 100, [1] * 97 + [0] * 3)
    bad = _faith("ft", [1] * 100, [1] * 40 + [0] * 60)
    similar = _circuit({"last": [(1, h) for h in range(5)] + [(2, 0)], "labels": [(0, 1), (0, 2)]})
    far = _circuit({"last": [(3, h) for h in range(6)], "labels": [(2, 1), (2, 2), (0, 1)]})

    def ask(faith, own, stability=STABLE):
        return uses_base_circuit({"faithfulness": [faith], "own_circuits": own,
                                  "stability": stability}, "ft", RULES, "auto_circuit")

    assert ask(good, _own(BASE, similar))["answer"] == YES
    assert ask(bad, _own(BASE, similar))["answer"] == NO
    assert ask(good, _own(BASE, far))["answer"] == NO
    # without discovery's own stability (the ceiling) the overlap cannot be judged
    assert ask(good, _own(BASE, similar), stability=None)["answer"] == UNDECIDED
    # an own circuit that is not itself faithful (interval) says nothing by its overlap
    assert ask(good, _own(BASE, similar, ci=(0.2, 0.6)))["answer"] == UNDECIDED
    # faithful but its own circuit was not computed: not enough for a yes
    v = uses_base_circuit({"faithfulness": [good]}, "ft", RULES, "auto_circuit")
    assert v["answer"] == UNDECIDED and "own circuits were not computed" in v["evidence"]


def test_containment_alone_is_not_the_same_circuit():
    """An own circuit holding every base unit plus many random ones has overlap coefficient 1.0
    (the old rule's yes), but random circuits of its size hold most base units too."""
    import random

    good = _faith("ft", [1] * 100, [1] * 97 + [0] * 3)
    rng = random.Random(1)
    grid = [(l, h) for l in range(4) for h in range(8)]
    extra_last = [u for u in rng.sample(grid, 28) if u not in BASE.groups["g0"].heads]
    extra_labels = [u for u in rng.sample(grid, 28) if u not in BASE.groups["g1"].heads]
    huge = _circuit({"last": BASE.groups["g0"].heads + extra_last,
                     "labels": BASE.groups["g1"].heads + extra_labels})
    own = _own(BASE, huge)
    assert own["ft"]["overlap"]["coefficient"] == 1.0
    v = uses_base_circuit({"faithfulness": [good], "own_circuits": own, "stability": STABLE},
                          "ft", RULES, "auto_circuit")
    assert v["answer"] != YES, v["evidence"]


def test_random_own_circuits_never_get_yes():
    """The null test of the overlap rule: 50 random own circuits of the base's shape."""
    import random

    good = _faith("ft", [1] * 100, [1] * 97 + [0] * 3)
    grid = [(l, h) for l in range(4) for h in range(8)]
    rng = random.Random(7)
    answers = []
    for _ in range(50):
        r = _circuit({"last": rng.sample(grid, 6), "labels": rng.sample(grid, 3)})
        answers.append(uses_base_circuit({"faithfulness": [good], "own_circuits": _own(BASE, r),
                                          "stability": STABLE}, "ft", RULES,
                                         "auto_circuit")["answer"])
    assert answers.count(YES) == 0


def _fun(model, hits):
    return {"model": model, "group": "g", "desideratum": "object_value", "accuracy":
            sum(hits) / len(hits), "random_mean": 0.1, "no_patch": 0.0, "hits": hits,
            "selected": ["1.0"], "n": len(hits)}


def _dcm(found=True):
    return {"rows": [{"group": "g", "desideratum": "object_value", "found": found}]}


def test_same_functions_compares_paired_target_accuracy_of_found_functions():
    base = _fun("base", [1] * 80 + [0] * 20)
    assert same_functions({"dcm": _dcm(), "functional": [base, _fun("ft", [1] * 85 + [0] * 15)]},
                          "base", "ft", RULES)["answer"] == YES
    assert same_functions({"dcm": _dcm(), "functional": [base, _fun("ft", [1] * 20 + [0] * 80)]},
                          "base", "ft", RULES)["answer"] == NO
    # the selection found no function on the base (no better than no patching / random heads)
    v = same_functions({"dcm": _dcm(False), "functional": [base, _fun("ft", [1] * 20 + [0] * 80)]},
                       "base", "ft", RULES)
    assert v["answer"] == UNDECIDED and "no function found" in v["evidence"]


def _cmap(gap_ci, share_ci, share=0.8, excess_ci=(0.3, 0.6), checks=(), draws=20, rank=1):
    return {"ft": {"directions": [{"gap": 0.3, "gap_ci": gap_ci, "target_accuracy": 0.5,
                                   "source_accuracy": 0.8, "n": 200, "rows": [
                                       {"kind": "circuit", "n_heads": 15, "n_units": 20,
                                        "share": share, "share_ci": share_ci,
                                        "excess_ci": list(excess_ci) if excess_ci else None,
                                        "random_shares": [0.3 + 0.01 * i for i in range(draws)],
                                        "rank": rank, "random_checks": list(checks)}]}]}}


def test_gain_carried_needs_the_share_and_its_excess_over_random_circuits():
    assert gain_carried({"cmap": _cmap([0.2, 0.4], [0.7, 0.9])}, "ft", RULES)["answer"] == YES
    assert gain_carried({"cmap": _cmap([0.2, 0.4], [0.1, 0.3], 0.2)}, "ft", RULES)["answer"] == NO
    assert gain_carried({"cmap": _cmap([0.2, 0.4], [0.3, 0.7])}, "ft", RULES)["answer"] == UNDECIDED
    # a high share that random circuits of its shape reach too is not carried by the circuit
    v = gain_carried({"cmap": _cmap([0.2, 0.4], [0.81, 1.02], 0.92, (-0.05, 0.2))}, "ft", RULES)
    assert (v["answer"] == UNDECIDED and "ranks 1 of 21 (p = 0.048)" in v["evidence"]
            and "20 (head, role) units" in v["evidence"])
    # share and excess clear their bars, but random draws rank above it: the permutation test
    # (p = rank / (draws + 1)) fails — the mean of a heavy-tailed null is not enough (issue 31)
    v = gain_carried({"cmap": _cmap([0.2, 0.4], [0.7, 0.9], rank=2)}, "ft", RULES)
    assert v["answer"] == UNDECIDED and v["numbers"]["rank_p"] == 2 / 21
    # too few draws for a rank to reach alpha: never yes, and the evidence says why
    v = gain_carried({"cmap": _cmap([0.2, 0.4], [0.7, 0.9], draws=5)}, "ft", RULES)
    assert v["answer"] == UNDECIDED and "too few draws for the rank test: 5 < 19" in v["evidence"]
    assert gain_carried({"cmap": _cmap([0.2, 0.4], [0.7, 0.9], draws=19)}, "ft",
                        RULES)["answer"] == YES
    v = gain_carried({"cmap": _cmap([0.2, 0.4], [0.81, 1.02], 0.92, (-0.3, -0.1))}, "ft", RULES)
    assert v["answer"] == NO
    assert gain_carried({"cmap": _cmap([0.2, 0.4], [0.7, 0.9], excess_ci=None)}, "ft",
                        RULES)["answer"] == UNDECIDED
    v = gain_carried({"cmap": _cmap([-0.05, 0.1], [0.7, 0.9])}, "ft", RULES)
    assert v["answer"] == UNDECIDED and "no gain to explain" in v["evidence"]
    assert gain_carried({}, "ft", RULES)["answer"] == UNDECIDED
    units = _cmap([0.2, 0.4], [0.7, 0.9])
    units["ft"]["directions"][0]["rows"][0].update(n_units=22, n_heads=20)  # issue 31: units vs heads
    assert "22 (head, role) units, 20 distinct heads" in gain_carried({"cmap": units}, "ft",
                                                                      RULES)["evidence"]


def test_calibration_counts_random_circuits_that_get_yes_and_flags_the_verdict():
    # 21 draws, each judged against the other 20 (leave-one-out): one passes every bar and
    # ranks first (p = 1/21), one passes share and excess but ranks second (p = 2/21: no)
    checks = ([{"share_ci": [0.6, 0.9], "excess_ci": [0.2, 0.4], "rank": 1},
               {"share_ci": [0.6, 0.9], "excess_ci": [0.2, 0.4], "rank": 2}]
              + [{"share_ci": [0.2, 0.4], "excess_ci": [-0.2, 0.1], "rank": 3 + i}
                 for i in range(19)])
    res = {"cmap": _cmap([0.2, 0.4], [0.7, 0.9], checks=checks)}
    v = verdicts(res, "base", ["ft"], RULES, "auto_circuit")["ft"]["gain_carried"]
    assert v["answer"] == YES
    assert v["calibration"]["draws"] == 21 and v["calibration"]["yes"] == 1
    assert v["flagged"] and "1 of 21" in v["calibration"]["text"]


def test_verdicts_cover_every_fine_tune_and_claim():
    v = verdicts({}, "base", ["a", "b"], RULES, "auto_circuit")
    assert set(v) == {"a", "b"}
    assert all(set(c) == {"uses_base_circuit", "same_functions", "gain_carried"} and
               all(x["answer"] == UNDECIDED and x["rule"] for x in c.values())
               for c in v.values())
