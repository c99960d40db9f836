"""``circuitdiff eval``: entity-tracking accuracy of a model."""

from __future__ import annotations

from . import add_model_options, add_task_options, load_from_args


def register(sub) -> None:
    p = sub.add_parser("eval", help="accuracy of a model on entity tracking")
    add_model_options(p)
    add_task_options(p)
    p.add_argument("--data", default=None, help="clean.jsonl to evaluate instead of fresh prompts")
    p.set_defaults(func=run)


def run(args) -> dict:
    from ..core.task import load_jsonl
    from ..methods import accuracy

    prompts = None
    if args.data:
        prompts, _ = load_jsonl(args.data)
        if not prompts:
            raise ValueError(f"--data {args.data} holds no prompts")
    cfg = accuracy.AccuracyConfig(n_prompts=args.n_prompts, seed=args.seed, n_boxes=args.n_boxes,
                                  batch_size=args.batch_size)
    loaded = load_from_args(args)
    res = accuracy.run(loaded, prompts, cfg, progress=True)
    n_boxes = prompts[0].n_boxes if prompts else cfg.n_boxes
    print(f"{loaded.name} ({loaded.arch.describe()})")
    print(f"  {n_boxes}-box accuracy: {res.accuracy:.3f}  "
          f"(in-context {res.in_context_accuracy:.3f}, n={res.n})")
    return {"model": loaded.name, "n_boxes": n_boxes, **res.summary()}
