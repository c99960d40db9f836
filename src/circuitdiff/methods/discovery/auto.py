"""The automatic discovery chain: find where the circuit reads as well as which heads.

1. **Held-out check.** Full-model accuracy on ``n_validate`` held-out prompts (the
   named seed stream ``validate_seed``); a model at chance has no circuit to find
   (:class:`NoCircuitError`).
2. **Position scan** (:mod:`..scan`) on the held-out prompts: which (layer, role) ablations hurt.
3. **Trace back from the logits.** The first edge scores every head at ``last`` with the logits as
   receiver. Every group found (heads × role) then has its inputs traced: its query at its own
   role, and its keys and values at every role the scan marks as relevant below the group's top
   layer (a drop of at least ``scan_min_drop`` of the model's accuracy). Each edge is scored
   *exactly* by path patching (sender and receiver input at the same role; the role may cover
   many tokens, e.g. every box's label). A sender is **significant** when its mean score is at
   most ``-min_score``, at most ``-z_threshold`` standard errors (the spread of its per-sample
   scores) below zero, and at least a tenth of the edge's best score. Significant senders not yet
   in a group at that role become a new group; the edge ``group --q|k|v--> group`` is recorded.
   Tracing stops at layer 0 or when no sender is significant.
4. **Naming.** Each group is named by what its heads attend to, measured from the model's own
   attention pattern ("object mover @ labels": heads at the labels attending to the objects;
   "value reader @ last": heads at ``last`` that write the answer while attending to the
   context), or plainly ``heads @ role`` when the evidence is not clear.
5. **Size by faithfulness** (:mod:`.sizing`). Candidates are ordered by score relative to their group's best
   (every group's best head first; then the senders that were not significant but scored below
   zero) and prefixes of that order are evaluated — stacked along the batch dimension, every
   ``GROW_STEP``-th prefix first, then every prefix of the step that crossed — by mean ablation on
   the held-out prompts (paper protocol: every head at positions outside the circuit's roles
   ablated). The smallest prefix whose faithfulness minus ``size_z`` paired standard errors
   reaches ``target`` is kept (a size chosen on noise would not hold on other prompts), then
   pruned: heads whose removal keeps that criterion are dropped (longest such removal set, by
   bisection). The curve (units vs faithfulness) is saved. If even every candidate misses the
   target the run stops with a message giving that faithfulness and the ceiling of the circuit's
   roles (every head kept there) — no search without end.

Every scored edge, the scan and the curve are cached in the run folder, so a rerun resumes.
"""

from __future__ import annotations

import contextlib
import re
import time
from typing import Iterator, Sequence

import torch

from ...core.arch import unwrap
from ...core.circuit import Circuit, CircuitEdge, CircuitGroup, Head, format_head, parse_head
from ...core.model import LoadedModel
from ...core.task import PARTITION_ROLES, EntityTrackingTask, Prompt, TaskConfig, encode
from ..ablation import cached_means, role_mask
from ..accuracy import evaluate_accuracy
from ..scan import (ScanResult, default_scan_roles, resolve_scan_method, scan_by_method,
                    scan_method_key)
from .config import DiscoveryError, NoCircuitError, TargetUnreachable
from .sizing import Group, size_circuit
from .steps import Context, DiscoveryResult, Step, score_step


#: singular nouns for the roles a group can read from (used in group names)
ROLE_NOUNS = {"objects": "object", "labels": "label", "separators": "separator",
              "fillers": "filler-word", "query_words": "query-word", "prefix": "BOS",
              "query_label": "query-label", "last": "last-token"}
#: roles whose content is the boxes' context (a group writing the logits while reading them
#: reads the answer's value)
CONTEXT_ROLES = ("objects", "labels", "separators")


def significant_senders(scores: torch.Tensor, se: torch.Tensor, eligible: torch.Tensor,
                        z_threshold: float, min_score: float, best_fraction: float = 0.1
                        ) -> list[Head]:
    """Eligible heads whose score is ``<= -min_score``, ``<= -z_threshold`` standard errors and
    at least ``best_fraction`` of the most negative eligible score; most negative first. A NaN
    score (not scored) is never significant."""
    scored = eligible & torch.isfinite(scores)
    s = torch.where(scored, scores, torch.zeros_like(scores)).float()
    best = float(s.min())
    if best >= 0:
        return []
    ok = scored & (s <= -min_score) & (s <= z_threshold * -se.float()) & \
        (s <= best_fraction * best)
    idx = ok.nonzero().tolist()
    idx.sort(key=lambda lh: float(s[lh[0], lh[1]]))
    return [(int(l), int(h)) for l, h in idx]


@contextlib.contextmanager
def _eager_attention(loaded: LoadedModel) -> Iterator[None]:
    """Temporarily use the eager attention kernel, the one that returns attention weights."""
    cfg = unwrap(loaded.model).config
    old = getattr(cfg, "_attn_implementation", None)
    cfg._attn_implementation = "eager"
    try:
        yield
    finally:
        cfg._attn_implementation = old


@torch.no_grad()
def attention_sources(loaded: LoadedModel, prompts: Sequence[Prompt], role: str,
                      heads: Sequence[Head], roles: Sequence[str]) -> torch.Tensor:
    """``[len(heads), len(roles)]``: mean attention mass each head puts, from the tokens of
    ``role``, on the tokens of each of ``roles`` (averaged over the role's tokens and prompts)."""
    batch = encode(prompts, loaded.tokenizer)
    q_at = role_mask(batch, role).float()                                    # [B, T]
    src = torch.stack([role_mask(batch, r).float() for r in roles])          # [R, B, T]
    with _eager_attention(loaded):
        out = loaded.model(**batch.model_inputs(loaded.device), output_attentions=True,
                           use_cache=False)
    att = out.attentions
    if not att or att[0] is None:
        raise DiscoveryError("the model returned no attention weights")
    rows = []
    for layer, head in heads:
        a = att[layer][:, head].float().cpu()                                # [B, Tq, Tk]
        from_role = (a * q_at[:, :, None]).sum(1) / q_at.sum(1, keepdim=True)  # [B, Tk]
        rows.append((from_role[None] * src).sum(-1).mean(-1))                 # [R]
    return torch.stack(rows)


def _name(group: Group, writes_logits: bool, mass: torch.Tensor, roles: Sequence[str]) -> str:
    """A function name from the attention evidence, or a plain ``heads @ role``."""
    share = mass.mean(0)
    top = int(share.argmax())
    source, frac = roles[top], float(share[top])
    if writes_logits and source in CONTEXT_ROLES and frac >= 0.3:
        return f"value reader @ {group.role}"
    if not writes_logits and source != group.role and frac >= 0.4:
        return f"{ROLE_NOUNS.get(source, source)} mover @ {group.role}"
    return f"heads @ {group.role}"


def _key(function: str, taken: set[str]) -> str:
    base = re.sub(r"\s*@\s*", "@", function).replace(" ", "_")
    key, i = base, 2
    while key in taken:
        key, i = f"{base}_{i}", i + 1
    taken.add(key)
    return key


def run_auto(ctx: Context) -> DiscoveryResult:
    """Run the automatic chain (see the module docstring) on ``ctx``; writes ``scan.json``,
    ``sizing.json`` and every edge's scores to the run folder."""
    loaded, cfg, folder, base = ctx.loaded, ctx.cfg, ctx.folder, ctx.base
    clean, progress = ctx.clean, ctx.progress
    timings: dict[str, float] = {}  # wall seconds per phase in this call (cache hits: ~0)

    @contextlib.contextmanager
    def phase(name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - start, 2)
    arch = loaded.arch
    L, H = arch.n_layers, arch.n_heads
    n_boxes = clean[0].n_boxes
    task = EntityTrackingTask(loaded.tokenizer, TaskConfig(n_boxes=n_boxes), seed=cfg.seed)
    seeds = cfg.seed_streams()
    held_out = task.sample(cfg.n_validate, seed=seeds["validate_seed"])
    held = {"n_validate": cfg.n_validate, "validate_seed": seeds["validate_seed"],
            "n_boxes": n_boxes}

    # 1. is there anything to find?
    def validate() -> dict:
        res = evaluate_accuracy(loaded, held_out, cfg.batch_size)
        return {**res.to_dict(), "correct": res.correct}
    with phase("validate"):
        checked = folder.cached("validate_accuracy.json", {**base, **held}, validate)
    full, full_correct = checked["accuracy"], torch.tensor(checked["correct"])
    chance = 1.0 / n_boxes
    if full <= chance:
        raise NoCircuitError(
            f"{loaded.name} answers {full:.2f} of {cfg.n_validate} held-out prompts, no better "
            f"than guessing one of the {n_boxes} objects ({chance:.2f}): the model does not do "
            f"the task, so there is no circuit to find")
    with phase("means"):
        means = cached_means(folder, loaded, task.sample(cfg.n_mean, seed=seeds["mean_seed"]),
                             {"n_mean": cfg.n_mean, "mean_seed": seeds["mean_seed"],
                              "n_boxes": n_boxes},
                             cfg.batch_size, progress)

    # 2. the position scan on the held-out prompts
    scan_settings = scan_method_key(
        {**base, **held, "n_mean": cfg.n_mean, "n_scan": cfg.n_scan, "kind": "scan"},
        cfg.scan_method, cfg.scan_exact, arch)
    scan_prompts = held_out[:cfg.n_scan]
    scan_roles = [r for r in default_scan_roles(scan_prompts, loaded.tokenizer)
                  if r in PARTITION_ROLES]  # disjoint roles: the ones edges are traced at
    ctx.rules.append(resolve_scan_method(cfg.scan_method, L, H, len(scan_roles),
                                         cfg.scan_exact)[1])

    def run_scan() -> dict:
        res = scan_by_method(loaded, scan_prompts, means, scan_roles, cfg.scan_method,
                             cfg.scan_exact, cfg.batch_size, cfg.max_rows, progress,
                             baseline=float(full_correct[:cfg.n_scan].double().mean()))
        res.settings = scan_settings
        return res.to_dict()
    with phase("scan"):
        scan = ScanResult.from_dict(folder.cached("scan.json", scan_settings, run_scan))
    partition = [r for r in PARTITION_ROLES if r in scan.roles]

    # 3. trace back from the logits
    result = DiscoveryResult(None, {})
    groups: dict[str, Group] = {}
    edges: list[CircuitEdge] = []
    traced: list[dict] = []
    queue: list[tuple[str | None, str, str]] = [(None, "logits", "last")]  # (receiver, kind, role)
    done: set[tuple[str | None, str, str]] = set()
    n_edge = 0
    while queue:
        receiver, kind, role = queue.pop(0)
        if (receiver, kind, role) in done:
            continue
        done.add((receiver, kind, role))
        recv_heads = groups[receiver].heads if receiver else []
        end = max(l for l, _ in recv_heads) if recv_heads else L
        if end == 0:
            continue
        eligible = torch.zeros(L, H, dtype=torch.bool)
        eligible[:end] = True
        name = f"{receiver or 'logits'}.{kind}.{role}"
        step = Step(n_edge, name, role, kind if receiver else "q", recv_heads,
                    max(1, H // 2), eligible,
                    {**base, "edge": name, "receivers": [format_head(h) for h in recv_heads]},
                    desc=f"edge {n_edge + 1}: {role} --{kind}--> {receiver or 'logits'} "
                         f"{loaded.name}", paper=False)
        n_edge += 1
        with phase("edges"):
            scored = score_step(ctx, step)
        scores, se = scored.scores, scored.se
        result.scores[name] = scores
        chosen = significant_senders(scores, se, eligible, cfg.z_threshold, cfg.min_score)
        rec = {"edge": name, "receiver": receiver or "logits", "kind": kind, "role": role,
               "receivers": [format_head(h) for h in recv_heads],
               "significant": [format_head(h) for h in chosen]}
        traced.append(rec)
        if not chosen:
            continue
        already = {h: g.key for g in groups.values() if g.role == role for h in g.heads}
        new = [h for h in chosen if h not in already]
        senders = list(dict.fromkeys(already[h] for h in chosen if h in already))
        if new and len(groups) < cfg.max_groups:
            key = f"g{len(groups)}"
            rest = [(int(l), int(h)) for l, h in (eligible & (scores < 0)).nonzero().tolist()]
            rest = sorted((h for h in rest if h not in chosen and h not in already),
                          key=lambda h: float(scores[h]))
            groups[key] = Group(key, role, new, [float(scores[h]) for h in new], "", rest,
                                 [float(scores[h]) for h in rest])
            senders.append(key)
            # trace the new group's own inputs: q at its role, k/v at the relevant roles
            top = max(l for l, _ in new)
            queue.append((key, "q", role))
            for r in scan.relevant_roles(top, cfg.scan_min_drop * scan.baseline):
                if r in partition and r != role:
                    queue += [(key, "k", r), (key, "v", r)]
        for s in senders:
            if s != receiver:
                edges.append(CircuitEdge(s, receiver or "logits", kind))
        rec["sender_groups"] = senders
    result.edges_scored = traced
    if not groups:
        raise DiscoveryError(
            f"no head at 'last' has a significant effect on the logits of {loaded.name} "
            f"(z <= -{cfg.z_threshold}, score <= -{cfg.min_score}); nothing to trace")

    # 4. name groups by their attention
    all_roles = list(dict.fromkeys(g.role for g in groups.values()))
    writes = {e.sender for e in edges if e.receiver == "logits"}
    taken: set[str] = set()
    renamed: dict[str, str] = {}
    for g in groups.values():
        with phase("naming"):
            mass = attention_sources(loaded, held_out[:min(32, len(held_out))], g.role, g.heads,
                                     partition)
        g.function = _name(g, g.key in writes, mass, partition)
        renamed[g.key] = _key(g.function, taken)
    groups = {renamed[k]: Group(renamed[k], g.role, g.heads, g.scores, g.function, g.extra,
                                 g.extra_scores) for k, g in groups.items()}
    edges = list(dict.fromkeys(CircuitEdge(renamed.get(e.sender, e.sender),
                                           renamed.get(e.receiver, e.receiver), e.kind)
                               for e in edges))
    for rec in traced:
        rec["receiver"] = renamed.get(rec["receiver"], rec["receiver"])
        rec["sender_groups"] = [renamed[s] for s in rec.get("sender_groups", [])]

    # 5. size by faithfulness on the held-out prompts (cached: the slowest step after the scan)
    size_settings = {**base, **held, "n_mean": cfg.n_mean, "target": cfg.target,
                     "size_z": cfg.size_z,
                     **({} if cfg.sizing == "exhaustive" else {"sizing": cfg.sizing}),
                     "sizes": None if cfg.sizes is None else list(cfg.sizes),
                     "on_unreachable": cfg.on_unreachable,
                     "groups": {k: [g.role, [format_head(h) for h in g.heads], g.scores,
                                    [format_head(h) for h in g.extra], g.extra_scores]
                                for k, g in groups.items()}}

    def run_size() -> dict:
        units, curve, summary = size_circuit(loaded, held_out, means, groups, cfg,
                                             full_correct, all_roles, progress)
        return {"units": [[g, format_head(h)] for g, h in units], "curve": curve,
                "summary": summary}
    with phase("sizing"):
        sized = folder.cached("sizing.json", size_settings, run_size)
    if sized["summary"].get("unreachable"):
        raise TargetUnreachable(sized["summary"]["message"])
    chosen_units = [(g, parse_head(h)) for g, h in sized["units"]]
    curve, sizing = sized["curve"], sized["summary"]
    result.curve, result.sizing = curve, sizing
    kept = {k: [h for g, h in chosen_units if g == k] for k in groups}
    final_groups = {k: CircuitGroup(kept[k], g.role, g.function)
                    for k, g in groups.items() if kept[k]}
    final_edges = [e for e in edges if e.sender in final_groups
                   and (e.receiver == "logits" or e.receiver in final_groups)]
    result.circuit = Circuit(
        final_groups, L, H, loaded.name,
        {"method": "path_patching", "chain": "auto", "scoring": cfg.method,
         "target": cfg.target, "sizes": None if cfg.sizes is None else list(cfg.sizes),
         "n_prompts": len(clean), "n_boxes": n_boxes, "seed": cfg.seed,
         "validate_seed": seeds["validate_seed"], "n_validate": cfg.n_validate,
         "mean_seed": seeds["mean_seed"],
         "n_mean": cfg.n_mean, "prompts": base["prompts"], "adapter": loaded.adapter,
         "z_threshold": cfg.z_threshold, "min_score": cfg.min_score,
         "scan_min_drop": cfg.scan_min_drop, "sizing": cfg.sizing,
         "scan_method": scan.method, "rules": list(ctx.rules),
         "candidates": {k: {format_head(h): s for h, s in zip(g.heads, g.scores)}
                        for k, g in groups.items()},
         "extra_candidates": {k: {format_head(h): s for h, s in zip(g.extra, g.extra_scores)}
                              for k, g in groups.items()},
         "validation": sizing},
        final_edges)
    result.scan = scan
    result.timings = timings
    return result


__all__ = ["attention_sources", "run_auto", "significant_senders"]
