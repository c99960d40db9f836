"""Organism recipe: time one training step the old way and the fast way, in one process.

The recipe (``circuitdiff organisms train``) spends nearly all its time in
``organisms.stages.train_step``. Two changes make a step cheaper without changing its math:

* ``fast step`` (:func:`grouped_loss_backward`): the batch is sorted by length and run as
  ``LENGTH_GROUPS`` groups, each cut to its own longest document, gradients accumulated (no
  compute on padding), and the vocabulary projection runs only where the loss has weight (in the
  answer-only "bind" phase, the answers alone);
* ``eager attention``: matmul + softmax instead of the CPU sdpa kernel, which is slow on the
  organisms' 16-wide heads.

For base batches ("bind": 2 boxes, answer-only loss; "grow": 2-4 boxes, 0.1 on the other
tokens; batch 64) and an auxiliary fine-tune batch (batch 32) it times, with
the same documents and the same model: the baseline (sdpa, one padded batch: the recipe before
this change), each change alone, and both. Every variant computes the same loss and gradient (the
test suite checks that); none skips work the other must do. It prints the median of ``--reps``
alternating repetitions, each variant's speed-up over the baseline and the fast path's distance
to its FLOP floor: the FLOPs the loss needs (each row up to its last weighted target, the
vocabulary projection only at weighted targets, causal attention; x3 for the backward), over the
machine's fp32 matmul throughput (best of 20 1024^2 matmuls, same thread count).

    python bench/organism_step.py [--threads 2] [--steps 5] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per timed run")
    ap.add_argument("--reps", type=int, default=3, help="alternating repetitions")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from circuitdiff.organisms import data as D
    from circuitdiff.organisms.config import Recipe
    from circuitdiff.organisms.losses import answer_cue_ids, loss_extents, loss_weights, tensorize
    from circuitdiff.organisms.models import make_model
    from circuitdiff.organisms.stages import train_step

    tok = D.build_tokenizer()
    recipe = Recipe()
    bind, grow = recipe.base_phases[:2]
    batches = {  # name: (one document list per step, loss weight of the non-answer tokens)
        "base bind (batch 64)": (
            [D.base_corpus(bind.batch_size, s, box_weights=bind.box_weights,
                           gap_frac=bind.gap_frac) for s in range(args.steps)], bind.other_weight),
        "base grow (batch 64)": (
            [D.base_corpus(grow.batch_size, s, box_weights=grow.box_weights,
                           gap_frac=grow.gap_frac) for s in range(args.steps)], grow.other_weight),
        "aux fine-tune (batch 32)": (
            [D.aux_corpus(recipe.aux.batch_size, s) for s in range(args.steps)],
            recipe.aux.other_weight),
    }
    variants = {"baseline (sdpa, 1 padded batch)": ("sdpa", False),
                "eager attention": ("eager", False),
                "fast step": ("sdpa", True),
                "both (the recipe)": ("eager", True)}
    cue = answer_cue_ids(tok)
    model = make_model(tok, recipe.model, 1)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    peak = min((lambda t0: (a @ b, time.perf_counter() - t0)[1])(time.perf_counter())
               for _ in range(20))
    peak = 2 * 1024 ** 3 / peak
    spec = recipe.model
    head_dim = spec.hidden_size // spec.num_attention_heads
    unembed = model.get_output_embeddings().weight.numel()
    decoder_matmul = sum(p.numel() for n, p in model.named_parameters()
                         if p.dim() == 2 and "embed_tokens" not in n) - unembed
    print(f"organism {spec.num_hidden_layers} layers x {spec.hidden_size} wide, "
          f"{(decoder_matmul + unembed) / 1e6:.2f}M matmul parameters; {args.threads} thread(s), "
          f"{args.steps} steps per run, median of {args.reps} alternating reps; "
          f"matmul peak {peak / 1e9:.0f} GFLOP/s")
    for name, (docs, other_weight) in batches.items():
        # the floor: the work the loss needs. Each row up to its last weighted target (the
        # positions that predict a weighted token), the vocabulary projection at those targets
        # alone, causal attention within the row; forward + backward = 3x the forward's FLOPs
        flops, real, padded = 0.0, 0, 0
        for d in docs:
            ids, mask, labels = tensorize(d, tok)
            weights = loss_weights(ids, labels, cue, other_weight)
            w = weights[:, 1:] > 0
            needed = (loss_extents(weights) - 1).clamp_min(0)  # positions that predict
            flops += 6 * (decoder_matmul * needed.sum().item() + unembed * w.sum().item())
            flops += sum(6 * 2 * spec.num_attention_heads * head_dim * n * (n + 1) / 2
                         * spec.num_hidden_layers for n in needed.tolist())
            real += int(mask.sum())
            padded += mask.numel()
        times: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.reps):
            for v, (attn, fast) in variants.items():
                model.config._attn_implementation = attn
                start = time.perf_counter()
                for d in docs:
                    train_step(model, tok, opt, params, d, cue, other_weight, 1e-4, fast=fast)
                times[v].append((time.perf_counter() - start) / len(docs))
        med = {v: statistics.median(t) for v, t in times.items()}
        base = med[next(iter(variants))]
        print(f"\n{name}: {real / len(docs):.0f} real tokens per step "
              f"({100 * (1 - real / padded):.0f}% of a padded batch is padding)")
        for v, t in med.items():
            print(f"  {v:34s} {t * 1e3:7.1f} ms/step   x{base / t:.2f}")
        floor = flops / len(docs) / peak
        print(f"  FLOP floor {floor * 1e3:.1f} ms/step: the recipe's step is "
              f"{med['both (the recipe)'] / floor:.1f}x the floor")


if __name__ == "__main__":
    main()
