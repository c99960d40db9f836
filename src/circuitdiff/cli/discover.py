"""``circuitdiff discover``: find the circuit by path patching and save it with its figures.

Default (``--chain auto``): trace the model's own circuit back from the logits — positions as well
as heads — and size it to ``--target`` faithfulness on held-out prompts. ``--chain paper`` runs the
paper's fixed four-group chain (VF → PT → PD → SR) with fixed ``--sizes``.
"""

from __future__ import annotations

from . import add_discovery_options, add_model_options, add_task_options, float_in, load_from_args
from . import METHOD_CHOICES, add_scan_method_options, positive_int, prompt_count


def register(sub) -> None:
    p = sub.add_parser("discover", help="circuit discovery by path patching: the model's own "
                                        "circuit (default) or the paper's four-group chain")
    add_model_options(p)
    add_task_options(p, n=100)
    p.add_argument("--out", required=True, help="run folder (resumes from saved steps)")
    add_discovery_options(
        p, chain="auto (default): trace q/k/v back from the logits at every role the position "
                 "scan marks, size to --target; paper: VF → PT → PD → SR at the paper's "
                 "positions with fixed --sizes",
        sizes="heads kept per group: paper chain VF,PT,PD,SR (default 20,5,10,5 as in the "
              "paper); auto chain: fixed sizes per group in discovery order instead of --target "
              "(the last one repeats)")
    p.add_argument("--n-validate", type=prompt_count, default=200,
                   help="auto chain: held-out prompts (seed --seed + 1) for the scan and sizing")
    p.add_argument("--n-mean", type=prompt_count, default=100,
                   help="auto chain: mean-ablation prompts (seed --seed + 2)")
    p.add_argument("--z-threshold", type=float_in(above=0), default=3.0,
                   help="auto chain: a sender is significant at <= -Z standard errors (3)")
    p.add_argument("--method", default="auto", choices=METHOD_CHOICES,
                   help="auto (default: exact up to 160 heads, attribution above; the rule is "
                        "printed), exact path patching, gradient attribution with per-prompt "
                        "standard errors, or attribution then exact scores for the top candidates")
    p.add_argument("--n-scan", type=prompt_count, default=100,
                   help="auto chain: held-out prompts the position scan runs on (100)")
    add_scan_method_options(p, "--scan-method", "--scan-exact", "auto chain's position scan: ")
    p.add_argument("--sizing", default="auto", choices=["auto", "exhaustive", "bisect"],
                   help="auto chain: size by every 4th prefix then pruning (exhaustive), or by "
                        "doubling then bisection (bisect, O(log n) evaluations); auto by model "
                        "size")
    p.add_argument("--max-groups", type=positive_int, default=16,
                   help="auto chain: groups traced at most (16)")
    p.add_argument("--keep-all", action="store_true",
                   help="auto chain: when even every candidate head misses --target, keep them "
                        "all (and say so) instead of stopping with the size-vs-faithfulness "
                        "numbers")
    p.add_argument("--scan-min-drop", type=float_in(), default=0.1,
                   help="auto chain: a role's k and v are traced when ablating one layer there "
                        "costs this share of the model's accuracy (0.1)")
    p.add_argument("--hybrid-k", type=positive_int, default=None,
                   help="candidates scored exactly by --method hybrid (default 3 x group size)")
    p.add_argument("--compare-exact", action="store_true",
                   help="paper chain: compute both exact and attribution scores and print the "
                        "attribution's Spearman rank correlation and top-k recall per group")
    p.add_argument("--naive", action="store_true",
                   help="use the slow reference implementation (for checking; same scores)")
    p.add_argument("--no-heatmaps", action="store_true", help="skip the PNG figures")
    p.add_argument("--truncate", action="store_true",
                   help="paper chain: if a group lies wholly in layer 0, leave the later groups "
                        "empty instead of stopping with an error")
    p.set_defaults(func=run)


def run(args) -> dict:
    from ..core.circuit import format_head
    from ..methods import discovery
    from ..report.figures import discovery_heatmaps
    from ..report.scan import auto_discovery_figures

    cfg = discovery.DiscoveryConfig(n_prompts=args.n_prompts, sizes=args.sizes, method=args.method,
                          n_boxes=args.n_boxes, seed=args.seed, batch_size=args.batch_size,
                          hybrid_k=args.hybrid_k, compare_exact=args.compare_exact,
                          impl="naive" if args.naive else "fast", truncate=args.truncate,
                          chain=args.chain, target=args.target, n_validate=args.n_validate,
                          n_mean=args.n_mean, z_threshold=args.z_threshold,
                          n_scan=args.n_scan, scan_method=args.scan_method,
                          scan_exact=args.scan_exact, sizing=args.sizing,
                          max_groups=args.max_groups, scan_min_drop=args.scan_min_drop,
                          on_unreachable="keep-all" if args.keep_all else "error")
    loaded = load_from_args(args)  # bad sizes/method failed above, before loading a model
    try:
        res = discovery.run(loaded, None, cfg, store=args.out, progress=True)
    except discovery.TargetUnreachable as e:  # the curve says why: draw it, then stop
        _unreachable_curve(args.out, loaded.name, cfg.target)
        raise discovery.TargetUnreachable(f"{e} (size-vs-faithfulness curve: "
                                          f"{args.out}/curve.png)") from None
    c = res.circuit
    print(f"{loaded.name} ({loaded.arch.describe()}), n={c.settings['n_prompts']}, "
          f"chain {cfg.chain}, method {c.settings.get('scoring', args.method)}")
    if cfg.chain == "paper":
        if not args.no_heatmaps:
            discovery_heatmaps(res, args.out, loaded.name)
        for name, g in c.groups.items():
            s = res.scores[name]
            heads = ", ".join(f"{format_head(h)} ({float(s[h]):+.3f})" for h in g.heads)
            print(f"  {name} @ {g.position}: {heads}")
            if name in res.comparisons:
                print(f"    attribution vs exact: {res.comparisons[name]}")
        print(f"saved {args.out}: circuit.json, per-group scores (safetensors) and heatmaps")
        return {"out": args.out, "circuit": c.to_dict()}
    print(print_auto(res))
    if not args.no_heatmaps:
        auto_discovery_figures(res, args.out, loaded.name)
    print(f"saved {args.out}: circuit.json, scan.json, curve.json, discovery.json, scores per "
          f"traced edge (safetensors)" + ("" if args.no_heatmaps else
                                          ", scan.png, circuit_graph.png, curve.png"))
    return {"out": args.out, "circuit": res.circuit.to_dict()}


def _unreachable_curve(out: str, model_name: str, target: float) -> None:
    """``curve.png`` of a sizing that missed the target, with its ceiling, from sizing.json."""
    import json
    from pathlib import Path

    from ..report.scan import plot_size_curve

    saved = Path(out) / "sizing.json"
    if saved.exists():
        sized = json.loads(saved.read_text())["result"]
        summary = sized["summary"]
        plot_size_curve(sized["curve"], Path(out) / "curve.png", target, Path(model_name).name,
                        summary.get("n_validate"), summary.get("ceiling_faithfulness"))


def print_auto(res) -> str:
    """The automatic chain's circuit, edges and held-out faithfulness as text."""
    from ..core.circuit import format_head

    c, s = res.circuit, res.sizing
    lines = ["groups (heads x role):"]
    for name, g in c.groups.items():
        lines.append(f"  {name}: {g.function or name} — {' '.join(format_head(h) for h in g.heads)}")
    lines.append("edges: " + "; ".join(str(e) for e in c.edges))
    lines.append(f"held-out faithfulness (n={s['n_validate']}, full accuracy "
                 f"{s['full_accuracy']:.2f}): {s['faithfulness_paper']:.2f} paper protocol, "
                 f"{s['faithfulness_keep_other_positions']:.2f} keep-other-positions; "
                 f"{s['units']} (head, role) units = {s['unit_fraction']:.0%} of "
                 f"{len(s['roles'])} roles x {c.n_layers * c.n_heads} heads")
    if s.get("message"):
        lines.append(s["message"])
    if res.timings:
        lines.append("wall time per phase (s, this run; 0 = loaded from the run folder): " +
                     ", ".join(f"{k} {v:.0f}" for k, v in res.timings.items()))
    return "\n".join(lines)
