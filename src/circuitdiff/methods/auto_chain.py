"""The automatic discovery chain: find where the circuit reads as well as which heads.

1. **Held-out check.** Full-model accuracy on ``n_validate`` held-out prompts (seed
   ``seed + 1``); a model at chance has no circuit to find (:class:`NoCircuitError`).
2. **Position scan** (:mod:`.scan`) on the held-out prompts: which (layer, role) ablations hurt.
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
5. **Size by faithfulness.** Candidates are ordered by score relative to their group's best
   (every group's best head first) and prefixes of that order are evaluated — stacked along the
   batch dimension — by mean ablation on the held-out prompts (paper protocol: every head at
   positions outside the circuit's roles ablated). The smallest prefix reaching ``target`` is
   kept, then pruned: heads whose removal keeps the target are dropped (longest such removal
   set). The curve (units vs faithfulness) is saved. If even every candidate misses the target
   the run stops with a message giving that faithfulness and the ceiling of the circuit's roles
   (every head kept there) — no search without end.

Every scored edge, the scan and the curve are cached in the run folder, so a rerun resumes.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ..core.arch import unwrap
from ..core.circuit import Circuit, CircuitEdge, CircuitGroup, Head, format_head, parse_head
from ..core.model import LoadedModel
from ..core.runs import RunFolder
from ..core.task import (PARTITION_ROLES, EntityTrackingTask, Prompt, TaskConfig, encode)
from .ablation import HeadMeans, cached_means, role_mask, variant_accuracies
from .accuracy import evaluate_accuracy
from .faithfulness import faithfulness
from .path_patching import PathPatchingError
from .scan import ScanResult, position_scan


class DiscoveryError(PathPatchingError):
    """A discovery run that cannot produce a circuit (says why and what was measured)."""


class NoCircuitError(DiscoveryError):
    """The model is at chance on the task: there is no circuit to find."""


class TargetUnreachable(DiscoveryError):
    """Even every candidate head misses the faithfulness target."""


#: singular nouns for the roles a group can read from (used in group names)
ROLE_NOUNS = {"objects": "object", "labels": "label", "separators": "separator",
              "fillers": "filler-word", "query_words": "query-word", "prefix": "BOS",
              "query_label": "query-label", "last": "last-token"}
#: roles whose content is the boxes' context (a group writing the logits while reading them
#: reads the answer's value)
CONTEXT_ROLES = ("objects", "labels", "separators")


@dataclass
class _Group:
    """A group while the chain runs: heads in score order with their scores."""

    key: str
    role: str
    heads: list[Head]
    scores: list[float]
    function: str = ""


@dataclass
class _TracedEdge:
    """One scored path-patching edge: senders at ``role`` into ``kind`` of ``receiver``."""

    receiver: str
    kind: str
    role: str
    selected: list[Head] = field(default_factory=list)
    sender_groups: list[str] = field(default_factory=list)


def significant_senders(scores: torch.Tensor, se: torch.Tensor, eligible: torch.Tensor,
                        z_threshold: float, min_score: float, best_fraction: float = 0.1
                        ) -> list[Head]:
    """Eligible heads whose score is ``<= -min_score``, ``<= -z_threshold`` standard errors and
    at least ``best_fraction`` of the most negative eligible score; most negative first."""
    s = torch.where(eligible, scores, torch.zeros_like(scores)).float()
    best = float(s.min())
    if best >= 0:
        return []
    ok = eligible & (s <= -min_score) & (s <= z_threshold * -se.float()) & \
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


def _name(group: _Group, writes_logits: bool, mass: torch.Tensor, roles: Sequence[str]) -> str:
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


def _masks(units: Sequence[tuple[str, Head]], roles: dict[str, str], n_layers: int,
           n_heads: int, all_roles: Sequence[str]) -> dict[str, torch.Tensor]:
    """Keep masks per role (every role of ``all_roles`` present, possibly empty) for
    ``(group, head)`` units."""
    m = {r: torch.zeros(n_layers, n_heads, dtype=torch.bool) for r in all_roles}
    for g, (l, h) in units:
        m[roles[g]][l, h] = True
    return m


def discover_auto(loaded: LoadedModel, out: str | Path, cfg, *,
                  clean: Sequence[Prompt] | None = None,
                  counterfactual: Sequence[Prompt] | None = None,
                  progress: bool = False):
    """Run the automatic chain (see the module docstring); returns a
    :class:`~circuitdiff.methods.discovery.DiscoveryResult` and writes ``circuit.json``,
    ``scan.json``, ``curve.json``, ``discovery.json`` and every edge's scores to ``out``."""
    from .discovery import DiscoveryResult, _prompt_pairs, _score_step, _Step

    arch = loaded.arch
    L, H = arch.n_layers, arch.n_heads
    folder = RunFolder(out)
    clean, counterfactual, base = _prompt_pairs(loaded, folder, cfg, clean, counterfactual)
    n_boxes = clean[0].n_boxes
    task = EntityTrackingTask(loaded.tokenizer, TaskConfig(n_boxes=n_boxes), seed=cfg.seed)
    held_out = task.sample(cfg.n_validate, seed=cfg.seed + 1)
    held = {"n_validate": cfg.n_validate, "validate_seed": cfg.seed + 1, "n_boxes": n_boxes}

    # 1. is there anything to find?
    full = folder.cached("validate_accuracy.json", {**base, **held}, lambda: evaluate_accuracy(
        loaded, held_out, cfg.batch_size).to_dict())["accuracy"]
    chance = 1.0 / n_boxes
    if full <= chance:
        raise NoCircuitError(
            f"{loaded.name} answers {full:.2f} of {cfg.n_validate} held-out prompts, no better "
            f"than guessing one of the {n_boxes} objects ({chance:.2f}): the model does not do "
            f"the task, so there is no circuit to find")
    means = cached_means(folder, loaded, task.sample(cfg.n_mean, seed=cfg.seed + 2),
                         {"n_mean": cfg.n_mean, "mean_seed": cfg.seed + 2, "n_boxes": n_boxes},
                         cfg.batch_size, progress)

    # 2. the position scan on the held-out prompts
    scan_settings = {**base, **held, "n_mean": cfg.n_mean, "kind": "scan"}

    def run_scan() -> dict:
        res = position_scan(loaded, held_out, means, None, cfg.batch_size, cfg.max_rows,
                            progress, baseline=full)
        res.settings = scan_settings
        return res.to_dict()
    scan = ScanResult.from_dict(folder.cached("scan.json", scan_settings, run_scan))
    partition = [r for r in PARTITION_ROLES if r in scan.roles]

    # 3. trace back from the logits
    result = DiscoveryResult(None, {})
    groups: dict[str, _Group] = {}
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
        step = _Step(n_edge, name, role, kind if receiver else "q", recv_heads,
                     max(1, H // 2), eligible,
                     {**base, "edge": name, "receivers": [format_head(h) for h in recv_heads]},
                     desc=f"edge {n_edge + 1}: {role} --{kind}--> {receiver or 'logits'}")
        n_edge += 1
        scores, se = _edge_scores(loaded, folder, clean, counterfactual, cfg, step, progress)
        result.scores[name] = scores
        chosen = significant_senders(scores, se, eligible, cfg.z_threshold, cfg.min_score)
        rec = {"edge": name, "receiver": receiver or "logits", "kind": kind, "role": role,
               "significant": [format_head(h) for h in chosen]}
        traced.append(rec)
        if not chosen:
            continue
        already = {h: g.key for g in groups.values() if g.role == role for h in g.heads}
        new = [h for h in chosen if h not in already]
        senders = list(dict.fromkeys(already[h] for h in chosen if h in already))
        if new and len(groups) < cfg.max_groups:
            key = f"g{len(groups)}"
            groups[key] = _Group(key, role, new, [float(scores[h]) for h in new])
            senders.append(key)
            # trace the new group's own inputs: q at its role, k/v at the relevant roles
            top = max(l for l, _ in new)
            queue.append((key, "q", role))
            for r in scan.relevant_roles(top, cfg.scan_min_drop * full):
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
        mass = attention_sources(loaded, held_out[:min(32, len(held_out))], g.role, g.heads,
                                 partition)
        g.function = _name(g, g.key in writes, mass, partition)
        renamed[g.key] = _key(g.function, taken)
    groups = {renamed[k]: _Group(renamed[k], g.role, g.heads, g.scores, g.function)
              for k, g in groups.items()}
    edges = list(dict.fromkeys(CircuitEdge(renamed.get(e.sender, e.sender),
                                           renamed.get(e.receiver, e.receiver), e.kind)
                               for e in edges))
    for rec in traced:
        rec["receiver"] = renamed.get(rec["receiver"], rec["receiver"])
        rec["sender_groups"] = [renamed[s] for s in rec.get("sender_groups", [])]

    # 5. size by faithfulness on the held-out prompts (cached: the slowest step after the scan)
    size_settings = {**base, **held, "n_mean": cfg.n_mean, "target": cfg.target,
                     "sizes": None if cfg.sizes is None else list(cfg.sizes),
                     "on_unreachable": cfg.on_unreachable,
                     "groups": {k: [g.role, [format_head(h) for h in g.heads], g.scores]
                                for k, g in groups.items()}}

    def run_size() -> dict:
        units, curve, summary = _size(loaded, held_out, means, groups, cfg, full, all_roles)
        return {"units": [[g, format_head(h)] for g, h in units], "curve": curve,
                "summary": summary}
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
         "validate_seed": cfg.seed + 1, "n_validate": cfg.n_validate, "mean_seed": cfg.seed + 2,
         "n_mean": cfg.n_mean, "prompts": base["prompts"], "adapter": loaded.adapter,
         "z_threshold": cfg.z_threshold, "min_score": cfg.min_score,
         "scan_min_drop": cfg.scan_min_drop,
         "candidates": {k: {format_head(h): s for h, s in zip(g.heads, g.scores)}
                        for k, g in groups.items()},
         "validation": sizing},
        final_edges)
    result.scan = scan
    result.save(out)
    return result


def _edge_scores(loaded: LoadedModel, folder: RunFolder, clean, counterfactual, cfg, step,
                 progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact scores and standard errors of one edge (hybrid: exact on attribution's top
    candidates, NaN elsewhere), cached as ``scores_<edge>.safetensors``."""
    from .discovery import attribution_scores, path_patching_scores

    args = (loaded, clean, counterfactual, step.position, step.receivers, step.kind)
    kw = dict(batch_size=cfg.batch_size, progress=progress)
    senders = None
    if cfg.method != "exact":
        att = folder.cached_tensors(f"attribution_{step.group}.safetensors",
                                    {**step.settings, "method": "attribution"},
                                    lambda: {"scores": attribution_scores(*args, **kw)})["scores"]
        k = cfg.hybrid_k or 3 * step.size
        masked = torch.where(step.eligible, att, torch.full_like(att, float("inf")))
        order = torch.argsort(masked.flatten(), stable=True)[:min(k, int(step.eligible.sum()))]
        senders = [(int(i) // att.shape[1], int(i) % att.shape[1]) for i in order]

    def compute() -> dict[str, torch.Tensor]:
        s, se = path_patching_scores(*args, senders=senders, impl=cfg.impl, desc=step.desc,
                                     return_se=True, **kw)
        return {"scores": s, "se": se}
    t = folder.cached_tensors(f"scores_{step.group}.safetensors",
                              {**step.settings, "method": cfg.method, "senders":
                               None if senders is None else [format_head(h) for h in senders]},
                              compute)
    return t["scores"], t["se"]


def _size(loaded: LoadedModel, prompts: Sequence[Prompt], means: HeadMeans,
          groups: dict[str, _Group], cfg, full: float, all_roles: list[str]
          ) -> tuple[list[tuple[str, Head]], list[dict], dict]:
    """Choose the circuit's (group, head) units: fixed ``cfg.sizes`` per group, or the smallest
    score-ordered prefix reaching ``cfg.target`` faithfulness, then pruned. Returns the units,
    the curve and a summary (faithfulness of the result under both protocols)."""
    L, H = loaded.arch.n_layers, loaded.arch.n_heads
    roles = {k: g.role for k, g in groups.items()}
    ev = dict(batch_size=cfg.batch_size, max_rows=cfg.max_rows)

    def masks(units):
        return _masks(units, roles, L, H, all_roles)

    def faith(accs: list[float]) -> list[float]:
        return [faithfulness(full, a) for a in accs]

    def n_units(units) -> int:
        return len({(roles[g], h) for g, h in units})

    if cfg.sizes is not None:
        units = [(k, h) for i, (k, g) in enumerate(groups.items())
                 for h in g.heads[:cfg.sizes[min(i, len(cfg.sizes) - 1)]]]
        acc = variant_accuracies(loaded, prompts, means, [masks(units)], **ev)[0]
        curve = [{"units": n_units(units), "accuracy": acc, "faithfulness": faith([acc])[0],
                  "step": "fixed sizes"}]
        return units, curve, _summary(loaded, prompts, means, masks(units), full, units, roles,
                                      cfg, ev, curve[0]["faithfulness"])
    # every group's heads by relative score, every group's best first
    order = sorted(((k, h, s / min(g.scores)) for k, g in groups.items()
                    for h, s in zip(g.heads, g.scores)), key=lambda x: -x[2])
    candidates = [(k, h) for k, h, _ in order]
    ceiling = {r: torch.ones(L, H, dtype=torch.bool) if r in all_roles else None
               for r in all_roles}
    prefixes = [candidates[:i] for i in range(1, len(candidates) + 1)]
    accs = variant_accuracies(loaded, prompts, means,
                              [masks(p) for p in prefixes] + [ceiling], **ev)
    fs = faith(accs)
    curve = [{"units": n_units(p), "added": f"{p[-1][0]}:{format_head(p[-1][1])}",
              "accuracy": a, "faithfulness": f, "step": "grow"}
             for p, a, f in zip(prefixes, accs, fs)]
    ceiling_f = fs[-1]
    reach = [i for i, f in enumerate(fs[:-1]) if f >= cfg.target]
    if not reach:
        msg = (f"target faithfulness {cfg.target:.2f} is unreachable: all {len(candidates)} "
               f"candidate heads ({n_units(candidates)} head x role units) reach "
               f"{fs[-2]:.2f}, and keeping every head at the circuit's roles "
               f"({', '.join(all_roles)}) reaches {ceiling_f:.2f} (full model accuracy "
               f"{full:.2f} on {len(prompts)} held-out prompts = faithfulness 1.00). Lower "
               f"--target or give fixed --sizes.")
        units = candidates
        return units, curve, _summary(loaded, prompts, means, masks(units), full, units, roles,
                                      cfg, ev, fs[-2], message=msg, ceiling=ceiling_f,
                                      unreachable=cfg.on_unreachable == "error")
    units = prefixes[reach[0]]
    # prune: single removals that keep the target, then the longest run of them (in order of
    # least harm) that still keeps it, found by bisection over the run's length
    drop_f = faith(variant_accuracies(loaded, prompts, means,
                                      [masks([u for u in units if u != v]) for v in units], **ev))
    removable = sorted((i for i, f in enumerate(drop_f) if f >= cfg.target),
                       key=lambda i: -drop_f[i])

    def without_first(n: int) -> list[tuple[str, Head]]:
        gone = set(removable[:n])
        return [u for j, u in enumerate(units) if j not in gone]

    lo, hi = 0, len(removable)  # invariant: removing the first lo keeps the target
    while lo < hi:
        mid = (lo + hi + 1) // 2
        trial = without_first(mid)
        f = faith(variant_accuracies(loaded, prompts, means, [masks(trial)], **ev))[0]
        gone = [f"{units[i][0]}:{format_head(units[i][1])}" for i in removable[:mid]]
        curve.append({"units": n_units(trial), "removed": gone, "accuracy": f * full,
                      "faithfulness": f, "step": "prune"})
        lo, hi = (mid, hi) if f >= cfg.target else (lo, mid - 1)
    units = without_first(lo)
    final_f = faith(variant_accuracies(loaded, prompts, means, [masks(units)], **ev))[0]
    return units, curve, _summary(loaded, prompts, means, masks(units), full, units, roles,
                                  cfg, ev, final_f, ceiling=ceiling_f)


def _summary(loaded, prompts, means, keep, full, units, roles, cfg, ev, faith_paper: float,
             message: str = "", ceiling: float | None = None, unreachable: bool = False) -> dict:
    """Faithfulness of the chosen units on the held-out prompts under both protocols."""
    kept_acc = variant_accuracies(loaded, prompts, means, [keep], keep_other_positions=True,
                                  **ev)[0]
    L, H = loaded.arch.n_layers, loaded.arch.n_heads
    n_units = len({(roles[g], h) for g, h in units})
    return {"full_accuracy": full, "n_validate": len(prompts), "target": cfg.target,
            "faithfulness_paper": faith_paper,
            "faithfulness_keep_other_positions": faithfulness(full, kept_acc),
            "units": n_units, "roles": sorted({roles[g] for g, _ in units}),
            "unit_fraction": n_units / (L * H * max(1, len({roles[g] for g, _ in units}))),
            "ceiling_faithfulness": ceiling, "message": message, "unreachable": unreachable}


__all__ = ["DiscoveryError", "NoCircuitError", "TargetUnreachable", "attention_sources",
           "discover_auto", "significant_senders"]
