"""The task's metrics, one implementation each, used by every method.

* :func:`logits_at_last` / :func:`last_logits` — logits ``[B, vocab]`` at each prompt's *last*
  position (with left padding only the final position's logits are computed);
* :func:`answer_prob` — softmax probability of the answer (path patching's metric);
* :func:`correct` — argmax over the full vocabulary equals the answer (``"accuracy"``), or the
  argmax over the prompt's own objects does (``"in_context"``, a finer diagnostic on weak models).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .arch import Architecture
from .interventions import run_with_edits
from .task import Batch

METRICS = ("accuracy", "in_context")


def logits_at_last(model: nn.Module, inputs: dict[str, torch.Tensor], last: torch.Tensor,
                   edits: Sequence = (), arch: Architecture | None = None) -> torch.Tensor | None:
    """``[B, V]`` logits at ``last`` (per sample) with ``edits`` applied; ``None`` when an edit
    stops the forward before the logits."""
    T = inputs["input_ids"].shape[1]
    if bool((last == T - 1).all()):  # left padding: only compute the final position's logits
        logits = run_with_edits(model, inputs, edits, arch, logits_to_keep=1)
        return None if logits is None else logits[:, -1]
    logits = run_with_edits(model, inputs, edits, arch)
    if logits is None:
        return None
    return logits[torch.arange(len(last), device=logits.device), last.to(logits.device)]


def last_logits(loaded, batch: Batch, edits: Sequence = ()) -> torch.Tensor | None:
    """Logits ``[B, vocab]`` of ``loaded`` (a :class:`~circuitdiff.core.model.LoadedModel`) at
    each sample's *last* position, with ``edits`` applied."""
    return logits_at_last(loaded.model, batch.model_inputs(loaded.device),
                          batch.positions["last"].to(loaded.device), edits, loaded.arch)


def answer_prob(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Softmax probability of ``answers`` under ``logits`` ``[..., B, V]`` (float32)."""
    lp = logits.float().log_softmax(-1)
    idx = answers.to(lp.device).expand(*lp.shape[:-1])[..., None]
    return lp.gather(-1, idx)[..., 0].exp()


def in_context_prediction(logits: torch.Tensor, object_ids: torch.Tensor) -> torch.Tensor:
    """Per row, the prompt's object (``object_ids``, ``-1`` = no object) with the largest logit."""
    objs = object_ids.to(logits.device)
    obj_logits = logits.gather(1, objs.clamp(min=0)).masked_fill(objs < 0, float("-inf"))
    return objs.gather(1, obj_logits.argmax(-1, keepdim=True))[:, 0]


def correct(logits: torch.Tensor, batch: Batch, metric: str = "accuracy") -> torch.Tensor:
    """Bool per row: is the prediction of ``metric`` (see :data:`METRICS`) the answer."""
    answers = batch.answer_ids.to(logits.device)
    if metric == "accuracy":
        return logits.argmax(-1) == answers
    if metric == "in_context":
        return in_context_prediction(logits, batch.object_ids) == answers
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
