"""CMAP, cross-model activation patching: which parts of a circuit carry a fine-tune's gain.

A *source* model's activations are patched into a *target* model on the same prompts and the
target's accuracy is measured. The paper's direction is fine-tune → base (does the fine-tune's
version of a circuit group make the base as good as the fine-tune?); the reverse, base →
fine-tune, asks whether the base's version of the group removes the fine-tune's gain.

* **Output CMAP** — head outputs (the input of ``o_proj``) of a set of heads at named positions
  are replaced by the source's; the target's own ``o_proj`` (with any LoRA delta) then applies.
  Per circuit group (at the group's position), cumulative in chain order, the whole circuit, and
  a control: random heads of the same per-group sizes at the same positions (seeded draws without
  replacement, :func:`~circuitdiff.methods.faithfulness.random_circuits`).
* **Input CMAP** — the q, k or v projection outputs (and QK, QKV) of a group's heads are the
  source's: q at the group's position, k/v at every key position up to it. Under GQA a k/v head is
  shared by several query heads, so in each patched layer every head output the k/v patch touches
  other than the group's heads at the group's position is restored to the target's clean value:
  the only direct change is the group's outputs at its position.
* **Per-head map** — output CMAP of every single head at a position: ``[layers, heads]``.
* **Metric** — accuracy (argmax over the vocabulary at *last*, :mod:`circuitdiff.core.metrics`)
  and the share of the gap recovered ``(acc_patched − acc_target) / (acc_source − acc_target)``
  with a paired bootstrap interval over prompts; the share is ``None`` ("undefined") when the gap
  is 0 — never a division by zero.

Memory: a LoRA fine-tune is one set of weights — the fine-tune is the model with its adapter
enabled, the base the same model inside ``adapter_disabled()``. For a full fine-tune only one
model is loaded at a time: the source's activations at the needed positions are recorded to the
run folder (``cmap/record/...``), the source is freed, then the target is loaded and patched.
Every recording and every direction's result is cached in the run folder, so a rerun resumes.

The package: :mod:`.config` (settings), :mod:`.patches` (what a variant patches, the plan),
:mod:`.engine` (record and patch), :mod:`.results` (numbers and results); this module builds
each direction's rows and is the entry point, :func:`run`.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ...core.circuit import Circuit, Head
from ...core.model import LoadedModel
from ...core.pool import ModelPool
from ...core.runs import RunFolder, model_tag, settings_digest, split_pieces
from ...core.pool import check_pair
from ...core.stats import excess_interval
from ...core.task import Batch, Prompt, batches
from ..base import as_store
from ..faithfulness import random_circuits, random_draw_key
from .config import (ALL_POSITIONS, COMPONENTS, FORWARD, REVERSE, CMAPConfig, CMAPError,
                     cmap_prompts)
from .engine import _patch, _record, cmap_pool, grid, input_edits, output_edits, patched_logits
from .patches import (Endpoint, InputPatch, ModelRef, OutputPatch, _Plan, _union, has_adapter,
                      position_index)
from .results import CMAPResult, CMAPRow, DirectionResult, _Bootstrap, gap_share


# -- the rows of one direction ----------------------------------------------------------------------
@dataclass
class _RowSpec:
    kind: str
    name: str
    groups: list[str]
    patch: OutputPatch | InputPatch | None
    random: list[OutputPatch] = field(default_factory=list)
    component: str | None = None


def _row_specs(circuit: Circuit, cfg: CMAPConfig) -> list[_RowSpec]:
    draws = random_circuits(circuit, cfg.random_draws, cfg.random_seed)
    n_part = len(draws) if cfg.group_random_draws is None else cfg.group_random_draws
    nonempty = [n for n, g in circuit.groups.items() if g.heads]
    specs = []

    def output_row(kind: str, name: str, groups: list[str]) -> _RowSpec:
        use = draws if kind == "circuit" else draws[:n_part]
        return _RowSpec(kind, name, groups, _union(circuit, groups),
                        [_union(d, groups) for d in use])

    for name, g in circuit.groups.items():
        specs.append(output_row("group", name, [name]) if g.heads
                     else _RowSpec("group", name, [name], None))
    for k in range(2, len(nonempty) + 1):  # prefix 1 is the first group's own row
        specs.append(output_row("cumulative", "+".join(nonempty[:k]), nonempty[:k]))
    if nonempty:
        specs.append(output_row("circuit", "circuit", list(circuit.groups)))
    if cfg.input:
        for name in nonempty:
            g = circuit.groups[name]
            for comp in COMPONENTS:
                specs.append(_RowSpec("input", f"{name}:{comp.upper()}", [name],
                                      InputPatch(tuple(g.heads), g.position, comp), [], comp))
    return specs


def _per_head_patches(circuit: Circuit, cfg: CMAPConfig) -> list[tuple[str, Head, OutputPatch]]:
    if not cfg.per_head:
        return []
    positions = cfg.per_head_positions or tuple(
        dict.fromkeys(g.position for g in circuit.groups.values() if g.heads)) or ("last",)
    return [(p, (l, h), OutputPatch.of({p: [(l, h)]})) for p in positions
            for l in range(circuit.n_layers) for h in range(circuit.n_heads)]


def _direction(pool: ModelPool, source: Endpoint, target: Endpoint, direction: str,
               batch_list: Sequence[Batch], circuit: Circuit, cfg: CMAPConfig,
               arch: tuple[int, int, int], folder: RunFolder | None, settings: dict,
               progress: bool) -> DirectionResult:
    t0 = time.perf_counter()
    specs = _row_specs(circuit, cfg)
    heads_map = _per_head_patches(circuit, cfg)
    outputs: list[OutputPatch] = []
    for s in specs:
        if isinstance(s.patch, OutputPatch):
            outputs += [s.patch] + s.random
    outputs += [p for _, _, p in heads_map]
    outputs = list(dict.fromkeys(outputs))  # one run per distinct patch
    inputs = [s.patch for s in specs if isinstance(s.patch, InputPatch)]
    row_of = {p: i for i, p in enumerate(outputs)}
    plan = _Plan(outputs, inputs, arch)
    rec_settings = {**settings, "model": source.name, "plan": plan.describe()}
    recorded = _record(pool, source, batch_list, plan, folder, rec_settings, progress)
    src_hits = torch.cat([r["hits"] for r in recorded]).bool()
    tgt_hits, out_hits, in_hits, identical = _patch(pool, target, batch_list, plan, recorded,
                                                    cfg.max_rows, progress)
    n = len(src_hits)
    src_acc, tgt_acc = src_hits.double().mean().item(), tgt_hits.double().mean().item()
    boot = _Bootstrap(n, cfg.bootstrap, cfg.bootstrap_seed, cfg.confidence, src_hits, tgt_hits)
    acc_of = lambda hits: hits.double().mean().item()  # noqa: E731
    rows = []
    for s in specs:
        if s.patch is None:
            rows.append(CMAPRow(s.kind, s.name, s.groups, 0, None, empty=True, n_units=0))
            continue
        hits = (out_hits[row_of[s.patch]] if isinstance(s.patch, OutputPatch)
                else in_hits[inputs.index(s.patch)])
        acc = acc_of(hits)
        share_ci, defined = boot.share_ci(hits)
        rnd = [acc_of(out_hits[row_of[p]]) for p in s.random]
        rmean = sum(rnd) / len(rnd) if rnd else None
        rsd = (torch.tensor(rnd, dtype=torch.float64).std().item() if len(rnd) > 1
               else (0.0 if rnd else None))
        row = CMAPRow(s.kind, s.name, s.groups, s.patch.n_heads, acc, boot.accuracy_ci(hits),
                      gap_share(acc, tgt_acc, src_acc), share_ci, defined, s.component,
                      rnd, rmean, rsd,
                      None if rmean is None else gap_share(rmean, tgt_acc, src_acc),
                      n_units=s.patch.n_units)
        if s.random:
            _null(row, hits, torch.stack([out_hits[row_of[p]] for p in s.random]), src_hits,
                  tgt_hits, cfg, checks=s.kind == "circuit")
        rows.append(row)
    per_head: dict[str, dict] = {}
    for pos, (l, h), p in heads_map:
        m = per_head.setdefault(pos, {"accuracy": [[None] * arch[1] for _ in range(arch[0])],
                                      "share": [[None] * arch[1] for _ in range(arch[0])]})
        acc = acc_of(out_hits[row_of[p]])
        m["accuracy"][l][h] = acc
        m["share"][l][h] = gap_share(acc, tgt_acc, src_acc)
    return DirectionResult(direction, source.name, target.name, src_acc, tgt_acc, n, rows,
                           per_head, identical, time.perf_counter() - t0, boot.gap_ci())


def _null(row: CMAPRow, hits: torch.Tensor, random_hits: torch.Tensor, src_hits: torch.Tensor,
          tgt_hits: torch.Tensor, cfg: CMAPConfig, checks: bool) -> None:
    """Fill ``row``'s null (:func:`~circuitdiff.core.stats.excess_interval` against its random
    draws, on the bootstrap's resamples) and, with ``checks``, each draw's own statistics with
    the other draws as its null (leave-one-out: how often a random set would pass)."""
    def stats(h: torch.Tensor, rnd: torch.Tensor) -> dict:
        return excess_interval(h, rnd, src_hits, tgt_hits, cfg.bootstrap, cfg.bootstrap_seed,
                               cfg.confidence)

    mine = stats(hits, random_hits)
    row.excess_ci, row.random_shares, row.rank = (mine["excess_ci"], mine["random_shares"],
                                                  mine["rank"])
    if checks and len(random_hits) > 1:
        for i in range(len(random_hits)):
            others = torch.cat([random_hits[:i], random_hits[i + 1:]])
            c = stats(random_hits[i], others)
            row.random_checks.append({"draw": i, "share": mine["random_shares"][i],
                                      "share_ci": c["share_ci"], "excess_ci": c["excess_ci"],
                                      "rank": c["rank"]})


# -- the entry point -------------------------------------------------------------------------------
def _fill_units(d: DirectionResult, circuit: Circuit) -> DirectionResult:
    """Rows of a result saved before ``n_units`` existed get it from the circuit (resume)."""
    for r in d.rows:
        if r.n_units is None:
            if r.empty:
                r.n_units = 0
            elif r.kind == "input":
                r.n_units = r.n_heads
            else:
                r.n_units = _union(circuit, r.groups).n_units
    return d


def _refs(model_or_pool: "ModelPool | LoadedModel | Sequence[ModelRef]"
          ) -> tuple[list[ModelRef], object]:
    """The models to compare and the loader: from a pool, one loaded model, or a list."""
    if isinstance(model_or_pool, ModelPool):
        return list(model_or_pool.specs), model_or_pool.load
    if isinstance(model_or_pool, LoadedModel):
        return [model_or_pool], None
    if isinstance(model_or_pool, str):
        raise CMAPError("pass the models as a list [base, fine-tune] (or a ModelPool), not one "
                        "spec string")
    return list(model_or_pool), None


def run(model_or_pool: "ModelPool | LoadedModel | Sequence[ModelRef]",
        prompts: Sequence[Prompt] | None, config: CMAPConfig, *,
        store: "RunFolder | str | None" = None, progress: bool | None = None) -> CMAPResult:
    """CMAP of ``config.circuit`` between a base and a fine-tune (fine-tune → base; with
    ``config.reverse`` also base → fine-tune).

    ``model_or_pool`` names the two models, **base first, fine-tune second**: a
    :class:`~circuitdiff.core.pool.ModelPool` (its specs, loaded with its ``load`` one at a time
    and freed after use) or a list of specs / loaded models. One model alone (a
    :class:`LoadedModel`, or a one-element pool or list) is a LoRA fine-tune compared with its own
    base: it must carry an un-merged adapter, the fine-tune is it with the adapter on and the base
    with it off — one copy of the weights. Two specs take the same LoRA path when the fine-tune is
    an adapter folder on the base (:func:`~circuitdiff.core.pool.check_pair`), as does the same
    adapter-carrying loaded model given twice. ``prompts`` default to :func:`cmap_prompts`.
    With ``store`` every recording and direction is cached there, keyed by the config's settings,
    the circuit, the prompts and the endpoints, so a rerun resumes. Under ``torchrun`` each rank
    patches its share of the directions (:func:`~circuitdiff.core.runs.split_pieces`; rank 0
    alone writes), gathered in direction order.
    """
    cfg = config
    if cfg.circuit is None:
        raise CMAPError("CMAPConfig.circuit is None: pass the circuit to compare "
                        "(CMAPConfig(circuit=...))")
    circuit = cfg.circuit
    folder = as_store(store)
    progress = bool(progress)
    refs, load = _refs(model_or_pool)
    if len(refs) not in (1, 2):
        raise CMAPError(f"CMAP compares two models, base then fine-tune (or one LoRA fine-tune "
                        f"with its adapter toggled); got {len(refs)}")
    base, finetuned = (None, refs[0]) if len(refs) == 1 else refs
    t0 = time.perf_counter()
    pool = cmap_pool(load=load)
    lora = base is None or (
        base is finetuned and isinstance(finetuned, LoadedModel) and has_adapter(finetuned)
    ) or (
        isinstance(base, str) and isinstance(finetuned, str)
        and check_pair(base, finetuned, circuit).lora)
    ft_label = finetuned.name if isinstance(finetuned, LoadedModel) else finetuned
    if lora:
        ft_loaded = pool.get(finetuned)
        if not has_adapter(ft_loaded):
            raise CMAPError(f"{ft_label} carries no LoRA adapter, so it cannot serve as its own "
                            f"base; pass the base model too")
        base_label = base.name if isinstance(base, LoadedModel) else (base or ft_label)
        ft_ep = Endpoint(ft_label, finetuned, True)
        base_ep = Endpoint(ft_label, finetuned, False)
    else:
        base_label = base.name if isinstance(base, LoadedModel) else base
        ft_ep, base_ep = Endpoint(ft_label, finetuned), Endpoint(base_label, base)
        if isinstance(base, LoadedModel):
            pool.get(base)  # checked against the fine-tune when that is loaded
        ft_loaded = pool.get(finetuned)
    arch, tokenizer = ft_loaded.arch, ft_loaded.tokenizer
    circuit.validate(arch)
    prompts = list(prompts) if prompts is not None else cmap_prompts(tokenizer, cfg)
    if not prompts:
        raise CMAPError("no prompts to patch")
    batch_list = batches(prompts, tokenizer, cfg.batch_size)
    key = cfg.cache_key()
    circuit_dict = key.pop("circuit")
    settings = {"cmap": key, "circuit": circuit_dict,
                "prompts": settings_digest([p.to_dict() for p in prompts]),
                "dtype": str(next(ft_loaded.model.parameters()).dtype), **random_draw_key(circuit)}
    del ft_loaded

    pairs = [(ft_ep, base_ep, FORWARD)] + ([(base_ep, ft_ep, REVERSE)] if cfg.reverse else [])
    # the rows' format is in the result's key (not the recordings': they did not change)
    rsettings = [{**settings, "source": src.name, "target": tgt.name,
                  "row_version": CMAPRow.VERSION} for src, tgt, _ in pairs]
    cache_names = [f"cmap/{model_tag(src.name)}__{model_tag(tgt.name)}-"
                   f"{settings_digest(rs, 10)}.json" for (src, tgt, _), rs in zip(pairs, rsettings)]

    def one_direction(i: int, store: RunFolder | None) -> dict:
        src, tgt, name = pairs[i]
        dsettings = {k: v for k, v in rsettings[i].items() if k != "row_version"}

        def compute() -> dict:
            return _direction(pool, src, tgt, name, batch_list, circuit, cfg, grid(arch), store,
                              dsettings, progress).to_dict()

        return compute() if store is None else store.cached(cache_names[i], rsettings[i], compute)

    # under torchrun each rank patches its share of the directions, gathered in direction order
    results = [_fill_units(DirectionResult.from_dict(d), circuit)
               for d in split_pieces(folder, len(pairs), one_direction, cached_under=cache_names)]
    pool.free()
    warn = []
    if any(d.identical for d in results):
        warn.append(f"{ft_label} computes the same logits as {base_label} on every prompt (the "
                    f"same weights?): the gap is 0 and the share recovered is undefined")
        warnings.warn(warn[-1], stacklevel=2)
    return CMAPResult(base_label, ft_label, circuit_dict, key, results, warn,
                      time.perf_counter() - t0)


__all__ = ["ALL_POSITIONS", "COMPONENTS", "CMAPConfig", "CMAPError", "CMAPResult", "CMAPRow",
           "DirectionResult", "Endpoint", "FORWARD", "InputPatch", "OutputPatch", "REVERSE",
           "cmap_prompts", "gap_share", "has_adapter", "input_edits", "output_edits",
           "patched_logits", "position_index", "run"]
