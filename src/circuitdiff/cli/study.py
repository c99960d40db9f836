"""``circuitdiff study``: the main job on the embedded default model."""

from __future__ import annotations

import json
from pathlib import Path

from . import add_model_options, add_task_options, load_from_args


def register(sub) -> None:
    p = sub.add_parser("study", help="run the study on the embedded default (or given) model")
    add_model_options(p)
    add_task_options(p, n=200)
    p.add_argument("--out", default="runs/study", help="run folder (default runs/study)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..accuracy import evaluate_accuracy
    from ..runs import RunFolder
    from ..task import EntityTrackingTask, TaskConfig

    folder = RunFolder(args.out)
    loaded = load_from_args(args)
    print(f"model: {loaded.name}\n  {loaded.arch.describe()}")
    task = EntityTrackingTask(loaded.tokenizer, TaskConfig(n_boxes=args.n_boxes), seed=args.seed)
    prompts = task.sample(args.n_prompts)
    settings = {"model": loaded.name, "n_boxes": args.n_boxes, "n": args.n_prompts,
                "seed": args.seed, "dtype": args.dtype}
    res = folder.cached("accuracy.json", settings, lambda: evaluate_accuracy(
        loaded, prompts, args.batch_size, progress=True).to_dict())
    print(f"  {args.n_boxes}-box accuracy: {res['accuracy']:.3f} "
          f"(in-context {res['in_context_accuracy']:.3f}, n={res['n']})")
    print(f"results in {Path(args.out)}/")
    return 0
