"""Task accuracy: argmax over the full vocabulary at *last* equals the answer token.

Also reported, as a diagnostic, the accuracy restricted to the objects present in the prompt
(argmax over those ``n_boxes`` tokens only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .interventions import run
from .model import LoadedModel
from .task import Batch, Prompt, encode


def last_logits(loaded: LoadedModel, batch: Batch, edits: Sequence = ()) -> torch.Tensor:
    """Logits ``[B, vocab]`` at each sample's *last* position, with ``edits`` applied."""
    inputs = {k: v.to(loaded.device) for k, v in batch.model_inputs().items()}
    last = batch.positions["last"].to(loaded.device)
    T = inputs["input_ids"].shape[1]
    if bool((last == T - 1).all()):  # left padding: only compute the final position's logits
        logits = run(loaded.model, inputs, edits, loaded.arch, logits_to_keep=1)
        return None if logits is None else logits[:, -1]
    logits = run(loaded.model, inputs, edits, loaded.arch)
    return None if logits is None else logits[torch.arange(len(last), device=last.device), last]


@dataclass
class AccuracyResult:
    """Accuracy over a prompt set, plus per-prompt predictions for inspection."""

    accuracy: float
    in_context_accuracy: float
    n: int
    correct: list[bool] = field(repr=False, default_factory=list)
    predictions: list[int] = field(repr=False, default_factory=list)

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "in_context_accuracy": self.in_context_accuracy,
                "n": self.n}


def batches(prompts: Sequence[Prompt], tokenizer, batch_size: int) -> list[Batch]:
    """Encode ``prompts`` in left-padded chunks of ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [encode(prompts[i:i + batch_size], tokenizer)
            for i in range(0, len(prompts), batch_size)]


@torch.no_grad()
def evaluate_accuracy(loaded: LoadedModel, prompts: Sequence[Prompt], batch_size: int = 32,
                      progress: bool = False,
                      edits_for: Callable[[Batch], Sequence] | None = None) -> AccuracyResult:
    """Accuracy of ``loaded`` on ``prompts``; ``edits_for(batch)`` adds interventions per batch."""
    if not prompts:
        raise ValueError("no prompts to evaluate")
    from tqdm.auto import tqdm

    correct, in_ctx, preds = [], [], []
    for batch in tqdm(batches(prompts, loaded.tokenizer, batch_size), desc="accuracy",
                      disable=not progress, unit="batch"):
        if bool((batch.answer_ids < 0).any()):
            raise ValueError("accuracy needs prompts whose query names a box")
        logits = last_logits(loaded, batch, edits_for(batch) if edits_for else ())
        dev = logits.device
        ans = batch.answer_ids.to(dev)
        pred = logits.argmax(-1)
        objs = batch.object_ids.to(dev)
        obj_logits = logits.gather(1, objs.clamp(min=0)).masked_fill(objs < 0, float("-inf"))
        ctx_pred = objs.gather(1, obj_logits.argmax(-1, keepdim=True))[:, 0]
        correct += (pred == ans).tolist()
        in_ctx += (ctx_pred == ans).tolist()
        preds += pred.tolist()
    n = len(correct)
    return AccuracyResult(sum(correct) / n, sum(in_ctx) / n, n, correct, preds)
