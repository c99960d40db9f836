"""``circuitdiff cmap``: cross-model activation patching: which circuit groups carry a fine-tune's
gain.

Patch the fine-tune's head outputs of each circuit group (at the group's position) into the base
model and measure accuracy and the share of the accuracy gap recovered, (patched - base) /
(fine-tune - base), with a bootstrap interval. Per group, cumulative in chain order, whole
circuit, random heads of equal size; optionally input CMAP (q/k/v), a per-head map and the
reverse direction. A LoRA fine-tune is one set of weights (adapter toggled); a full fine-tune is
recorded, freed, then the base is loaded. Results are cached in --out; a rerun resumes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from . import add_command
from . import add_circuit_option, add_device_options, add_max_rows_option, add_random_draw_options
from . import box_count, load_from_args, nonnegative_int, positive_int, prompt_count


def register(sub) -> None:
    p = add_command(sub, "cmap", __doc__)
    add_circuit_option(p)
    p.add_argument("--base", required=True, metavar="SPEC",
                   help="base model: organism:NAME, HF folder or hub id, or a .gguf file")
    p.add_argument("--finetuned", required=True, metavar="SPEC",
                   help="fine-tune of --base: a model (same spec forms) or a LoRA adapter folder "
                        "trained on --base")
    p.add_argument("--out", default="runs/cmap", help="run folder (default runs/cmap)")
    p.add_argument("-n", "--n-prompts", type=prompt_count, default=500, help="prompts (default 500)")
    p.add_argument("--seed", type=int, default=0, help="prompt seed (default 0)")
    p.add_argument("--n-boxes", type=box_count, default=7, help="boxes per prompt (default 7)")
    p.add_argument("--per-head", action="store_true",
                   help="also CMAP every single head: a [layers, heads] heatmap per position")
    p.add_argument("--per-head-position", action="append", metavar="POS",
                   help="position of the per-head map (repeatable; default: the positions of "
                        "the circuit's non-empty groups); 'all' = every token")
    p.add_argument("--reverse", action="store_true",
                   help="also patch the base's activations into the fine-tune (base -> fine-tune)")
    p.add_argument("--input", action="store_true",
                   help="also input CMAP: the q, k, v, qk, qkv of each group's heads")
    add_random_draw_options(p, "random circuits of the same group sizes as the control (the "
                               "gain-carried rank test needs at least 19)",
                            "seed of the random head sets", default=20)
    p.add_argument("--bootstrap", type=nonnegative_int, default=1000,
                   help="bootstrap resamples of the prompts for the intervals (default 1000; 0 "
                        "= none)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="prompts per forward (default 32)")
    add_max_rows_option(p, "patch variants")
    add_device_options(p, "the models compute")
    p.set_defaults(func=run)


def _remove_if_empty(path: Path) -> None:
    """Remove ``path`` and its sub-folders when they hold no file (a failed run's leftovers)."""
    if not path.is_dir() or any(p.is_file() for p in path.rglob("*")):
        return
    for d in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        d.rmdir()
    path.rmdir()


def run(args) -> dict:
    from ..core.circuit import Circuit
    from ..core.pool import ModelPool
    from ..core.runs import RunFolder, model_tag, safe_name
    from ..core.pool import check_pair
    from ..methods import cmap
    from ..report.cmap import format_cmap, save_cmap_report

    cfg = cmap.CMAPConfig(
        n_prompts=args.n_prompts, seed=args.seed, n_boxes=args.n_boxes,
        random_draws=args.random_draws, random_seed=args.random_seed, bootstrap=args.bootstrap,
        per_head=args.per_head, per_head_positions=args.per_head_position, input=args.input,
        reverse=args.reverse, batch_size=args.batch_size, max_rows=args.max_rows,
        circuit=Circuit.load(args.circuit))
    pair = check_pair(args.base, args.finetuned, cfg.circuit)  # before any weights load
    for w in pair.warnings:
        print(f"circuitdiff cmap: warning: {w}", file=sys.stderr)
    out = Path(args.out)
    existed = out.exists()
    try:
        folder = RunFolder(out)
        pool = ModelPool([args.base, args.finetuned], lambda spec: load_from_args(args, spec=spec))
        result = cmap.run(pool, None, cfg, store=folder, progress=True)
    except BaseException:
        if not existed:
            _remove_if_empty(out)
        raise
    for w in result.warnings:
        if w not in pair.warnings:
            print(f"circuitdiff cmap: warning: {w}", file=sys.stderr)
    pair_name = f"{model_tag(args.finetuned)}_vs_{model_tag(args.base)}"
    prefix = f"cmap/{safe_name(Path(args.circuit).stem)}/{pair_name}"
    paths = save_cmap_report(result, folder, prefix)
    how = "LoRA adapter toggled" if pair.lora else "two models, one at a time"
    print(f"CMAP of {args.circuit} ({how}, {result.seconds:.0f} s)")
    print(format_cmap(result))
    print(f"saved: {', '.join(str(p) for p in paths)}")
    return result.to_dict()
