"""Task accuracy: argmax over the full vocabulary at *last* equals the answer token.

Also reported, as a diagnostic, the accuracy restricted to the objects present in the prompt
(argmax over those ``n_boxes`` tokens only). Both come from :mod:`circuitdiff.core.metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..core.metrics import correct, last_logits
from ..core.model import LoadedModel
from ..core.task import Batch, Prompt, batches


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


@torch.no_grad()
def evaluate_accuracy(loaded: LoadedModel, prompts: Sequence[Prompt], batch_size: int = 32,
                      progress: bool = False,
                      edits_for: Callable[[Batch], Sequence] | None = None) -> AccuracyResult:
    """Accuracy of ``loaded`` on ``prompts``; ``edits_for(batch)`` adds interventions per batch."""
    if not prompts:
        raise ValueError("no prompts to evaluate")
    from tqdm.auto import tqdm

    hits, in_ctx, preds = [], [], []
    for batch in tqdm(batches(prompts, loaded.tokenizer, batch_size),
                      desc=f"accuracy {loaded.name}", disable=not progress, unit="batch"):
        if bool((batch.answer_ids < 0).any()):
            raise ValueError("accuracy needs prompts whose query names a box")
        logits = last_logits(loaded, batch, edits_for(batch) if edits_for else ())
        hits += correct(logits, batch, "accuracy").tolist()
        in_ctx += correct(logits, batch, "in_context").tolist()
        preds += logits.argmax(-1).tolist()
    n = len(hits)
    return AccuracyResult(sum(hits) / n, sum(in_ctx) / n, n, hits, preds)
