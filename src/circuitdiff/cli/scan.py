"""``circuitdiff scan``: position scan: where the computation happens, before any head is named.

For every layer L and role R (last, query_label, labels, objects, separators, ...), the accuracy
with every head of layer L mean-ablated at the tokens of R. Saves scan.json and scan.png in
--out.
"""

from __future__ import annotations

from . import add_command
from . import add_max_rows_option, add_model_options, add_task_options, load_from_args
from . import add_scan_method_options, positive_int, prompt_count


def register(sub) -> None:
    p = add_command(sub, "scan", __doc__)
    add_model_options(p)
    add_task_options(p, n=200)
    p.add_argument("--out", required=True, help="run folder (resumes from saved results)")
    p.add_argument("--n-mean", type=prompt_count, default=200, help="mean-ablation prompts (seed + 1)")
    p.add_argument("--role", action="append", default=None, metavar="ROLE",
                   help="role to scan (repeatable; default: every token-covering role plus "
                        "prev_query_label and correct_object); offsets allowed, e.g. "
                        "prev_query_label+1")
    add_scan_method_options(p, "--method", "--n-exact")
    add_max_rows_option(p, default=512)
    p.set_defaults(func=run)


def run(args) -> dict:
    from pathlib import Path

    from ..methods import scan
    from ..report.scan import scan_heatmap

    cfg = scan.ScanConfig(n_prompts=args.n_prompts, seed=args.seed, n_mean=args.n_mean,
                          n_boxes=args.n_boxes, roles=tuple(args.role) if args.role else None,
                          batch_size=args.batch_size, max_rows=args.max_rows,
                          method=args.method, n_exact=args.n_exact)
    loaded = load_from_args(args)
    res = scan.run(loaded, None, cfg, store=args.out, progress=True)
    png = scan_heatmap(res, Path(args.out) / "scan.png")
    width = max(len(r) for r in res.roles)
    print(f"{loaded.name}: accuracy {res.baseline:.2f} unablated, n={res.n}; accuracy with all "
          f"heads of layer L ablated at role R ({res.rule}; '  -  ' = not measured):")
    print(" " * width + " | " + " ".join(f"L{l:<4d}" for l in range(res.n_layers)))
    for j, role in enumerate(res.roles):
        print(role.ljust(width) + " | " + " ".join(
            "  -   " if res.accuracy[l][j] != res.accuracy[l][j] else f"{res.accuracy[l][j]:.2f} "
            for l in range(res.n_layers)))
    if res.cumulative is not None:
        print("every layer at once: " + ", ".join(f"{r} {a:.2f}"
                                                  for r, a in zip(res.roles, res.cumulative)))
    print(f"saved {Path(args.out) / 'scan.json'} and {png}")
    return {"out": args.out, "baseline": res.baseline, "n": res.n, "roles": list(res.roles),
            "accuracy": res.accuracy}
