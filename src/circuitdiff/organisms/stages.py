"""One optimizer step, the learning-rate schedule, and a fine-tune stage (full, lora, chat).

The base's gated pre-training (:mod:`.phases`) takes its steps and schedule from here too."""

from __future__ import annotations

import math

import torch

from circuitdiff.organisms.config import Phase, StageSpec
from circuitdiff.organisms.losses import (answer_cue_ids, grouped_loss_backward, loss_weights,
                                          tensorize, weighted_lm_loss)
from circuitdiff.organisms.models import set_seed


def lr_at(step: int, schedule: StageSpec | Phase) -> float:
    """Learning rate at ``step``: a linear warm-up over ``schedule.warmup`` steps, then a cosine
    from ``schedule.lr`` to ``schedule.lr * schedule.min_lr_frac`` over ``schedule.steps``."""
    if step < schedule.warmup:
        return schedule.lr * (step + 1) / schedule.warmup
    t = min(1.0, (step - schedule.warmup) / max(1, schedule.steps - schedule.warmup))
    return schedule.lr * (schedule.min_lr_frac
                          + (1 - schedule.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def train_step(model, tokenizer, opt, params, docs: list[str], answer_cue: list[list[int]],
               other_weight: float, lr: float, fast: bool = True) -> float:
    """One optimizer step on ``docs`` with answer-weighted loss; returns the loss.

    ``fast`` computes the gradient with :func:`~.losses.grouped_loss_backward`, else with its
    naive twin (one padded batch, logits everywhere); both give the same loss and gradient.
    """
    ids, mask, labels = tensorize(docs, tokenizer)
    weights = loss_weights(ids, labels, answer_cue, other_weight)
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    if fast:
        loss = grouped_loss_backward(model, ids, mask, labels, weights)
    else:
        loss_t = weighted_lm_loss(model(input_ids=ids, attention_mask=mask).logits, labels, weights)
        loss_t.backward()
        loss = loss_t.item()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss


def train_stage(model, tokenizer, make_docs, spec: StageSpec, seed: int, desc: str,
                progress: bool = True, log_every: int = 0, eval_fn=None) -> list:
    """Next-token training; ``make_docs(n, seed, progress_frac)`` yields one step's documents.

    Query answers (tokens after an answer cue) weigh 1, every other token ``spec.other_weight``.
    Every ``log_every`` steps (0: never) ``eval_fn(model, step)`` is measured; returns the
    ``(step, loss, eval)`` log.
    """
    from tqdm.auto import tqdm

    answer_cue = answer_cue_ids(tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, betas=(0.9, 0.98),
                            weight_decay=spec.weight_decay)
    model.train()
    set_seed(seed)
    log = []
    n_steps = spec.steps if spec.stop_at is None else min(spec.steps, spec.stop_at)
    bar = tqdm(range(n_steps), desc=desc, disable=not progress, mininterval=2.0)
    ema = None
    for step in bar:
        docs = make_docs(spec.batch_size, seed * 1_000_003 + step, step / spec.steps)
        loss = train_step(model, tokenizer, opt, params, docs, answer_cue, spec.other_weight,
                          lr_at(step, spec))
        ema = loss if ema is None else 0.98 * ema + 0.02 * loss
        bar.set_postfix(loss=f"{ema:.3f}")
        if log_every and eval_fn is not None and (step + 1) % log_every == 0:
            acc = eval_fn(model, step + 1)
            log.append((step + 1, ema, acc))
            model.train()
            if progress:
                bar.write(f"{desc} step {step + 1} loss {ema:.3f} acc {acc}")
    model.eval()
    return log


__all__ = ["lr_at", "train_stage", "train_step"]
