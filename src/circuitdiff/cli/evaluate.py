"""``circuitdiff evaluate``: faithfulness table, circuit x model matrix, completeness, minimality."""

from __future__ import annotations

from pathlib import Path

from . import add_model_options, add_task_options, load_from_args


def register(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="evaluate circuits on models: faithfulness (mean ablation), random "
                         "baseline, cross-model matrix, completeness, minimality",
        description="Mean-ablate every head outside the circuit and compare with the full model. "
                    "Every result is saved in --out as it is made; a rerun resumes.")
    p.add_argument("--circuit", action="append", required=True, metavar="JSON",
                   help="circuit file (repeatable: every circuit is evaluated on every model)")
    add_model_options(p, multiple=True)
    add_task_options(p, n=500)
    p.add_argument("--out", default="runs/evaluate", help="run folder (default runs/evaluate)")
    p.add_argument("--n-mean", type=int, default=500,
                   help="size of the mean-ablation set (default 500, as the paper)")
    p.add_argument("--mean-seed", type=int, default=None,
                   help="seed of the mean-ablation set (default: --seed + 1)")
    p.add_argument("--random-draws", type=int, default=10,
                   help="random circuits of the same group sizes (default 10)")
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument("--keep-other-positions", action="store_true",
                   help="leave positions outside the circuit's groups intact instead of "
                        "ablating every head there")
    p.add_argument("--per-model-tokenization", action="store_true",
                   help="allow models with different tokenizers: each gets its own prompts "
                        "from the same seed")
    p.add_argument("--max-rows", type=int, default=256,
                   help="rows per forward when ablation variants are stacked (default 256)")
    p.add_argument("--matrix", action="store_true",
                   help="also print the circuit x model matrix and head overlaps (implied by "
                        "several --circuit)")
    p.add_argument("--completeness", action="store_true",
                   help="F(C\\K) vs F(M\\K) for whole groups and random halves; PNG per pair")
    p.add_argument("--n-halves", type=int, default=5, help="random halves for --completeness")
    p.add_argument("--minimality", action="store_true",
                   help="prune each circuit on the FIRST --model; writes pruned/<circuit>.json")
    p.add_argument("--threshold", type=float, default=0.01,
                   help="minimality: keep a head if its best marginal effect >= this (0.01)")
    p.add_argument("--max-partner-frac", type=float, default=0.3,
                   help="minimality: largest partner set, as a fraction of the group (0.3)")
    p.set_defaults(func=run)


def _circuit_names(paths: list[str]) -> list[str]:
    names = []
    for p in paths:
        n = Path(p).stem
        names.append(n if n not in names else f"{n}-{len(names)}")
    return names


def _check_tokenizers(specs: list[str]) -> None:
    """Fail before any model is loaded when two models' tokenizers differ (when each tokenizer
    can be loaded alone; otherwise the check happens as the models load)."""
    from ..compare import same_tokenizer
    from ..model import ModelSpecError, load_tokenizer

    try:
        toks = [load_tokenizer(s) for s in specs]
    except (ModelSpecError, OSError, ValueError):
        return
    for spec, tok in zip(specs[1:], toks[1:]):
        if not same_tokenizer(toks[0], tok):
            raise ValueError(
                f"model {spec} has a different tokenizer from {specs[0]}: the same prompts would "
                f"be different token ids. Compare models with one tokenizer, or pass "
                f"--per-model-tokenization to give each model its own prompts from the same seed")


def run(args) -> int:
    from ..ablation import model_tag, safe_name
    from ..circuit import Circuit
    from ..compare import EvalConfig, evaluate_matrix, format_matrix, head_overlap
    from ..completeness import completeness, plot_completeness
    from ..faithfulness import format_table, save_table, short_name
    from ..minimality import batched_evaluator, minimality
    from ..runs import RunFolder

    if not args.model:
        raise ValueError("pass at least one --model SPEC to evaluate the circuit on")
    if not 0 <= args.max_partner_frac <= 1:
        raise ValueError(f"--max-partner-frac must be in [0, 1], got {args.max_partner_frac}")
    circuits = {n: Circuit.load(p) for n, p in zip(_circuit_names(args.circuit), args.circuit)}
    if len(args.model) > 1 and not args.per_model_tokenization:
        _check_tokenizers(args.model)
    cfg = EvalConfig(n_prompts=args.n_prompts, seed=args.seed, n_boxes=args.n_boxes,
                     n_mean=args.n_mean, mean_seed=args.mean_seed, n_random=args.random_draws,
                     random_seed=args.random_seed, keep_other_positions=args.keep_other_positions,
                     batch_size=args.batch_size, max_rows=args.max_rows,
                     per_model_tokenization=args.per_model_tokenization)
    folder = RunFolder(args.out)
    folder.save_json("evaluate/config.json", {**cfg.key(), "circuits": args.circuit,
                                              "models": args.model})
    first_model = args.model[0]

    def extra(sess, rows) -> None:
        loaded = sess.loaded
        slug = model_tag(loaded.name)
        base = {"model": loaded.name, **cfg.key()}
        for name, circuit in circuits.items():
            if args.completeness:
                s = {**base, "circuit": circuit.to_dict(), "n_halves": args.n_halves}
                pts = folder.cached(f"completeness/{slug}/{safe_name(name)}.json", s, lambda: [
                    p.to_dict() for p in completeness(
                        loaded, sess.prompts, sess.means, circuit, args.n_halves, args.random_seed,
                        cfg.keep_other_positions, cfg.batch_size, cfg.max_rows, progress=True)])
                from ..completeness import CompletenessPoint
                objs = [CompletenessPoint(p["subset"], p["removed"], p["circuit_minus_k"],
                                          p["model_minus_k"]) for p in pts]
                png = plot_completeness(objs, folder.file(f"completeness/{slug}/{safe_name(name)}.png"),
                                        f"{name} on {short_name(loaded.name)}")
                worst = max(objs, key=lambda p: p.difference)
                print(f"completeness {name} on {short_name(loaded.name)}: max |F(C\\K) - F(M\\K)| = "
                      f"{worst.difference:.3f} ({worst.subset}); plot {png}")
            if args.minimality and sess.spec == first_model:
                s = {**base, "circuit": circuit.to_dict(), "threshold": args.threshold,
                     "max_partner_frac": args.max_partner_frac}
                res = folder.cached(f"minimality/{safe_name(name)}.json", s, lambda: minimality(
                    circuit, batched_evaluator(loaded, sess.prompts, sess.means,
                                               cfg.keep_other_positions, cfg.batch_size,
                                               cfg.max_rows, progress=True),
                    args.threshold, args.max_partner_frac).to_dict())
                pruned = Circuit.from_dict(res["pruned"])
                path = folder.file(f"pruned/{safe_name(name)}.json")
                pruned.save(path)
                sizes = " ".join(f"{g}:{len(circuit.groups[g].heads)}->{len(pg.heads)}"
                                 for g, pg in pruned.groups.items())
                print(f"minimality {name} on {short_name(loaded.name)} ({res['n_variants']} variants): "
                      f"{sizes}; pruned circuit {path}")

    rows = evaluate_matrix(circuits, args.model, lambda spec: load_from_args(args, spec=spec),
                           folder, cfg, progress=True,
                           per_model=extra if (args.completeness or args.minimality) else None)
    pj, pc = save_table(folder, rows)
    print(format_table(rows))
    if args.matrix or len(circuits) > 1:
        print()
        print("circuit accuracy (faithfulness), circuit x model:")
        print(format_matrix(rows))
        names = list(circuits)
        overlaps = {f"{a}|{b}": head_overlap(circuits[a], circuits[b])
                    for a in names for b in names if a != b}
        folder.save_json("overlap.json", overlaps)
        ratio = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        for key, ov in overlaps.items():
            a, b = key.split("|")
            cells = ", ".join(f"{g} {o['intersection']}/{o['n_reference']} "
                              f"(P {ratio(o['precision'])} R {ratio(o['recall'])})"
                              for g, o in ov.items())
            print(f"overlap {a} (reference) vs {b}: {cells}")
    print(f"table: {pj} and {pc}")
    return 0
