"""``circuitdiff knockout``: attention knockout: block QUERY->KEY attention in layers >= L.

For each edge and each L, block attention from one named position to another in every head of
layers >= L and measure accuracy. Positions: last, query_label, prev_query_label,
correct_object; keys may also be box_label, box_object, all, random. Results are saved in --out
as they are made.
"""

from __future__ import annotations

from . import add_command
from . import add_max_rows_option, add_model_options, add_out_option, add_task_options
from . import load_from_args


def register(sub) -> None:
    p = add_command(sub, "knockout", __doc__)
    add_model_options(p)
    add_task_options(p, n=500)
    p.add_argument("--edge", action="append", metavar="QUERY:KEY",
                   help="edge to block (repeatable), e.g. last:correct_object; 'random' = "
                        "last:random (a control). Default: last:correct_object "
                        "query_label:prev_query_label random")
    p.add_argument("--layers", default=None,
                   help="first blocked layers to try, e.g. 0-15 or 0,4,8 (default: all)")
    add_max_rows_option(p, "the L variants")
    add_out_option(p, "knockout")
    p.set_defaults(func=run)


def parse_layers(spec: str | None) -> list[int] | None:
    if spec is None:
        return None
    out = []
    try:
        for part in spec.split(","):
            if "-" in part:
                a, b = (int(x) for x in part.split("-"))
                if b < a:
                    raise ValueError(f"--layers {spec!r}: the range {part} is empty; write it low-high, "
                                     f"e.g. {b}-{a}")
                out += list(range(a, b + 1))
            elif part.strip():
                out.append(int(part))
    except ValueError as e:
        if "--layers" in str(e):
            raise
        raise ValueError(f"--layers {spec!r} is not a list like 0-15 or 0,4,8") from None
    if not out or min(out) < 0:
        raise ValueError(f"--layers {spec!r} names no layer >= 0; e.g. 0-15 or 0,4,8")
    return out


def run(args) -> dict:
    from ..core.model import default_model_spec, load_tokenizer
    from ..core.runs import RunFolder, model_tag
    from ..core.validate import model_grid
    from ..methods import knockout
    from ..report.figures import plot_knockout_curves
    from ..report.tables import short_name

    cfg = knockout.KnockoutConfig(edges=tuple(args.edge or knockout.DEFAULT_EDGES),
                                  layers=parse_layers(args.layers), n=args.n_prompts,
                                  seed=args.seed, n_boxes=args.n_boxes,
                                  batch_size=args.batch_size, max_rows=args.max_rows)
    spec = args.model or default_model_spec()
    grid = model_grid(spec)
    if cfg.layers and grid is not None and max(cfg.layers) >= grid[0]:
        raise ValueError(f"--layers {args.layers} names layer {max(cfg.layers)} but {spec} has "
                         f"{grid[0]} layers (0-{grid[0] - 1}); pass layers in that range")
    folder = RunFolder(args.out)
    # every edge must block something on these prompts: checked before a model is loaded
    knockout.check_edges(load_tokenizer(args.model or default_model_spec()), cfg)
    loaded = load_from_args(args)
    print(f"model: {loaded.name} ({loaded.arch.describe()})")
    res = knockout.run(loaded, None, cfg, store=folder, progress=True)
    for c in res.curves:
        pts = " ".join(f"{l}:{a:.2f}" for l, a in zip(c.layers, c.accuracy))
        print(f"{c.edge:32s} baseline {c.baseline:.2f} | L:acc {pts}")
    slug = model_tag(loaded.name)
    png = plot_knockout_curves(res.curves, folder.file(f"knockout/{slug}/knockout.png"),
                               f"attention knockout: {short_name(loaded.name)}")
    curves = [c.to_dict() for c in res.curves]
    folder.save_json(f"knockout/{slug}/curves.json", curves)
    print(f"plot {png}; curves {folder.file(f'knockout/{slug}/curves.json')}")
    return {"model": loaded.name, "curves": curves, "plot": str(png)}
