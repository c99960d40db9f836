"""Hybrid discovery (attribution pre-filter, exact path patching on the top ``k`` candidates)
against exact discovery on the shipped model organisms: the same circuit?, recall of the exact
top heads per step, and the speed-up. Same process, same prompts, one thread.

For each organism the paper chain (``--sizes``, truncated where a group lies in layer 0) runs
with ``method="exact"`` and with ``method="hybrid"`` at each ``hybrid_k`` of ``--ks`` (default
1x, 2x and 3x the group size, where 3x is discovery's default), in fresh run folders:

    OMP_NUM_THREADS=1 python bench/hybrid_discovery.py [-n 100] [--seed 0] [--sizes 4,2,2,2]

Recall = |hybrid group ∩ exact group| / |exact group| per step (the exact chain's groups; a
hybrid chain that picked other heads also has other receivers downstream, so the whole circuit
is compared as well). Times are CPU seconds of this process (robust to other load).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--organisms", default="base,lora")
    ap.add_argument("-n", type=int, default=100, help="prompts (default 100)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sizes", default="4,2,2,2")
    ap.add_argument("--ks", default="1,2,3", help="hybrid_k as multiples of the group size")
    ap.add_argument("--repeat", type=int, default=2, help="timing repeats (best of)")
    ap.add_argument("--auto", action="store_true",
                    help="also the automatic chain (faithfulness-sized), exact vs hybrid at "
                         "discovery's default hybrid_k (3 x size)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from circuitdiff.core.model import load_model
    from circuitdiff.methods import discovery
    from circuitdiff.methods.discovery import DiscoveryConfig

    sizes = tuple(int(x) for x in args.sizes.split(","))
    print(f"paper chain, sizes {sizes}, {args.n} prompts (seed {args.seed}), 1 thread, "
          f"CPU seconds (best of {args.repeat})")
    print("| organism | method | hybrid_k | time s | speed-up | same circuit | recall per step "
          "(vf, pt, pd, sr) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.organisms.split(","):
        loaded = load_model(f"organism:{name}")

        def run(method: str, k: int | None, chain: str = "paper"):
            best, res = float("inf"), None
            for _ in range(args.repeat):
                with tempfile.TemporaryDirectory() as out:
                    cfg = DiscoveryConfig(n_prompts=args.n, seed=args.seed, method=method,
                                          hybrid_k=k, **(dict(sizes=sizes, chain="paper",
                                                              truncate=True)
                                                         if chain == "paper" else
                                                         dict(on_unreachable="keep-all")))
                    t = time.process_time()
                    res = discovery.run(loaded, None, cfg, store=out)
                    best = min(best, time.process_time() - t)
            return best, res
        t_exact, exact = run("exact", None)
        print(f"| {name} | exact | - | {t_exact:.2f} | 1.00x | - | - |", flush=True)
        for mult in (int(x) for x in args.ks.split(",")):
            # hybrid_k applies to every group: use the multiple of each group's size via the
            # largest size (k >= size is enforced per step by discovery)
            k = mult * max(sizes)
            t_h, hyb = run("hybrid", k)
            recalls = []
            for g, grp in exact.circuit.groups.items():
                want = set(grp.heads)
                got = set(hyb.circuit.groups[g].heads)
                recalls.append(f"{len(want & got) / len(want):.2f}" if want else "-")
            same = all(set(exact.circuit.groups[g].heads) == set(hyb.circuit.groups[g].heads)
                       for g in exact.circuit.groups)
            print(f"| {name} | hybrid | {k} ({mult}x) | {t_h:.2f} | {t_exact / t_h:.2f}x | "
                  f"{'yes' if same else 'no'} | {', '.join(recalls)} |", flush=True)
        if args.auto:
            def units(res):
                return {(grp.position, h) for grp in res.circuit.groups.values()
                        for h in grp.heads}
            t_exact, exact = run("exact", None, "auto")
            t_h, hyb = run("hybrid", None, "auto")
            want, got = units(exact), units(hyb)
            print(f"| {name} | auto chain: exact {t_exact:.2f} s, hybrid {t_h:.2f} s | "
                  f"{t_exact / t_h:.2f}x | same circuit: {'yes' if want == got else 'no'} | "
                  f"recall of exact (role, head) units {len(want & got)}/{len(want)} |",
                  flush=True)


if __name__ == "__main__":
    main()
