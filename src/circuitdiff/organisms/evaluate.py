"""The organisms' accuracy probe: the task accuracy of :mod:`circuitdiff.methods.accuracy` on
a raw (training) model, with the prompts drawn the recipe's way."""

from __future__ import annotations

import torch

from circuitdiff.core.arch import resolve
from circuitdiff.core.model import LoadedModel
from circuitdiff.core.task import EntityTrackingTask, TaskConfig
from circuitdiff.methods.accuracy import evaluate_accuracy
from circuitdiff.organisms.config import EVAL_BOXES


@torch.no_grad()
def accuracy(model, tokenizer, n: int = 500, seed: int = 0, n_boxes: int = EVAL_BOXES,
             batch_size: int = 250) -> float:
    """Argmax-over-vocabulary accuracy at the last token on ``n`` evaluation-template prompts of
    ``n_boxes`` boxes drawn with ``seed``; ``model`` is put in eval mode for the measurement
    and left in the mode it was in."""
    prompts = EntityTrackingTask(tokenizer, TaskConfig(n_boxes=n_boxes), seed=seed).sample(
        n, seed=seed)
    was_training = model.training
    model.eval()
    loaded = LoadedModel(model, tokenizer, resolve(model), "organism in training")
    result = evaluate_accuracy(loaded, prompts, batch_size)
    model.train(was_training)
    return result.accuracy


__all__ = ["accuracy"]
