"""CMAP's engine: record the source's activations a plan needs (cached as one safetensors
file per direction), then run the target clean and with every variant patched in.

All edits are :class:`~circuitdiff.core.interventions.Write` edits with index tensors and
``where`` masks; many output-CMAP variants run in one forward, stacked along the batch.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ...core.arch import Architecture
from ...core.interventions import Read, Write
from ...core.metrics import correct, last_logits
from ...core.model import LoadedModel
from ...core.pool import ModelPool
from ...core.runs import RunFolder, model_tag, settings_digest
from ...core.task import Batch, Prompt, batches
from .patches import (Endpoint, InputPatch, OutputPatch, _key_positions, _kv_mask, _Plan, _q_mask,
                      _slots, position_index)

#: why the models of a CMAP pool must share a head grid and a tokenizer (ends the pool's error)
SAME_SHAPE_WHY = ("CMAP needs a fine-tune of its base's architecture that kept its base's "
                  "tokenizer")


def cmap_pool(refs: Sequence = (), load: Callable[[str], LoadedModel] | None = None) -> ModelPool:
    """A pool handing out CMAP's models one at a time, each checked against the first (same
    head grid, same tokenizer)."""
    return ModelPool(list(refs), load, same_shape=True, why=SAME_SHAPE_WHY)


# -- recording the source ------------------------------------------------------------------------
@torch.no_grad()
def _record_batch(loaded: LoadedModel, batch: Batch, plan: _Plan) -> dict[str, torch.Tensor]:
    """The source's activations a batch needs, its correctness and a logits fingerprint."""
    edits: list = []
    head_read = None
    if plan.layers:
        slots, _ = _slots(batch, plan.slot_names)
        head_read = Read(plan.layers, slots, "head")
        edits.append(head_read)
    input_reads = {}
    for (pos, c), layers in plan.input_sites.items():
        at = position_index(batch, pos) if c == "q" else _key_positions(batch, pos)
        input_reads[pos, c] = Read(layers, at, c)
    edits += input_reads.values()
    logits = last_logits(loaded, batch, edits)
    out = {"hits": correct(logits, batch).to(torch.uint8).cpu(),
           "fingerprint": _fingerprint(logits).cpu()}
    if head_read is not None:
        for l, t in head_read.out.items():
            out[f"head.{l}"] = t.cpu()
    for (pos, c), r in input_reads.items():
        for l, t in r.out.items():
            out[_input_key(pos, c, l)] = t.cpu()
    return out


def _input_key(position: str, component: str, layer: int) -> str:
    return f"input.{position}.{component}.{layer}"


def _fingerprint(logits: torch.Tensor) -> torch.Tensor:
    """A cheap summary of each row's logits (logsumexp and the first 32): equal for equal models."""
    lf = logits.float()
    return torch.cat([lf.logsumexp(-1, keepdim=True), lf[:, :32]], -1)


def _record(pool: ModelPool, ep: Endpoint, batch_list: Sequence[Batch], plan: _Plan,
            folder: RunFolder | None, settings: dict, progress: bool) -> list[dict[str, torch.Tensor]]:
    """Record ``ep``'s activations for every batch, cached in ``folder`` (one safetensors file)."""
    def compute() -> dict[str, torch.Tensor]:
        from tqdm.auto import tqdm

        flat = {}
        with pool.model(ep.ref, ep.adapter) as loaded:
            for i, b in enumerate(tqdm(batch_list, desc=f"record {ep.name}", disable=not progress,
                                       unit="batch")):
                for k, t in _record_batch(loaded, b, plan).items():
                    flat[f"b{i}.{k}"] = t
        return flat

    if folder is None:
        flat = compute()
    else:
        name = f"cmap/record/{model_tag(ep.name)}-{settings_digest(settings, 10)}.safetensors"
        flat = folder.cached_tensors(name, settings, compute)
    per: list[dict[str, torch.Tensor]] = [{} for _ in batch_list]
    for k, t in flat.items():
        i, rest = k.split(".", 1)
        per[int(i[1:])][rest] = t
    return per


# -- patching the target -------------------------------------------------------------------------
def output_edits(rec: dict[str, torch.Tensor], batch: Batch, plan: _Plan,
                 variants: torch.Tensor) -> list[Write]:
    """Writes patching the recorded head outputs into ``len(variants)`` stacked copies of
    ``batch`` (variant-major rows, as :meth:`Batch.repeat`); ``variants`` indexes ``plan.output``.

    When two named slots are the same token of a sample (``all`` plus ``last``...), their
    ``where`` masks are OR-ed so the scattered values never conflict.
    """
    if not plan.layers:
        return []
    slots, owner = _slots(batch, plan.slot_names)
    k, B = len(variants), len(batch)
    same = (slots[:, :, None] == slots[:, None, :]).float()          # [B, S, S]
    m = plan.masks[variants][:, owner]                                # [k, S, L, H]
    edits = []
    for l in plan.layers:
        ml = m[:, :, l]                                               # [k, S, H]
        if not bool(ml.any()):
            continue
        where = (same[None] @ ml[:, None].float().expand(k, B, *ml.shape[1:])) > 0  # [k,B,S,H]
        vals = rec[f"head.{l}"]
        edits.append(Write(l, vals.repeat(k, *([1] * (vals.dim() - 1))), slots.repeat(k, 1),
                           where.reshape(k * B, *where.shape[2:]), "head"))
    return edits


def input_edits(rec: dict[str, torch.Tensor], clean_heads: dict[int, torch.Tensor], batch: Batch,
                arch: Architecture, ip: InputPatch) -> list[Write]:
    """Writes for one input-CMAP variant: the source's q/k/v of ``ip``'s heads, plus, in layers
    whose k/v is patched, every other head output the patch touches restored to the target's
    clean value (``clean_heads[layer]`` ``[B, T, H, D]``, from an unpatched forward).

    Heads the patch does not touch run live. When a group spans several layers, the restored
    outputs of its later layers are the clean ones, so they do not follow what the earlier
    layers' patch changed upstream (exact when all the group's heads are in one layer)."""
    pos = position_index(batch, ip.position)
    keys = _key_positions(batch, ip.position)
    B, T = batch.input_ids.shape
    edits = []
    for l in ip.layers:
        qm, kvm = _q_mask(arch, ip.heads, l), _kv_mask(arch, ip.heads, l)
        for c in ip.components:
            where, at = (qm, pos) if c == "q" else (kvm, keys)
            edits.append(Write(l, rec[_input_key(ip.position, c, l)], at, where[None, None], c))
        if set(ip.components) & {"k", "v"}:
            touched = kvm[torch.arange(arch.n_heads) // arch.n_groups]            # [H]
            target = torch.zeros(B, T, dtype=torch.bool)
            target[torch.arange(B)[:, None], pos] = True
            keep_patched = target[:, :, None] & qm[None, None]                   # [B, T, H]
            restore = touched[None, None].expand(B, T, -1) & ~keep_patched
            edits.append(Write(l, clean_heads[l], None, restore, "head"))
    return edits


@torch.no_grad()
def _patch(pool: ModelPool, ep: Endpoint, batch_list: Sequence[Batch], plan: _Plan,
           recorded: Sequence[dict[str, torch.Tensor]], max_rows: int, progress: bool
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Run the target ``ep`` clean and with every variant patched in.

    Returns per-prompt correctness of the clean target ``[N]``, of the output variants
    ``[V, N]`` and of the input variants ``[I, N]``, and whether the target's logits equal the
    source's on every prompt (same weights).
    """
    from tqdm.auto import tqdm

    V, I = len(plan.output), len(plan.inputs)
    clean_hits, out_hits, in_hits = [], [], []
    identical = True
    with pool.model(ep.ref, ep.adapter) as loaded:
        arch = loaded.arch
        for b, rec in tqdm(list(zip(batch_list, recorded)), desc=f"patch {ep.name}",
                           disable=not progress, unit="batch"):
            B = len(b)
            clean_read = Read(plan.input_layers, None, "head") if plan.input_layers else None
            logits = last_logits(loaded, b, [clean_read] if clean_read else [])
            clean_hits.append(correct(logits, b).cpu())
            identical &= bool(torch.allclose(_fingerprint(logits).cpu(), rec["fingerprint"],
                                             rtol=0, atol=1e-6))
            rows = torch.zeros(V, B, dtype=torch.bool)
            per = max(1, max_rows // B)
            for s in range(0, V, per):
                idx = torch.arange(s, min(V, s + per))
                big = b.repeat(len(idx))
                lg = last_logits(loaded, big, output_edits(rec, b, plan, idx))
                rows[idx] = correct(lg, big).cpu().view(len(idx), B)
            out_hits.append(rows)
            rows = torch.zeros(I, B, dtype=torch.bool)
            for i, ip in enumerate(plan.inputs):
                clean = clean_read.out if clean_read else {}
                lg = last_logits(loaded, b, input_edits(rec, clean, b, arch, ip))
                rows[i] = correct(lg, b).cpu()
            in_hits.append(rows)
    return (torch.cat(clean_hits), torch.cat(out_hits, 1), torch.cat(in_hits, 1), identical)


def patched_logits(source: Endpoint, target: Endpoint, prompts: Sequence[Prompt],
                   patch: OutputPatch | InputPatch, load: Callable[[str], LoadedModel] | None = None,
                   batch_size: int = 32) -> torch.Tensor:
    """Logits ``[N, vocab]`` at *last* of ``target`` with ``patch`` taken from ``source`` (no
    caching; the exact computation every CMAP number is made of, exposed for checks)."""
    pool = cmap_pool(load=load)
    plan = _Plan([patch] if isinstance(patch, OutputPatch) else [],
                 [patch] if isinstance(patch, InputPatch) else [], grid(pool.get(target.ref).arch))
    tok = pool.get(target.ref).tokenizer
    batch_list = batches(list(prompts), tok, batch_size)
    recorded = [_record_batch_with(pool, source, b, plan) for b in batch_list]
    out = []
    with torch.no_grad(), pool.model(target.ref, target.adapter) as loaded:
        for b, rec in zip(batch_list, recorded):
            if isinstance(patch, OutputPatch):
                edits = output_edits(rec, b, plan, torch.arange(1))
            else:
                read = Read(patch.layers, None, "head")
                last_logits(loaded, b, [read])
                edits = input_edits(rec, read.out, b, loaded.arch, patch)
            out.append(last_logits(loaded, b, edits).cpu())
    return torch.cat(out)


def _record_batch_with(pool: ModelPool, ep: Endpoint, batch: Batch, plan: _Plan):
    with pool.model(ep.ref, ep.adapter) as loaded:
        return _record_batch(loaded, batch, plan)


def grid(arch: Architecture) -> tuple[int, int, int]:
    """``(layers, heads, kv heads)`` of an architecture: the shape of a plan's masks."""
    return arch.n_layers, arch.n_heads, arch.n_kv_heads
