"""``circuitdiff data``: write an entity-tracking dataset (and its counterfactuals) as JSONL."""

from __future__ import annotations

from . import add_out_option, add_task_options, positive_int

#: the JSONL files written, in order
FILES = ("clean.jsonl", "corrupt.jsonl", "mean_ablation.jsonl", "dcm_counterfactual.jsonl")


def register(sub) -> None:
    p = sub.add_parser("data", help="generate prompts and counterfactual sets as JSONL")
    p.add_argument("--model", metavar="SPEC", default=None,
                   help="model whose tokenizer decides which words are single tokens "
                        "(default: the embedded default model)")
    add_out_option(p, "data", "output folder")
    add_task_options(p, boxes=positive_int)  # its range is checked in run(), with the reason
    p.set_defaults(func=run)


def run(args) -> dict:
    from ..core.model import default_model_spec, load_tokenizer
    from ..core.runs import RunFolder
    from ..core.task import EntityTrackingTask, TaskConfig, save_jsonl

    cfg = TaskConfig(n_boxes=args.n_boxes)
    if not 3 <= args.n_boxes < len(set(cfg.labels)):
        raise ValueError(f"--n-boxes must be between 3 and {len(set(cfg.labels)) - 1}: the DCM set "
                         f"needs three distinct boxes, and the corrupted set a query label absent "
                         f"from the {args.n_boxes} used in the context")
    tok = load_tokenizer(args.model or default_model_spec())
    task = EntityTrackingTask(tok, cfg, seed=args.seed)
    clean = task.sample(args.n_prompts)  # every set is made before the first file is written
    sets = {"clean.jsonl": (clean, {}), "corrupt.jsonl": (task.corrupt(clean), {}),
            "mean_ablation.jsonl": (task.sample(args.n_prompts, seed=args.seed + 1000), {})}
    dcm = task.dcm_counterfactuals(clean)
    sets["dcm_counterfactual.jsonl"] = (dcm.counterfactual,
                                        {f"target_{k}": v for k, v in dcm.targets.items()})
    folder = RunFolder(args.out)
    for name in FILES:
        prompts, extra = sets[name]
        readable = {"text": [p.text for p in prompts], "answer": [p.answer for p in prompts]}
        save_jsonl(folder.file(name), prompts, {**readable, **extra})
    print(f"wrote {args.n_prompts} prompts x {len(FILES)} sets ({args.n_boxes} boxes, "
          f"{len(task.objects)} single-token objects) to {folder.path}/")
    return {"out": str(folder.path), "files": list(FILES), "n_prompts": args.n_prompts,
            "n_boxes": args.n_boxes, "seed": args.seed}
