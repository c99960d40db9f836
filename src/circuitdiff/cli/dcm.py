"""``circuitdiff dcm``: DCM: learn which heads of each circuit group carry the object value, the
position or the box label; patch them in every --model.

Per group and desideratum, learn one mask per head (patched = m*base + (1-m)*counterfactual at
the group's position); heads with m < 0.5 are selected. One-head groups are merged into another
group at their position, as the study does. A selection counts only if its validation accuracy
beats no patching and random heads of its size (bootstrap interval); else its row says 'no
function found'. The first --model is the one DCM trains on; the found selections are then
patched in every --model (functional patching) with random head sets of equal size as a
baseline. Results are saved in --out as they are made; a rerun resumes.
"""

from __future__ import annotations

from . import add_command
from . import LazyHelp, add_circuit_option, add_model_options, add_out_option
from . import add_random_draw_options, box_count, float_in, load_from_args, positive_int
from . import prompt_count


def _floats(spec: str) -> tuple[float, ...]:
    """``--lambdas``: comma-separated finite numbers >= 0."""
    import argparse
    import math

    try:
        out = tuple(float(x) for x in spec.split(",") if x.strip())
    except ValueError:
        out = ()
    if not out or not all(math.isfinite(x) and x >= 0 for x in out):
        raise argparse.ArgumentTypeError(f"{spec!r} is not a comma-separated list of finite "
                                         f"numbers >= 0 like 0.001,0.01,0.1")
    return out


def _default_lambdas() -> str:
    from ..methods.dcm import DEFAULT_LAMBDAS

    return ",".join(f"{x:g}" for x in DEFAULT_LAMBDAS)


def register(sub) -> None:
    p = add_command(sub, "dcm", __doc__)
    add_circuit_option(p)
    add_model_options(p, multiple=True)
    p.add_argument("--desiderata", default="paper",
                   help="comma-separated names, or paper (object_value,position,box_label), "
                        "robustness (position + its robustness set) or all (default paper)")
    p.add_argument("--n-boxes", type=box_count, default=7, help="boxes per prompt (default 7)")
    p.add_argument("--n-train", type=prompt_count, default=200, help="training prompts (paper 1000)")
    p.add_argument("--n-val", type=prompt_count, default=100, help="validation prompts (paper 500)")
    p.add_argument("--n-test", type=prompt_count, default=100, help="test prompts (paper 500)")
    p.add_argument("--lambdas", type=_floats, default=None,
                   help=LazyHelp(lambda: f"λ sweep (default {_default_lambdas()}); the λ is "
                                         f"chosen on validation (paper: 0.01)"))
    p.add_argument("--tolerance", type=float_in(0, 1), default=0.02,
                   help="choose the largest λ whose validation accuracy is within this of the "
                        "best (default 0.02)")
    p.add_argument("--lr", type=float_in(above=0), default=0.1, help="Adam learning rate (paper 0.1)")
    p.add_argument("--epochs", type=positive_int, default=2, help="epochs (paper 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts (default 0)")
    add_random_draw_options(p, "random head sets of the selected size",
                            "seed of the random head sets")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="prompts per forward (default 32)")
    add_out_option(p, "dcm")
    p.set_defaults(func=run)


def run(args) -> dict:
    from ..core.circuit import Circuit
    from ..core.model import default_model_spec, load_tokenizer
    from ..core.pool import ModelPool
    from ..core.runs import RunFolder, model_tag, safe_name
    from ..methods import dcm
    from ..report.dcm import (format_dcm_table, format_functional_table, plot_functional_bars,
                              plot_lambda_curve, save_dcm_tables, save_functional_tables)
    from ..report.tables import short_name

    # every input error is raised here, before a model is loaded and before --out is written
    models = args.model or [default_model_spec()]
    config = dcm.DCMConfig(
        circuit=Circuit.load(args.circuit), desiderata=args.desiderata, n_train=args.n_train,
        n_val=args.n_val, n_test=args.n_test, lambdas=args.lambdas or _floats(_default_lambdas()),
        tolerance=args.tolerance, lr=args.lr, epochs=args.epochs, seed=args.seed,
        n_boxes=args.n_boxes, n_random=args.random_draws, random_seed=args.random_seed,
        batch_size=args.batch_size)
    if len(models) > 1:
        dcm.check_tokenizers(models)
    plan = dcm.prepare(load_tokenizer(models[0]), config)

    folder = RunFolder(args.out)
    pool = ModelPool(models, lambda s: load_from_args(args, spec=s))
    loaded = pool.get(models[0])
    print(f"DCM on {loaded.name} ({loaded.arch.describe()}); groups "
          f"{', '.join(f'{g} ({len(x.heads)} heads @ {x.position})' for g, x in plan.groups.items())}"
          + (f"; empty: {', '.join(plan.empty_groups)}" if plan.empty_groups else ""), flush=True)
    for note in plan.notes:
        print(f"note: {note}")
    result = dcm.run(loaded, None, config, store=folder, progress=True)
    slug = model_tag(loaded.name)
    del loaded
    result.save(folder.file(f"dcm/{slug}/result.json"))
    pj, pc = save_dcm_tables(folder, result.rows, result.empty_groups, "dcm_table")
    for group in plan.groups:
        rows = [r for r in result.rows if r.group == group]
        png = plot_lambda_curve(rows, folder.file(f"dcm/{slug}/{safe_name(group)}_lambda.png"),
                                f"DCM {group} @ {rows[0].position}: {short_name(result.model)}")
        print(f"λ curve {group}: {png} ({result.seconds.get(group, 0):.1f} s)")
    print(format_dcm_table(result.rows, result.empty_groups))
    print(f"table: {pj} and {pc}")

    fun = dcm.functional.run(pool, None, dcm.FunctionalConfig(result, config), store=folder,
                             progress=True)
    for note in fun.notes:
        print(f"note: {note}")
    if not fun.rows:
        print("functional patching: no selection found a function; nothing to patch")
        return {"dcm": result.to_dict(), "functional": []}
    fj, fc = save_functional_tables(folder, fun.rows)
    png = plot_functional_bars(fun.rows, folder.file("functional.png"),
                               f"DCM heads of {short_name(result.model)} patched in each model")
    print()
    print("functional patching (target accuracy with the selected heads patched; random = "
          "same number of random heads):")
    print(format_functional_table(fun.rows))
    print(f"table: {fj} and {fc}; plot {png}")
    return {"dcm": result.to_dict(), "functional": [r.to_dict() for r in fun.rows]}
