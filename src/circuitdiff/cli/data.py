"""``circuitdiff data``: write an entity-tracking dataset (and its counterfactuals) as JSONL."""

from __future__ import annotations

from pathlib import Path

from . import add_task_options


def register(sub) -> None:
    p = sub.add_parser("data", help="generate prompts and counterfactual sets as JSONL")
    p.add_argument("--model", metavar="SPEC", default=None,
                   help="model whose tokenizer decides which words are single tokens")
    p.add_argument("--out", required=True, help="output folder")
    add_task_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..core.model import default_model_spec, load_tokenizer
    from ..core.task import EntityTrackingTask, TaskConfig, save_jsonl

    tok = load_tokenizer(args.model or default_model_spec())
    task = EntityTrackingTask(tok, TaskConfig(n_boxes=args.n_boxes), seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clean = task.sample(args.n_prompts)
    save_jsonl(out / "clean.jsonl", clean)
    save_jsonl(out / "corrupt.jsonl", task.corrupt(clean))
    save_jsonl(out / "mean_ablation.jsonl", task.sample(args.n_prompts, seed=args.seed + 1000))
    dcm = task.dcm_counterfactuals(clean)
    save_jsonl(out / "dcm_counterfactual.jsonl", dcm.counterfactual,
               {f"target_{k}": v for k, v in dcm.targets.items()})
    print(f"wrote {args.n_prompts} prompts x 4 sets ({args.n_boxes} boxes, "
          f"{len(task.objects)} single-token objects) to {out}/")
    return 0
