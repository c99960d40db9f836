"""Does fine-tuning on the auxiliary data lift a trained organism base, or break it?

Not part of the package or the tests: the probe behind the #16 diagnosis (README.md here).

    ft BASE LR:STEPS:SEED[:REPLAY] ... [--lora]  full (or the recipe's LoRA) fine-tune of BASE on the aux corpus (the recipe's
        full stage: batch 32, 20 warm-up steps, cosine to 0.1), optionally with a REPLAY share
        of base-corpus documents (evaluation wording, 2-5 boxes); prints 7-box accuracy (500
        prompts, seed 0) every 100 steps (200 prompts) and 2/3/5-box accuracy (200 prompts)
        before and after. ``--styles 3`` / ``--styles 0,1,2`` / ``--styles bind`` restrict the
        aux corpus to those wordings (or to variable binding alone).
    extend BASE WEIGHTS LR STEPS OUT [MIN_LR_FRAC]  continue pre-training BASE on base-corpus
        contexts with box-count WEIGHTS (``0,1,1,1,1,1,1``: 2-7 boxes), probing 7-box accuracy
        every 50 steps; saves the model to OUT. ``--aux-wording F`` phrases a share F of the
        tracking contexts in the auxiliary wordings.

Every result is appended to ``results.jsonl`` beside this file.

    OMP_NUM_THREADS=1 python probe.py ft ../../src/circuitdiff/data/organisms/base 3e-4:300:2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from circuitdiff.organisms import data as D
from circuitdiff.organisms.config import Gate, Phase, StageSpec
from circuitdiff.organisms.evaluate import accuracy
from circuitdiff.organisms.models import reload_model, save_model, set_seed
from circuitdiff.organisms.phases import train_phases
from circuitdiff.organisms.stages import train_stage

RESULTS = Path(__file__).with_name("results.jsonl")


def log(record: dict) -> None:
    record["time"] = time.strftime("%Y-%m-%d %H:%M:%S")
    print(json.dumps(record), flush=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(record) + "\n")


def fine_tune(base: Path, spec: str, styles: str | None, tok, lora: bool = False,
              lora_targets: str = "q,k,v,o", lora_rank: int = 8, other_weight: float = 1.0) -> None:
    lr, steps, seed, *rest = spec.split(":")
    replay = float(rest[0]) if rest else 0.0
    kw = {}
    if styles == "bind":
        kw["binding_frac"] = 1.0
    elif styles:
        kw["styles"] = tuple(int(x) for x in styles.split(","))

    def docs(n: int, s: int, _frac: float) -> list[str]:
        out = D.aux_corpus(n, s, **kw)
        k = int(round(n * replay))
        if k:
            out = out[:n - k] + D.base_corpus(k, s + 7, box_weights=(0, 1, 1, 1, 1, 0, 0))
        return out

    t0 = time.time()
    before = reload_model(base)
    model = reload_model(base)
    if lora:  # the recipe's LoRA stage: rank 8, alpha 16 (alpha = 2 x rank), on q/k/v/o
        from peft import LoraConfig, get_peft_model

        set_seed(int(seed))
        model = get_peft_model(model, LoraConfig(
            r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, task_type="CAUSAL_LM",
            target_modules=[f"{t}_proj" for t in lora_targets.split(",")]))
    stage = StageSpec(steps=int(steps), lr=float(lr), batch_size=32, warmup=20,
                      other_weight=other_weight)
    curve = train_stage(model, tok, docs, stage, int(seed), "ft", False, log_every=100,
                        eval_fn=lambda m, _s: accuracy(m, tok, 200, 0))
    per_box = {b: [round(accuracy(before, tok, 200, 0, n_boxes=b), 3),
                   round(accuracy(model, tok, 200, 0, n_boxes=b), 3)] for b in (2, 3, 5)}
    log({"exp": "lora" if lora else "ft", "base": str(base),
         **({"lora_targets": lora_targets, "lora_rank": lora_rank} if lora else {}),
         "other_weight": other_weight, "lr": float(lr), "steps": int(steps), "seed": int(seed),
         "replay": replay, "styles": styles or "all",
         "acc7_before": accuracy(before, tok, 500, 0), "acc7_after": accuracy(model, tok, 500, 0),
         "acc_2_3_5_before_after": per_box, "curve7": [(s, round(a, 3)) for s, _, a in curve],
         "seconds": round(time.time() - t0)})


def extend(base: Path, weights: str, lr: float, steps: int, out: Path, min_lr_frac: float,
           tok, aux_wording: float = 0.0) -> None:
    model = reload_model(base)
    w = tuple(float(x) for x in weights.split(","))
    phase = Phase("extend", w, other_weight=0.1, steps=steps, lr=lr, warmup=20,
                  min_lr_frac=min_lr_frac, fresh_optimizer=True, aux_wording_frac=aux_wording,
                    gate=Gate(boxes=7, threshold=1.01, every=50, required=False))
    t0 = time.time()
    rec = train_phases(model, tok, (phase,), 5,
                       lambda m, b: accuracy(m, tok, 200, 1000, n_boxes=b), False,
                       stop_on_failure=False)
    save_model(model, tok, out)
    log({"exp": "extend", "base": str(base), "out": str(out), "weights": w, "lr": lr,
         "aux_wording": aux_wording,
         "min_lr_frac": min_lr_frac, "curve7": [(p["step"], p["acc7"]) for p in rec[0]["probes"]],
         "acc7_after": accuracy(model, tok, 500, 0), "seconds": round(time.time() - t0)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    f = sub.add_parser("ft")
    f.add_argument("base", type=Path)
    f.add_argument("specs", nargs="+", help="LR:STEPS:SEED[:REPLAY]")
    f.add_argument("--styles", default=None, help="3 | 0,1,2 | bind (default: the recipe's mix)")
    f.add_argument("--lora", action="store_true", help="the recipe's LoRA instead of full")
    f.add_argument("--lora-targets", default="q,k,v,o",
                   help="LoRA modules, without _proj (q,k,v,o,gate,up,down)")
    f.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (alpha is twice it)")
    f.add_argument("--other-weight", type=float, default=1.0,
                   help="loss weight of the tokens that are not query answers (recipe: 1)")
    e = sub.add_parser("extend")
    e.add_argument("base", type=Path)
    e.add_argument("weights")
    e.add_argument("lr", type=float)
    e.add_argument("steps", type=int)
    e.add_argument("out", type=Path)
    e.add_argument("min_lr_frac", type=float, nargs="?", default=1.0)
    e.add_argument("--aux-wording", type=float, default=0.0,
                   help="share of tracking contexts in the auxiliary wordings")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = D.build_tokenizer()
    if args.what == "ft":
        for spec in args.specs:
            fine_tune(args.base, spec, args.styles, tok, args.lora, args.lora_targets,
                      args.lora_rank, args.other_weight)
    else:
        extend(args.base, args.weights, args.lr, args.steps, args.out, args.min_lr_frac, tok,
               args.aux_wording)


if __name__ == "__main__":
    main()
