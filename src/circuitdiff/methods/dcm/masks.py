"""The DCM engine: head outputs mixed with counterfactual values under per-row masks.

For a set of heads ``U`` read at one named position, row ``r`` of a forward gets, at that position
of its base prompt, head output ``m[r, u] * current + (1 - m[r, u]) * value[r, u]`` for every
``u`` in ``U`` (:class:`~circuitdiff.core.interventions.Write` in ``mode="mix"``, a forward
pre-hook on ``o_proj`` so LoRA deltas on ``o_proj`` stay). ``m = 1`` is the model, ``m = 0`` a
plain activation patch, and the mix is differentiable in ``m`` — the same forward serves mask
training, binarised evaluation, random head sets and functional patching across models.

Speed:
* counterfactual activations are read only at the group's position and only for the heads in
  ``U`` (``[N, |U|, head_dim]``), the forward stopped after the last layer needed;
* many mask rows share one base prompt (rows are sample-major: row ``b * K + k`` is mask ``k`` on
  sample ``b``): the tokens before the patched position are identical for all ``K`` rows, so they
  run once per sample without gradients and their keys/values are repeated for the rows; only the
  suffix from the patched position on (one token for a group at ``last``) runs with gradients,
  ``K`` times. Samples are grouped by patched position, so each runs its own shortest suffix.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ...core.circuit import Head
from ...core.interventions import Read, StopAfter, Write, intervene, run_with_edits
from ...core.model import LoadedModel
from ...core.task import Batch


class DCMError(ValueError):
    """Raised when mask training cannot go on (non-finite loss, bad shapes...)."""


def take(batch: Batch, index: torch.Tensor | slice) -> Batch:
    """The rows ``index`` of ``batch`` (positions stay valid: padding columns are kept)."""
    return batch._map(lambda t: t[index])


def _layer_plan(heads: Sequence[Head]) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Per layer touched: (layer, head indices within the layer, slots of those heads in U)."""
    plan: dict[int, tuple[list[int], list[int]]] = {}
    for slot, (layer, head) in enumerate(heads):
        units, slots = plan.setdefault(layer, ([], []))
        units.append(head)
        slots.append(slot)
    return [(layer, torch.tensor(u), torch.tensor(s)) for layer, (u, s) in sorted(plan.items())]


@torch.no_grad()
def counterfactual_values(loaded: LoadedModel, counterfactual: Batch, position: str,
                          heads: Sequence[Head], batch_size: int = 32) -> torch.Tensor:
    """``[N, |heads|, head_dim]``: each head's output at each counterfactual's own ``position``."""
    plan = _layer_plan(heads)
    layers = [layer for layer, _, _ in plan]
    out = torch.empty(len(counterfactual), len(heads), loaded.arch.head_dim)
    for start in range(0, len(counterfactual), batch_size):
        chunk = take(counterfactual, slice(start, start + batch_size))
        read = Read(layers, chunk.positions[position].to(loaded.device))
        run_with_edits(loaded.model, chunk.model_inputs(loaded.device),
                       [read, StopAfter(max(layers))], loaded.arch)
        for layer, units, slots in plan:
            out[start:start + len(chunk), slots] = read.out[layer][:, 0, units].float().cpu()
    return out


def patched_last_logits(loaded: LoadedModel, base: Batch, position: str, heads: Sequence[Head],
                        values: torch.Tensor, masks: torch.Tensor, repeats: int,
                        prefix_cache: bool = True) -> torch.Tensor:
    """Logits ``[B * repeats, vocab]`` at *last* with the heads ``U`` mixed at ``position``.

    ``values`` ``[R, |U|, head_dim]`` and ``masks`` ``[R, |U|]`` are per row, ``R = B * repeats``,
    sample-major (row ``b * repeats + k`` runs sample ``b``). ``base`` must be left-padded (its
    *last* is the final column, as :func:`~circuitdiff.core.task.encode` makes it).

    ``prefix_cache``: samples are grouped by their patched position ``p`` (one group for *last*;
    one per queried box for the previous query label); in each group the tokens before ``p`` run
    once per sample without gradient and their keys/values serve all ``repeats`` rows, so only
    tokens ``p..last`` run per row. The groups' logits are put back in row order (one autograd
    graph, so a loss over all rows is the same as without grouping).
    """
    B, T = base.input_ids.shape
    R = B * repeats
    if values.shape[:2] != (R, len(heads)) or masks.shape != (R, len(heads)):
        raise DCMError(f"values {tuple(values.shape)} / masks {tuple(masks.shape)} do not match "
                       f"{R} rows x {len(heads)} heads")
    if not bool((base.positions["last"] == T - 1).all()):
        raise DCMError("base prompts must be left-padded (their last token in the final column)")
    pos = base.positions[position]
    if bool((pos < 0).any()):
        raise DCMError(f"some base prompts have no {position} token")
    if not prefix_cache:
        return _patched_suffix(loaded, base, position, heads, values, masks, repeats, 0)
    parts, order = [], []
    for split in pos.unique().tolist():
        samples = (pos == split).nonzero()[:, 0]
        rows = (samples[:, None] * repeats + torch.arange(repeats)).reshape(-1)
        parts.append(_patched_suffix(loaded, take(base, samples), position, heads, values[rows],
                                     masks[rows], repeats, int(split)))
        order.append(rows)
    inverse = torch.empty(R, dtype=torch.long)
    inverse[torch.cat(order)] = torch.arange(R)
    return torch.cat(parts)[inverse.to(parts[0].device)]


def _patched_suffix(loaded: LoadedModel, base: Batch, position: str, heads: Sequence[Head],
                    values: torch.Tensor, masks: torch.Tensor, repeats: int,
                    split: int) -> torch.Tensor:
    """:func:`patched_last_logits` for samples whose patched positions are all >= ``split``:
    tokens before ``split`` run once per sample (no gradient) into a key/value cache repeated for
    the rows; tokens from ``split`` on run per row with the edits."""
    model, arch, dev = loaded.model, loaded.arch, loaded.device
    R = len(base) * repeats
    ids, attn, pids = (t.to(dev) for t in (base.input_ids, base.attention_mask, base.position_ids))
    rows = lambda t: t.repeat_interleave(repeats, 0)  # noqa: E731
    cache = None
    if split > 0:
        with torch.no_grad():
            cache = model(input_ids=ids[:, :split], attention_mask=attn[:, :split],
                          position_ids=pids[:, :split], use_cache=True).past_key_values
        cache.batch_repeat_interleave(repeats)
    rel = rows(base.positions[position].to(dev) - split)
    edits = []
    for layer, units, slots in _layer_plan(heads):
        units, slots = units.to(dev), slots.to(dev)
        m = torch.ones(R, arch.n_heads, dtype=masks.dtype, device=dev).index_copy(
            1, units, masks.to(dev)[:, slots])
        v = torch.zeros(R, arch.n_heads, values.shape[-1], dtype=values.dtype,
                        device=dev).index_copy(1, units, values.to(dev)[:, slots])
        edits.append(Write(layer, v[:, None], rel, kind="head", mode="mix", m=m[:, None]))
    with intervene(model, edits, arch):
        out = model(input_ids=rows(ids[:, split:]), attention_mask=rows(attn),
                    position_ids=rows(pids[:, split:]), past_key_values=cache, use_cache=False,
                    logits_to_keep=1)
    return out.logits[:, -1]


def _rows_of(per_kind: torch.Tensor, kinds: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``per_kind[kinds[k], idx[b]]`` laid out sample-major as rows ``b * K + k``."""
    picked = per_kind[:, idx][kinds]                      # [K, B, ...]
    return picked.transpose(0, 1).reshape(-1, *picked.shape[2:])


def train_masks(loaded: LoadedModel, base: Batch, position: str, heads: Sequence[Head],
                values: torch.Tensor, targets: torch.Tensor, lambdas: Sequence[float],
                lr: float = 0.1, epochs: int = 2, batch_size: int = 32, seed: int = 0,
                prefix_cache: bool = True, label: str = "",
                on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Masks ``[len(lambdas), D, |U|]`` trained for ``D`` desiderata and every λ at once.

    ``values`` ``[D, N, |U|, head_dim]`` and ``targets`` ``[D, N]`` give each desideratum's
    counterfactual head outputs and target token per base prompt. One mask vector per
    (λ, desideratum), init 1, trained with Adam on
    ``mean(-logit[target]) + λ * sum(1 - m)`` and clamped to ``[0, 1]`` after every step (each
    mask only moves rows of its own, so summing the losses trains them independently in one
    forward). Model weights get no gradient. A non-finite loss stops with the step and batch.
    """
    D, N = targets.shape
    K = len(lambdas) * D
    params = torch.ones(K, len(heads), requires_grad=True)
    lam = torch.tensor([float(x) for x in lambdas]).repeat_interleave(D)   # k = i_lambda * D + d
    kinds = torch.arange(K) % D
    opt = torch.optim.Adam([params], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(N, generator=gen)
        for nb, start in enumerate(range(0, N, batch_size)):
            idx = order[start:start + batch_size]
            vals = _rows_of(values, kinds, idx)
            tgt = _rows_of(targets, kinds, idx).to(loaded.device)
            logits = patched_last_logits(loaded, take(base, idx), position, heads, vals,
                                         params.repeat(len(idx), 1), K, prefix_cache)
            target_logit = logits.float().gather(1, tgt[:, None])[:, 0].view(len(idx), K)
            loss = -target_logit.mean(0).sum() + (lam * (1 - params).sum(1)).sum()
            if not bool(torch.isfinite(loss)):
                raise DCMError(f"DCM loss is {loss.item()} at step {step} (epoch {epoch + 1}, "
                               f"batch {nb + 1}){' for ' + label if label else ''}: the model's "
                               f"logits overflow; run in float32 (--dtype float32) or lower --lr")
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                params.clamp_(0.0, 1.0)
            step += 1
            if on_step is not None:
                on_step(step)
    return params.detach().view(len(lambdas), D, len(heads))


@torch.no_grad()
def target_hits(loaded: LoadedModel, base: Batch, position: str, heads: Sequence[Head],
                values: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor,
                kinds: torch.Tensor, batch_size: int = 32,
                prefix_cache: bool = True) -> torch.Tensor:
    """Bool ``[K, N]``: does prompt n say the target (argmax over the full vocabulary at *last*,
    the task's accuracy) for mask row ``k`` of ``masks`` ``[K, |U|]``, row ``k`` using desideratum
    ``kinds[k]``'s counterfactual values ``values[kinds[k]]`` and targets ``targets[kinds[k]]``."""
    K = masks.shape[0]
    N = targets.shape[1]
    out = torch.zeros(K, N, dtype=torch.bool)
    for start in range(0, N, batch_size):
        idx = torch.arange(start, min(N, start + batch_size))
        logits = patched_last_logits(loaded, take(base, idx), position, heads,
                                     _rows_of(values, kinds, idx), masks.repeat(len(idx), 1), K,
                                     prefix_cache)
        tgt = _rows_of(targets, kinds, idx).to(logits.device)
        out[:, idx] = (logits.argmax(-1) == tgt).view(len(idx), K).T.cpu()
    return out


def target_accuracy(loaded: LoadedModel, base: Batch, position: str, heads: Sequence[Head],
                    values: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor,
                    kinds: torch.Tensor, batch_size: int = 32,
                    prefix_cache: bool = True) -> torch.Tensor:
    """Accuracy ``[K]`` of the target for each mask row (the mean of :func:`target_hits`)."""
    return target_hits(loaded, base, position, heads, values, targets, masks, kinds, batch_size,
                       prefix_cache).float().mean(1)
