"""``circuitdiff evaluate``: evaluate circuits on models: faithfulness (mean ablation), random
baseline, cross-model matrix, completeness, minimality.

Mean-ablate every head outside the circuit and compare with the full model. Every result is
saved in --out as it is made; a rerun resumes.
"""

from __future__ import annotations

from pathlib import Path

from . import add_command
from . import add_circuit_option, add_max_rows_option, add_model_options, add_random_draw_options
from . import add_task_options, float_in, load_from_args, positive_int, prompt_count


def register(sub) -> None:
    p = add_command(sub, "evaluate", __doc__)
    add_circuit_option(p, multiple=True)
    add_model_options(p, multiple=True)
    add_task_options(p, n=500)
    p.add_argument("--out", default="runs/evaluate", help="run folder (default runs/evaluate)")
    p.add_argument("--n-mean", type=prompt_count, default=500,
                   help="size of the mean-ablation set (default 500, as the paper)")
    p.add_argument("--mean-seed", type=int, default=None,
                   help="seed of the mean-ablation set (default: --seed + 1)")
    add_random_draw_options(p, "random circuits of the same group sizes",
                            "seed of the random circuits")
    p.add_argument("--keep-other-positions", action="store_true",
                   help="make keep-other-positions (positions outside the circuit's roles left "
                        "intact) the main protocol of the table and random baseline; both "
                        "protocols are always reported")
    p.add_argument("--per-model-tokenization", action="store_true",
                   help="allow models with different tokenizers: each gets its own prompts "
                        "from the same seed")
    add_max_rows_option(p, "ablation variants")
    p.add_argument("--matrix", action="store_true",
                   help="also print the circuit x model matrix and head overlaps (implied by "
                        "several --circuit)")
    p.add_argument("--completeness", action="store_true",
                   help="F(C\\K) vs F(M\\K) for whole groups and random halves; PNG per pair")
    p.add_argument("--n-halves", type=positive_int, default=5, help="random halves for --completeness")
    p.add_argument("--minimality", action="store_true",
                   help="prune each circuit on the FIRST --model; writes pruned/<circuit>.json")
    p.add_argument("--threshold", type=float_in(minimum=0), default=0.01,
                   help="minimality: keep a head if its best marginal effect >= this (0.01)")
    p.add_argument("--max-partner-frac", type=float_in(minimum=0, maximum=1), default=0.3,
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
    from ..core.model import ModelSpecError, load_tokenizer
    from ..methods.evaluation import check_same_tokenizer

    try:
        toks = [load_tokenizer(s) for s in specs]
    except (ModelSpecError, OSError, ValueError):
        return
    for spec, tok in zip(specs[1:], toks[1:]):
        check_same_tokenizer(specs[0], toks[0], spec, tok)


def run(args) -> dict:
    from ..core.circuit import Circuit
    from ..core.pool import ModelPool
    from ..core.runs import RunFolder, model_tag, safe_name
    from ..methods import evaluation
    from ..report.figures import plot_completeness
    from ..report.markdown import format_protocols
    from ..report.tables import format_matrix, format_overlaps, format_table, save_table, short_name

    if not args.model:
        raise ValueError("pass at least one --model SPEC to evaluate the circuit on")
    analyses = evaluation.AnalysisConfig(args.completeness, args.n_halves, args.minimality,
                                         args.threshold, args.max_partner_frac)
    circuits = {n: Circuit.load(p) for n, p in zip(_circuit_names(args.circuit), args.circuit)}
    if len(args.model) > 1 and not args.per_model_tokenization:
        _check_tokenizers(args.model)
    cfg = evaluation.EvalConfig(
        n_prompts=args.n_prompts, seed=args.seed, n_boxes=args.n_boxes, n_mean=args.n_mean,
        mean_seed=args.mean_seed, n_random=args.random_draws, random_seed=args.random_seed,
        keep_other_positions=args.keep_other_positions, batch_size=args.batch_size,
        max_rows=args.max_rows, per_model_tokenization=args.per_model_tokenization,
        circuits=circuits, analyses=analyses)
    folder = RunFolder(args.out)
    folder.save_json("evaluate/config.json", {**cfg.shared_key(), "circuits": args.circuit,
                                              "models": args.model})
    pool = ModelPool(args.model, lambda spec: load_from_args(args, spec=spec))
    res = evaluation.run(pool, None, cfg, store=folder, progress=True)
    for (model, name), points in res.completeness.items():
        png = plot_completeness(points, folder.file(f"completeness/{model_tag(model)}/"
                                                    f"{safe_name(name)}.png"),
                                f"{name} on {short_name(model)}")
        worst = max(points, key=lambda p: p.difference)
        print(f"completeness {name} on {short_name(model)}: max |F(C\\K) - F(M\\K)| = "
              f"{worst.difference:.3f} ({worst.subset}); plot {png}")
    for name, m in res.minimality.items():
        pruned = Circuit.from_dict(m["pruned"])
        sizes = " ".join(f"{g}:{len(circuits[name].groups[g].heads)}->{len(pg.heads)}"
                         for g, pg in pruned.groups.items())
        print(f"minimality {name} on {short_name(args.model[0])} ({m['n_variants']} variants): "
              f"{sizes}; pruned circuit {folder.file(f'pruned/{safe_name(name)}.json')}")
    pj, pc = save_table(folder, res.rows)
    print(format_table(res.rows))
    print("both ablation protocols (paper: every head outside the circuit's roles ablated; "
          "keep-other-positions: those positions intact):")
    print(format_protocols(res.rows))
    if args.matrix or len(circuits) > 1:
        print()
        print("circuit accuracy (faithfulness), circuit x model:")
        print(format_matrix(res.rows))
        print(format_overlaps(res.overlaps))
    print(f"table: {pj} and {pc}")
    return res.to_dict()
