"""``circuitdiff discover``: find the four head groups by path patching and save the circuit."""

from __future__ import annotations

from . import add_model_options, add_task_options, load_from_args


def register(sub) -> None:
    p = sub.add_parser("discover", help="circuit discovery by path patching (VF → PT → PD → SR)")
    add_model_options(p)
    add_task_options(p, n=100)
    p.add_argument("--out", required=True, help="run folder (resumes from saved steps)")
    p.add_argument("--sizes", default="20,5,10,5",
                   help="heads kept per group, VF,PT,PD,SR (default 20,5,10,5 as in the paper)")
    p.add_argument("--method", default="exact", choices=["exact", "attribution", "hybrid"],
                   help="exact path patching (default), gradient attribution, or attribution "
                        "then exact scores for the top candidates")
    p.add_argument("--hybrid-k", type=int, default=None,
                   help="candidates scored exactly by --method hybrid (default 3 x group size)")
    p.add_argument("--compare-exact", action="store_true",
                   help="compute both exact and attribution scores and print the attribution's "
                        "Spearman rank correlation and top-k recall per group")
    p.add_argument("--naive", action="store_true",
                   help="use the slow reference implementation (for checking; same scores)")
    p.add_argument("--no-heatmaps", action="store_true", help="skip the heatmap PNGs")
    p.add_argument("--truncate", action="store_true",
                   help="if a group lies wholly in layer 0, leave the later groups empty "
                        "instead of stopping with an error")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..core.circuit import format_head
    from ..methods.discovery import DiscoveryConfig, discover
    from ..report.figures import discovery_heatmaps

    cfg = DiscoveryConfig(n_prompts=args.n_prompts, sizes=args.sizes, method=args.method,
                          n_boxes=args.n_boxes, seed=args.seed, batch_size=args.batch_size,
                          hybrid_k=args.hybrid_k, compare_exact=args.compare_exact,
                          impl="naive" if args.naive else "fast", truncate=args.truncate)
    loaded = load_from_args(args)  # bad sizes/method failed above, before loading a model
    res = discover(loaded, args.out, cfg, progress=True)
    if not args.no_heatmaps:
        discovery_heatmaps(res, args.out, loaded.name)
    c = res.circuit
    print(f"{loaded.name} ({loaded.arch.describe()}), n={c.settings['n_prompts']}, "
          f"method {args.method}")
    for name, g in c.groups.items():
        s = res.scores[name]
        heads = ", ".join(f"{format_head(h)} ({float(s[h]):+.3f})" for h in g.heads)
        print(f"  {name} @ {g.position}: {heads}")
        if name in res.comparisons:
            print(f"    attribution vs exact: {res.comparisons[name]}")
    print(f"saved {args.out}: circuit.json, per-group scores (safetensors) and heatmaps")
    return 0
