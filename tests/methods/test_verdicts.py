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
    o = unit_overlap(a, b)
    assert (o["shared"], o["n_reference"], o["n_other"]) == (2, 3, 4)
    assert o["recall"] == pytest.approx(2 / 3) and o["jaccard"] == pytest.approx(2 / 5)
    assert o["coefficient"] == pytest.approx(2 / 3)


def _faith(model, hits_full, hits_circ):
    return {"model": model, "circuit": "auto_circuit", "n": len(hits_full),
            "faithfulness": sum(hits_circ) / sum(hits_full),
            "faithfulness_ci": ratio_interval(hits_circ, hits_full, 300)}


def test_uses_base_circuit_needs_faithfulness_and_overlap():
    good = _faith("ft", [1] * 100, [1] * 97 + [0] * 3)
    bad = _faith("ft", [1] * 100, [1] * 40 + [0] * 60)
    own = {"ft": {"overlap": {"shared": 5, "n_reference": 10, "n_other": 6, "recall": 0.5,
                              "precision": 0.83, "jaccard": 0.45, "coefficient": 0.83},
                  "sizing": {"faithfulness_paper": 0.92}}}
    far = {"ft": {"overlap": {"shared": 1, "n_reference": 10, "n_other": 9, "recall": 0.1,
                              "precision": 0.1, "jaccard": 0.05, "coefficient": 0.11}}}
    broken = {"ft": {**own["ft"], "sizing": {"faithfulness_paper": 0.05}}}
    assert uses_base_circuit({"faithfulness": [good], "own_circuits": own}, "ft", RULES,
                             "auto_circuit")["answer"] == YES
    assert uses_base_circuit({"faithfulness": [bad], "own_circuits": own}, "ft", RULES,
                             "auto_circuit")["answer"] == NO
    assert uses_base_circuit({"faithfulness": [good], "own_circuits": far}, "ft", RULES,
                             "auto_circuit")["answer"] == NO
    # a smaller own circuit inside the base's is the same circuit (the fine-tune needs fewer
    # units): the overlap counts against the smaller circuit, not the base's
    inside = {"ft": {"overlap": {"shared": 3, "n_reference": 10, "n_other": 3, "recall": 0.3,
                                 "precision": 1.0, "jaccard": 0.3, "coefficient": 1.0},
                     "sizing": {"faithfulness_paper": 0.95}}}
    assert uses_base_circuit({"faithfulness": [good], "own_circuits": inside}, "ft", RULES,
                             "auto_circuit")["answer"] == YES
    # an own circuit that is not itself faithful says nothing by its overlap
    v = uses_base_circuit({"faithfulness": [good], "own_circuits": broken}, "ft", RULES,
                          "auto_circuit")
    assert v["answer"] == UNDECIDED and "says nothing" in v["evidence"]
    # faithful but its own circuit was not computed: not enough for a yes
    v = uses_base_circuit({"faithfulness": [good]}, "ft", RULES, "auto_circuit")
    assert v["answer"] == UNDECIDED and "own circuits were not computed" in v["evidence"]


def _fun(model, hits, random_mean=0.1):
    return {"model": model, "group": "g", "desideratum": "object_value", "accuracy":
            sum(hits) / len(hits), "random_mean": random_mean, "no_patch": 0.0, "hits": hits,
            "selected": ["1.0"], "n": len(hits)}


def test_same_functions_compares_paired_target_accuracy():
    base = _fun("base", [1] * 80 + [0] * 20)
    assert same_functions({"functional": [base, _fun("ft", [1] * 85 + [0] * 15)]}, "base", "ft",
                          RULES)["answer"] == YES
    assert same_functions({"functional": [base, _fun("ft", [1] * 20 + [0] * 80)]}, "base", "ft",
                          RULES)["answer"] == NO
    # nothing on the base beats random heads: nothing to compare
    weak = _fun("base", [1] * 20 + [0] * 80, random_mean=0.15)
    v = same_functions({"functional": [weak, _fun("ft", [1] * 20 + [0] * 80)]}, "base", "ft",
                       RULES)
    assert v["answer"] == UNDECIDED and "nothing to compare" in v["evidence"]


def _cmap(gap_ci, share_ci, share=0.8):
    return {"ft": {"directions": [{"gap": 0.3, "gap_ci": gap_ci, "target_accuracy": 0.5,
                                   "source_accuracy": 0.8, "n": 200, "rows": [
                                       {"kind": "circuit", "n_heads": 20, "share": share,
                                        "share_ci": share_ci, "random_share": 0.01}]}]}}


def test_gain_carried_is_undecided_without_a_gain():
    assert gain_carried({"cmap": _cmap([0.2, 0.4], [0.7, 0.9])}, "ft", RULES)["answer"] == YES
    assert gain_carried({"cmap": _cmap([0.2, 0.4], [0.1, 0.3], 0.2)}, "ft", RULES)["answer"] == NO
    assert gain_carried({"cmap": _cmap([0.2, 0.4], [0.3, 0.7])}, "ft", RULES)["answer"] == UNDECIDED
    v = gain_carried({"cmap": _cmap([-0.05, 0.1], [0.7, 0.9])}, "ft", RULES)
    assert v["answer"] == UNDECIDED and "no gain to explain" in v["evidence"]
    assert gain_carried({}, "ft", RULES)["answer"] == UNDECIDED
    units = _cmap([0.2, 0.4], [0.7, 0.9])
    units["ft"]["directions"][0]["rows"][0]["n_units"] = 22  # issue 31: 22 units, 20 heads
    assert "22 (head, role) units, 20 distinct heads" in gain_carried({"cmap": units}, "ft",
                                                                      RULES)["evidence"]


def test_verdicts_cover_every_fine_tune_and_claim():
    v = verdicts({}, "base", ["a", "b"], RULES, "auto_circuit")
    assert set(v) == {"a", "b"}
    assert all(set(c) == {"uses_base_circuit", "same_functions", "gain_carried"} and
               all(x["answer"] == UNDECIDED and x["rule"] for x in c.values())
               for c in v.values())
