"""``circuitdiff organisms``: list the shipped model organisms or retrain them from scratch."""

from __future__ import annotations

import json

from . import add_out_option, positive_int


def register(sub) -> None:
    p = sub.add_parser("organisms", help="list the shipped model organisms, or retrain them")
    osub = p.add_subparsers(dest="organisms_command", required=True)
    ls = osub.add_parser("list", help="where the organisms live and their recorded accuracies")
    ls.set_defaults(func=run_list)
    tr = osub.add_parser("train", help="retrain base, lora, full and chat from scratch (CPU)")
    add_out_option(tr, "organisms", "output folder (gets base/ lora/ full/ chat/)")
    tr.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    tr.add_argument("--scale", type=float, default=1.0,
                    help="multiply every stage's steps (e.g. 0.01 for a smoke run)")
    tr.add_argument("--threads", type=positive_int, default=2,
                    help="torch threads after the bind race (which runs two processes of one thread each, "
                         "so its result does not depend on this); the shipped organisms used 2")
    tr.add_argument("--base-from", default=None, help="reuse a trained base folder")
    tr.add_argument("--quiet", action="store_true", help="no progress bars")
    tr.set_defaults(func=run_train)


def run_list(args) -> dict:
    from ..core.specs import ORGANISMS, ORGANISMS_DIR, organism_path

    summary = ORGANISMS_DIR / "train_summary.json"
    acc = json.loads(summary.read_text()).get("accuracy", {}) if summary.exists() else {}
    for name in ORGANISMS:
        a = acc.get(name)
        print(f"organism:{name:5s} {organism_path(name)}"
              + (f"  (recorded 7-box accuracy {a:.3f})" if a is not None else ""))
    return {f"organism:{n}": {"path": str(organism_path(n)), "accuracy": acc.get(n)}
            for n in ORGANISMS}


def run_train(args) -> dict | int:
    """Run the recipe; a missed target is one line on stderr and exit code 1 (not a success)."""
    import sys

    from ..organisms.recipe import RecipeFailed, train_all

    if args.scale <= 0:
        raise ValueError(f"--scale must be > 0, got {args.scale}")
    try:
        # a scaled-down smoke run cannot meet the targets; only the full recipe is judged
        accs = train_all(args.out, seed=args.seed, progress=not args.quiet, scale=args.scale,
                         base_from=args.base_from, threads=args.threads,
                         check_targets=args.scale >= 1.0)
    except RecipeFailed as e:
        print(f"circuitdiff organisms train: {e} (summary: {args.out}/train_summary.json)",
              file=sys.__stderr__)
        return 1
    for name, a in accs.items():
        print(f"{name:5s} 7-box accuracy {a:.3f}")
    return {"out": args.out, "accuracy": accs}
