"""False-positive rate of the "gain carried" verdict on random circuits (issue 31).

Random circuits of the default study circuit's shape play "the circuit": each is patched from a
fine-tune into its base by the real CMAP path with its own random draws, and judged by the
verdict rule. The old rule (share interval ≥ 0.5 alone), the mean-only rule (share and excess
intervals) and the current rule (plus the permutation rank test) are printed side by side.

    python bench/gain_null.py --circuits 20 --draws 20 --n 80
"""

from __future__ import annotations

import argparse
import time

from circuitdiff.core.circuit import Circuit, CircuitGroup
from circuitdiff.methods import cmap
from circuitdiff.methods.faithfulness import random_circuits
from circuitdiff.methods.verdicts import YES, VerdictRules, against, gain_carried

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


def judge(fine_tune: str, circuits: int, draws: int, n: int, seed: int = 4242,
          progress: bool = False) -> list[dict]:
    """One row per random circuit: its share, the three rules' answers, and its rank."""
    rules = VerdictRules()
    rows = []
    for i, c in enumerate(random_circuits(SHAPE, circuits, seed=seed)):
        res = cmap.run(["organism:base", fine_tune], None,
                       cmap.CMAPConfig(n_prompts=n, random_draws=draws, group_random_draws=0,
                                       bootstrap=500, seed=i,
                                       random_seed=10_000 + i, circuit=c))
        v = gain_carried({"cmap": {fine_tune: res.to_dict()}}, fine_tune, rules)
        nums = v["numbers"]
        old = against(nums.get("share_ci"), rules.carried)
        mean_only = (YES if old == YES and against(nums.get("excess_ci"), rules.excess) == YES
                     else "not yes")
        rows.append({"circuit": i, "share": nums.get("share"), "share_ci": nums.get("share_ci"),
                     "excess_ci": nums.get("excess_ci"), "rank": nums.get("rank"),
                     "draws": nums.get("draws"), "old": old, "mean_only": mean_only,
                     "rule": v["answer"]})
        if progress:
            r = rows[-1]
            print(f"circuit {i:2d}: share {r['share']:.2f} rank {r['rank']}/{draws + 1} | old "
                  f"{r['old']:9s} mean-only {r['mean_only']:8s} rule {r['rule']}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fine-tune", default="organism:lora")
    ap.add_argument("--circuits", type=int, default=20)
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--n", type=int, default=80)
    ap.add_argument("--seed", type=int, default=4242)
    a = ap.parse_args()
    t0 = time.perf_counter()
    rows = judge(a.fine_tune, a.circuits, a.draws, a.n, a.seed, progress=True)
    for name in ("old", "mean_only", "rule"):
        k = sum(r[name] == YES for r in rows)
        print(f"{name:9s}: {k} of {len(rows)} random circuits get yes ({k / len(rows):.0%})")
    print(f"{a.fine_tune}, {a.circuits} random circuits of the study circuit's shape, {a.draws} "
          f"draws each, n={a.n}, seeds {a.seed}/10000+i: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
