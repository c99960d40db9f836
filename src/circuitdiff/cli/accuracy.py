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
    from ..methods.accuracy import evaluate_accuracy
    from ..core.task import EntityTrackingTask, TaskConfig, load_jsonl

    if args.data:
        prompts, _ = load_jsonl(args.data)
        if not prompts:
            raise ValueError(f"--data {args.data} holds no prompts")
    loaded = load_from_args(args)
    if not args.data:
        task = EntityTrackingTask(loaded.tokenizer, TaskConfig(n_boxes=args.n_boxes), seed=args.seed)
        prompts = task.sample(args.n_prompts)
    res = evaluate_accuracy(loaded, prompts, args.batch_size, progress=True)
    print(f"{loaded.name} ({loaded.arch.describe()})")
    print(f"  {prompts[0].n_boxes}-box accuracy: {res.accuracy:.3f}  "
          f"(in-context {res.in_context_accuracy:.3f}, n={res.n})")
    return {"model": loaded.name, "n_boxes": prompts[0].n_boxes, **res.to_dict()}
