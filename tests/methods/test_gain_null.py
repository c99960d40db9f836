"""The "gain carried" verdict against its null, on the real CMAP path: random circuits of the
study circuit's shape, patched from organism:lora into its base, must never get "yes".

Random circuits of this shape (18 units on a 4 × 8 grid) often hold the few layer-1 heads at
``last`` that carry the gain, so their shares are heavy-tailed: under the old rule (share
interval ≥ 0.5 alone) some of them get yes, and so they did under "share and excess over the
mean random share" (measured: 2 of the first 7). The rule now also ranks the circuit among its
random draws (permutation p = rank / (draws + 1) ≤ 0.05), which bounds the false-positive rate
at 5 % whatever the shares' distribution; ``bench/gain_null.py`` measures it on 20 circuits."""

from __future__ import annotations

import pytest

from circuitdiff.methods.verdicts import YES

pytestmark = pytest.mark.slow  # ten CMAP runs with 20 random draws each on the organisms

N_CIRCUITS = 10


def test_random_circuits_never_carry_the_gain():
    from bench.gain_null import judge

    rows = judge("organism:lora", N_CIRCUITS, draws=20, n=80)
    assert len(rows) == N_CIRCUITS
    # the gain is real on every draw's prompts, so the verdict decided on the rule, not on "no gap"
    assert all(r["share"] is not None and r["draws"] == 20 for r in rows), rows
    yes = [r for r in rows if r["rule"] == YES]
    assert not yes, f"{len(yes)} of {N_CIRCUITS} random circuits got yes: {yes}"
    # the old rule (share interval alone) is fooled by the same circuits: the test can go red
    assert any(r["old"] == YES for r in rows), rows
