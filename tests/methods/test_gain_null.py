"""The "gain carried" verdict against its null, on the real CMAP path: random circuits of the
study circuit's shape, patched from organism:lora into its base, must never get "yes".

Under the old rule (share interval ≥ 0.5 alone) random circuits of this shape get yes (measured:
2 of 7), and so they do under the null-based rule (the same 2): the test is red, marked a strict
xfail with the numbers, until the rule gets a null that holds at this size."""

from __future__ import annotations

import pytest

from circuitdiff.core.circuit import Circuit, CircuitGroup
from circuitdiff.methods import cmap
from circuitdiff.methods.faithfulness import random_circuits
from circuitdiff.methods.verdicts import YES, VerdictRules, gain_carried

pytestmark = pytest.mark.slow  # ten CMAP runs on the organisms (~1 min)

#: the shape of the default study's base circuit on organism:base (units per position)
SHAPE = Circuit({"value_reader": CircuitGroup([(1, h) for h in range(8)] + [(2, 0), (2, 1)],
                                              "last"),
                 "query_label_mover": CircuitGroup([(0, 2)], "last"),
                 "label_heads": CircuitGroup([(0, 0)], "labels"),
                 "object_mover_labels": CircuitGroup([(0, h) for h in (1, 3, 4, 5)], "labels"),
                 "label_mover": CircuitGroup([(0, 6)], "separators"),
                 "object_mover_separators": CircuitGroup([(0, h) for h in (7, 1, 3, 4)],
                                                         "separators")},
                4, 8, "organism:base")
N_CIRCUITS = 10


def gain_answers(rules: VerdictRules) -> list[tuple[str, dict]]:
    out = []
    for i, c in enumerate(random_circuits(SHAPE, N_CIRCUITS, seed=4242)):
        res = cmap.run(["organism:base", "organism:lora"], None,
                       cmap.CMAPConfig(n_prompts=80, random_draws=5, bootstrap=500, seed=i,
                                       circuit=c))
        v = gain_carried({"cmap": {"organism:lora": res.to_dict()}}, "organism:lora", rules)
        out.append((v["answer"], v["numbers"]))
    return out


@pytest.mark.xfail(strict=True, reason=(
    "measured: 2 of the first 7 random circuits of this shape get yes under the null-based rule "
    "too (shares 0.72 and 0.89, excess intervals [0.27, 0.97] and [0.40, 0.78]): 18 units over "
    "a 4 x 8 grid often include the few layer-1 heads at last that carry the gain, so 'beats "
    "the mean of 5 random draws' is no null at this size; the rule needs a stricter null"))
def test_random_circuits_never_carry_the_gain():
    answers = gain_answers(VerdictRules())
    assert len(answers) == N_CIRCUITS
    # the gain is real on every draw's prompts, so the verdict decided on the rule, not on "no gap"
    assert all(n.get("share") is not None for _, n in answers), answers
    yes = [n for a, n in answers if a == YES]
    assert not yes, f"{len(yes)} of {N_CIRCUITS} random circuits got yes: {yes}"
