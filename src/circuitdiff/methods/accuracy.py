"""Task accuracy: argmax over the full vocabulary at *last* equals the answer token.

Also reported, as a diagnostic, the accuracy restricted to the objects present in the prompt
(argmax over those ``n_boxes`` tokens only). Both come from :mod:`circuitdiff.core.metrics`.

:func:`run` is the method (one model, a typed config, cached in a run folder);
:func:`evaluate_accuracy` is the loop it and every other method (ablation, scan, discovery)
share to measure accuracy under their own interventions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..core.config import execution
from ..core.metrics import correct, last_logits
from ..core.model import LoadedModel
from ..core.runs import RunFolder, model_tag, settings_digest
from ..core.task import Batch, Prompt, TaskSample, batches
from .base import Result, as_store, cached_result


@dataclass
class AccuracyConfig(TaskSample):
    """The prompts accuracy is measured on (when none are given) and how they are batched.

    ``n_prompts`` prompts of ``n_boxes`` boxes drawn with ``seed`` (:class:`TaskSample`);
    ``batch_size`` prompts per forward (execution only).
    """

    batch_size: int = execution(32)

    def __post_init__(self) -> None:
        self.check_at_least(("n_prompts", "n_boxes", "batch_size"), prefix="AccuracyConfig: ")


@dataclass
class AccuracyResult(Result):
    """Accuracy over a prompt set, plus per-prompt correctness and predictions."""

    accuracy: float
    in_context_accuracy: float
    n: int
    correct: list[bool] = field(repr=False, default_factory=list)
    predictions: list[int] = field(repr=False, default_factory=list)

    def summary(self) -> dict:
        """The three numbers (no per-prompt lists)."""
        return {"accuracy": self.accuracy, "in_context_accuracy": self.in_context_accuracy,
                "n": self.n}


def prompts_key(prompts: Sequence[Prompt] | None) -> dict:
    """Cache-key entry for prompts given explicitly (empty when the config draws its own)."""
    if prompts is None:
        return {}
    from ..core.config import _plain

    return {"prompts": settings_digest([_plain(p) for p in prompts])}


@torch.no_grad()
def evaluate_accuracy(loaded: LoadedModel, prompts: Sequence[Prompt], batch_size: int = 32,
                      progress: bool = False,
                      edits_for: Callable[[Batch], Sequence] | None = None) -> AccuracyResult:
    """Accuracy of ``loaded`` on ``prompts``; ``edits_for(batch)`` adds interventions per batch
    (the shared measuring loop; the method with a config and a cache is :func:`run`)."""
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


def run(model: LoadedModel, prompts: Sequence[Prompt] | None, config: AccuracyConfig, *,
        store: "RunFolder | str | None" = None, progress: bool | None = None) -> AccuracyResult:
    """Accuracy of ``model`` on ``prompts`` (``None``: the config's own prompts), cached in
    ``store`` as ``accuracy/<model>.json`` under the model name and the config's settings."""
    folder = as_store(store)
    key = {"model": model.name, **config.cache_key(), **prompts_key(prompts)}
    ps = config.prompts(model.tokenizer) if prompts is None else list(prompts)
    return cached_result(folder, f"accuracy/{model_tag(model.name)}.json", key,
                         lambda: evaluate_accuracy(model, ps, config.batch_size, bool(progress)),
                         AccuracyResult)


__all__ = ["AccuracyConfig", "AccuracyResult", "evaluate_accuracy", "prompts_key", "run"]
