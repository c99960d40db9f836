"""Attribution: a first-order (gradient) estimate of path-patching scores for every head at once,
and :func:`compare_scores` to check an estimate against exact scores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ...core.interventions import (Hook, Read, StopAfter, gather_positions, run_with_edits,
                                   scatter_positions)
from ...core.metrics import answer_prob, logits_at_last
from ...core.model import LoadedModel
from ...core.task import Prompt
from .exact import CaptureCache, _digest, _model_state
from .common import (PatchRequest, PathPatchingError, _check_sets, _encode_checked,
                     role_positions)


def attribution_scores(loaded: LoadedModel, clean: Sequence[Prompt],
                       counterfactual: Sequence[Prompt], request: PatchRequest = PatchRequest(),
                       *, batch_size: int = 32, progress: bool = False,
                       with_se: bool = False, cache: "CaptureCache | None" = None,
                       desc: str = "attribution"
                       ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """First-order estimate of :func:`path_patching_scores` for every head at once (the
    request's senders are ignored: every head is estimated).

    ``score ≈ mean_b (z_cf - z) · ∂ log p(answer) / ∂z`` along the path: pass 2's gradient
    ``g`` with respect to the receiver inputs (one clean forward/backward), then the gradient of
    ``<g, receiver inputs>`` with respect to every head output at ``p`` in a forward where every
    head output at positions ``>= p`` is a constant (so the gradient leaves ``p`` only through the
    residual stream, as pass 1 does). ``d log p = dp / p`` is the linearised relative change.
    Two forward/backward passes per batch, any architecture. ``with_se`` also returns the
    standard error of the mean over prompts (from the per-prompt estimates), so a significance
    rule can use the estimate the way it uses exact scores. ``cache`` (the discovery chain's
    :class:`~.exact.CaptureCache`) keeps each batch's clean and counterfactual head outputs at
    every position, so the later edges of a chain on the same prompts, at any role, skip those
    two forwards.

    Under ``torchrun`` (every rank calling with the same arguments) the prompt batches are dealt
    to the ranks — every head is estimated in one backward, so the batches, not the senders,
    are the parallel unit; each batch's contribution is gathered and they are summed in batch
    order on every rank, so the estimate is bit-identical to one process's.
    """
    from ...core import distributed

    arch = loaded.arch
    req = PatchRequest(request.position, request.receivers, request.kind).resolve(arch)
    _check_sets(loaded, clean, counterfactual)
    model, dev = loaded.model, loaded.device
    L, H = arch.n_layers, arch.n_heads
    from tqdm.auto import tqdm

    n_batches = (len(clean) + batch_size - 1) // batch_size
    mine = distributed.dealt(n_batches)
    # this rank's batches: sum and sum of squares of the per-prompt estimates
    parts = torch.zeros(len(mine), 2, L, H, dtype=torch.float64)
    for j, b in enumerate(tqdm(mine, desc=desc, disable=not progress, unit="batch")):
        i = b * batch_size
        bc, bx = _encode_checked(loaded, clean[i:i + batch_size],
                                 counterfactual[i:i + batch_size], req.position)
        inputs_c, inputs_x = bc.model_inputs(dev), bx.model_inputs(dev)
        p = role_positions(bc, req.position).to(dev)  # [B, P]
        last = bc.positions["last"].to(dev)
        answers = bc.answer_ids.to(dev)
        def reads() -> tuple[Read, Read]:
            with torch.no_grad():
                # every position of both runs: one capture serves the edges at every role
                rc, rx = Read(list(range(L)), None, "head"), Read(list(range(L)), None, "head")
                run_with_edits(model, inputs_c, [rc], arch)
                run_with_edits(model, inputs_x, [rx], arch)
            return rc, rx
        if cache is None:
            rc, rx = reads()
        else:
            key = ("attribution reads", _model_state(model),
                   _digest(bc.input_ids, bc.attention_mask, bx.input_ids, bx.attention_mask))
            rc, rx = cache.get(key, reads, lambda v: sum(
                t.numel() * t.element_size() for r in v for t in r.out.values()), dev)
        recv_layers = req.recv_layers()
        with torch.enable_grad():
            grads = {}
            if recv_layers:  # g = d sum_b log p_b / d receiver input at p (clean run)
                leaves = {}

                def leaf_hook(lr):
                    def fn(x4):
                        leaves[lr] = gather_positions(x4, p).detach().requires_grad_(True)
                        return scatter_positions(x4, p, leaves[lr])
                    return fn
                logits = logits_at_last(
                    model, inputs_c, last,
                    [Hook(lr, leaf_hook(lr), req.kind) for lr in recv_layers], arch)
                obj = answer_prob(logits, answers).log().sum()
                gs = torch.autograd.grad(obj, [leaves[lr] for lr in recv_layers])
                for lr, g in zip(recv_layers, gs):
                    grads[lr] = g * req.unit_mask(arch, lr).to(dev)[None, None, :, None]
            T = inputs_c["input_ids"].shape[1]
            from_p = (torch.arange(T, device=dev)[None, :] >= p.min(1).values[:, None]
                      )[:, :, None, None]
            zleaves = {}

            def freeze_hook(l):
                def fn(x4):
                    frozen = torch.where(from_p, rc.out[l].to(x4.dtype), x4)
                    zleaves[l] = gather_positions(frozen, p).detach().requires_grad_(True)
                    return scatter_positions(frozen, p, zleaves[l])
                return fn
            edits = [Hook(l, freeze_hook(l), "head") for l in range(L)]
            if recv_layers:  # nothing above the last receiver layer matters: stop there
                read = Read(recv_layers, p, req.kind, detach=False)
                run_with_edits(model, inputs_c, edits + [read, StopAfter(max(recv_layers))],
                               arch)
                obj = sum((read.out[lr].float() * grads[lr].float()).sum() for lr in recv_layers)
            else:
                logits = logits_at_last(model, inputs_c, last, edits, arch)
                obj = answer_prob(logits, answers).log().sum()
            reached = sorted(zleaves)  # layers above a stop have no leaf (their score is 0)
            gz = torch.autograd.grad(obj, [zleaves[l] for l in reached], allow_unused=True)
        for l, g in zip(reached, gz):
            if g is None:
                continue
            delta = (gather_positions(rx.out[l], p) - gather_positions(rc.out[l], p)).float()
            per_prompt = (delta * g.float()).sum(-1).sum(1).double().cpu()     # [B, H]
            parts[j, 0, l] += per_prompt.sum(0)
            parts[j, 1, l] += (per_prompt ** 2).sum(0)
    total = torch.zeros(2, L, H, dtype=torch.float64)
    for part in distributed.gather_dealt(parts, n_batches):  # batch order, as one process adds
        total += part
    n = len(clean)
    mean = total[0] / n
    if not with_se:
        return mean.float()
    var = ((total[1] - n * mean ** 2) / max(1, n - 1)).clamp(min=0)
    return mean.float(), (var / n).sqrt().float()



@dataclass
class ScoreComparison:
    """How well an estimate ranks heads compared with exact scores."""

    spearman: float
    topk_recall: float
    k: int

    def to_dict(self) -> dict:
        return {"spearman": self.spearman, "topk_recall": self.topk_recall, "k": self.k}

    def __str__(self) -> str:
        return f"Spearman {self.spearman:.3f}, top-{self.k} recall {self.topk_recall:.2f}"


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank)."""
    x = x.double()
    order = torch.argsort(x, stable=True)
    sx = x[order]
    ranks = torch.empty_like(x)
    _, inv, counts = torch.unique_consecutive(sx, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    mean_rank = starts.double() + (counts.double() - 1) / 2
    ranks[order] = mean_rank[inv]
    return ranks


def compare_scores(estimate: torch.Tensor, exact: torch.Tensor, k: int) -> ScoreComparison:
    """Spearman rank correlation over heads and recall of the exact top-``k`` (most negative)
    among the estimate's top-``k``. Heads whose exact score is NaN are left out."""
    if estimate.shape != exact.shape:
        raise PathPatchingError(f"estimate {tuple(estimate.shape)} and exact "
                                f"{tuple(exact.shape)} scores differ in shape")
    keep = torch.isfinite(exact.flatten()) & torch.isfinite(estimate.flatten())
    e, x = estimate.flatten()[keep], exact.flatten()[keep]
    if len(e) < 2:
        raise PathPatchingError("need at least two scored heads to compare")
    re, rx = _ranks(e), _ranks(x)
    re, rx = re - re.mean(), rx - rx.mean()
    den = float(re.norm() * rx.norm())
    rho = max(-1.0, min(1.0, float((re * rx).sum()) / den)) if den > 0 else float("nan")
    k = min(k, len(e))
    top_e = set(torch.argsort(e.double(), stable=True)[:k].tolist())
    top_x = set(torch.argsort(x.double(), stable=True)[:k].tolist())
    return ScoreComparison(rho, len(top_e & top_x) / k, k)
