"""``circuitdiff organisms``: list the shipped model organisms, retrain them from scratch, or
fine-tune a real model the way the paper's fine-tunes were made (a LoRA adapter, or the attention
weights only) on the organisms' auxiliary corpus."""

from __future__ import annotations

import json

from . import add_out_option, float_in, positive_int, prompt_count

#: ``--kind`` choices: :data:`circuitdiff.organisms.finetune.KINDS` (spelt here so building the
#: parser imports no torch; a test checks the two agree)
FINETUNE_KINDS = ("lora", "attention")


def register(sub) -> None:
    p = sub.add_parser("organisms", help="list the shipped model organisms, or retrain them")
    osub = p.add_subparsers(dest="organisms_command", required=True)
    ls = osub.add_parser("list", help="where the organisms live and their recorded accuracies")
    ls.set_defaults(func=run_list)
    tr = osub.add_parser("train", help="retrain base, lora, full and chat from scratch (CPU)")
    add_out_option(tr, "organisms", "output folder (gets base/ lora/ full/ chat/)")
    tr.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    tr.add_argument("--scale", type=float_in(above=0), default=1.0,
                    help="multiply every stage's steps (e.g. 0.01 for a smoke run)")
    tr.add_argument("--threads", type=positive_int, default=2,
                    help="torch threads after the bind race (which runs two processes of one thread each, "
                         "so its result does not depend on this); the shipped organisms used 2")
    tr.add_argument("--base-from", default=None, help="reuse a trained base folder")
    tr.add_argument("--quiet", action="store_true", help="no progress bars")
    tr.set_defaults(func=run_train)
    ft = osub.add_parser("finetune", help="fine-tune a real model on the aux corpus: a LoRA "
                                          "adapter or the attention weights only (CPU budget)")
    ft.add_argument("--base", required=True, metavar="SPEC",
                    help="model to fine-tune, e.g. qwen2.5-coder-0.5b (not an adapter)")
    ft.add_argument("--kind", required=True, choices=FINETUNE_KINDS,
                    help="lora: a peft adapter folder on --base; attention: q/k/v/o trained, "
                         "the rest frozen, saved as a full model folder")
    ft.add_argument("--out", required=True, metavar="DIR",
                    help="new or empty folder for the adapter or model and finetune.json")
    ft.add_argument("--rank", type=positive_int, default=8, help="LoRA rank (default 8)")
    ft.add_argument("--lr", type=float_in(above=0), default=None,
                    help="AdamW learning rate (default 5e-4 for lora, 1e-5 for attention)")
    ft.add_argument("--steps", type=positive_int, default=400, help="steps at most (default 400)")
    ft.add_argument("--batch-size", type=positive_int, default=8,
                    help="documents per step (default 8)")
    ft.add_argument("--minutes", type=float_in(above=0), default=25.0,
                    help="wall-time budget; training stops at the first step past it (default 25)")
    ft.add_argument("--seed", type=int, default=0, help="training-data seed (default 0)")
    ft.add_argument("--n-eval", type=prompt_count, default=100,
                    help="7-box prompts measured before and after (default 100)")
    ft.add_argument("--threads", type=positive_int, default=None,
                    help="torch threads while training (default: FinetuneConfig's, 1)")
    ft.add_argument("--quiet", action="store_true", help="no progress bar")
    ft.set_defaults(func=run_finetune, fresh_out=True)


def run_list(args) -> dict:
    from ..core.specs import ORGANISMS, ORGANISMS_DIR, organism_path

    summary = ORGANISMS_DIR / "train_summary.json"
    acc = json.loads(summary.read_text()).get("accuracy", {}) if summary.exists() else {}
    for name in ORGANISMS:
        a = acc.get(name)
        print(f"organism:{name:5s} {organism_path(name)}"
              + (f"  (recorded 7-box accuracy {a:.3f})" if a is not None else ""))
    return {f"organism:{n}": {"path": str(organism_path(n)), "accuracy": acc.get(n)}
            for n in ORGANISMS}


def run_train(args) -> dict | int:
    """Run the recipe; a missed target is one line on stderr and exit code 1 (not a success)."""
    import sys

    from ..organisms.recipe import RecipeFailed, train_all

    if args.scale <= 0:
        raise ValueError(f"--scale must be > 0, got {args.scale}")
    try:
        # a scaled-down smoke run cannot meet the targets; only the full recipe is judged
        accs = train_all(args.out, seed=args.seed, progress=not args.quiet, scale=args.scale,
                         base_from=args.base_from, threads=args.threads,
                         check_targets=args.scale >= 1.0)
    except RecipeFailed as e:
        print(f"circuitdiff organisms train: {e} (summary: {args.out}/train_summary.json)",
              file=sys.__stderr__)
        return 1
    for name, a in accs.items():
        print(f"{name:5s} 7-box accuracy {a:.3f}")
    return {"out": args.out, "accuracy": accs}


def run_finetune(args) -> dict:
    """Check the options (no model loaded yet), fine-tune, print one summary line."""
    from ..core.specs import adapter_base_of, as_spec
    from ..organisms.finetune import FinetuneConfig, finetune

    base_of = adapter_base_of(args.base)
    if base_of is not None:
        raise ValueError(f"--base {args.base} is a LoRA adapter; pass the model it was trained on "
                         f"(--base {as_spec(base_of)})")
    given = {"rank": args.rank, "lr": args.lr, "steps": args.steps, "batch_size": args.batch_size,
             "minutes": args.minutes, "seed": args.seed, "n_eval": args.n_eval,
             "threads": args.threads}
    cfg = FinetuneConfig(kind=args.kind, **{k: v for k, v in given.items() if v is not None})
    rec = finetune(args.base, args.out, cfg, progress=not args.quiet)
    acc = rec["accuracy_7box"]
    print(f"{rec['kind']}: {rec['steps_run']} steps in {rec['train_seconds']:.1f} s; 7-box "
          f"accuracy {acc['before']:.3f} -> {acc['after']:.3f} (n={acc['n']}); saved in {args.out}")
    return rec
