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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ..core.arch import unwrap
from ..core.circuit import Circuit, CircuitEdge, CircuitGroup, Head, format_head, parse_head
from ..core.model import LoadedModel
from ..core.runs import RunFolder
from ..core.task import (PARTITION_ROLES, EntityTrackingTask, Prompt, TaskConfig, encode)
from .ablation import HeadMeans, cached_means, role_mask, variant_accuracies, variant_correct
from .accuracy import evaluate_accuracy
from .faithfulness import faithfulness
from .path_patching import PathPatchingError
from .scan import ScanResult, default_scan_roles, position_scan


#: the growth step: every GROW_STEP-th prefix first, then every prefix of the last step
GROW_STEP = 4


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
    extra: list[Head] = field(default_factory=list)         # non-significant senders, score < 0
    extra_scores: list[float] = field(default_factory=list)


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
    def validate() -> dict:
        res = evaluate_accuracy(loaded, held_out, cfg.batch_size)
        return {**res.to_dict(), "correct": res.correct}
    checked = folder.cached("validate_accuracy.json", {**base, **held}, validate)
    full, full_correct = checked["accuracy"], torch.tensor(checked["correct"])
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
    scan_settings = {**base, **held, "n_mean": cfg.n_mean, "n_scan": cfg.n_scan, "kind": "scan"}

    def run_scan() -> dict:
        scan_prompts = held_out[:cfg.n_scan]
        roles = [r for r in default_scan_roles(scan_prompts, loaded.tokenizer)
                 if r in PARTITION_ROLES]  # disjoint roles: the ones edges are traced at
        res = position_scan(loaded, scan_prompts, means, roles, cfg.batch_size, cfg.max_rows,
                            progress, baseline=float(full_correct[:cfg.n_scan].double().mean()))
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
                     desc=f"edge {n_edge + 1}: {role} --{kind}--> {receiver or 'logits'} {loaded.name}")
        n_edge += 1
        scores, se = _edge_scores(loaded, folder, clean, counterfactual, cfg, step, progress)
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
            groups[key] = _Group(key, role, new, [float(scores[h]) for h in new], "", rest,
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
        mass = attention_sources(loaded, held_out[:min(32, len(held_out))], g.role, g.heads,
                                 partition)
        g.function = _name(g, g.key in writes, mass, partition)
        renamed[g.key] = _key(g.function, taken)
    groups = {renamed[k]: _Group(renamed[k], g.role, g.heads, g.scores, g.function, g.extra,
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
                     "sizes": None if cfg.sizes is None else list(cfg.sizes),
                     "on_unreachable": cfg.on_unreachable,
                     "groups": {k: [g.role, [format_head(h) for h in g.heads], g.scores,
                                    [format_head(h) for h in g.extra], g.extra_scores]
                                for k, g in groups.items()}}

    def run_size() -> dict:
        units, curve, summary = _size(loaded, held_out, means, groups, cfg, full_correct,
                                      all_roles)
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
         "extra_candidates": {k: {format_head(h): s for h, s in zip(g.extra, g.extra_scores)}
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
          groups: dict[str, _Group], cfg, full_correct: torch.Tensor, all_roles: list[str]
          ) -> tuple[list[tuple[str, Head]], list[dict], dict]:
    """Choose the circuit's (group, head) units: fixed ``cfg.sizes`` per group, or the smallest
    score-ordered prefix whose faithfulness *lower bound* (``cfg.size_z`` paired standard errors
    below the estimate: a circuit chosen on noise would not hold on other prompts) reaches
    ``cfg.target``, then pruned under the same criterion. Returns the units, the curve and a
    summary (faithfulness of the result under both protocols)."""
    L, H = loaded.arch.n_layers, loaded.arch.n_heads
    roles = {k: g.role for k, g in groups.items()}
    ev = dict(batch_size=cfg.batch_size, max_rows=cfg.max_rows)
    full_c = full_correct.double()
    full = float(full_c.mean())

    def masks(units):
        return _masks(units, roles, L, H, all_roles)

    def measure(variants: list[dict], n: int | None = None) -> list[tuple[float, float, float]]:
        """(accuracy, faithfulness, its lower bound) of each variant (on the first ``n``
        prompts)."""
        n = len(prompts) if n is None else n
        c = variant_correct(loaded, prompts[:n], means, variants, **ev).double()  # [V, n]
        base = full_c[:n]
        acc = c.mean(1)
        ref = float(base.mean())
        se = (base[None] - c).std(1) / n ** 0.5 / ref
        f = acc / ref
        return [(float(a), float(x), float(x - cfg.size_z * e)) for a, x, e in zip(acc, f, se)]

    def n_units(units) -> int:
        return len({(roles[g], h) for g, h in units})

    def point(units, step: str, **extra) -> dict:
        return {"units": n_units(units), "step": step, **extra}

    if cfg.sizes is not None:
        units = [(k, h) for i, (k, g) in enumerate(groups.items())
                 for h in g.heads[:cfg.sizes[min(i, len(cfg.sizes) - 1)]]]
        (acc, f, lb), = measure([masks(units)])
        curve = [point(units, "fixed sizes", accuracy=acc, faithfulness=f, lower_bound=lb)]
        return units, curve, _summary(loaded, prompts, means, masks(units), full, units, roles,
                                      cfg, ev, f)

    # every group's significant heads by relative score (every group's best first), then its
    # other senders with a negative score, also by relative score
    def by_relative(pairs) -> list[tuple[str, Head]]:
        order = sorted(((k, h, s / min(groups[k].scores)) for k, h, s in pairs),
                       key=lambda x: -x[2])
        return [(k, h) for k, h, _ in order]
    candidates = by_relative((k, h, s) for k, g in groups.items()
                             for h, s in zip(g.heads, g.scores)) + \
        by_relative((k, h, s) for k, g in groups.items()
                    for h, s in zip(g.extra, g.extra_scores))
    ceiling = {r: torch.ones(L, H, dtype=torch.bool) for r in all_roles}
    prefixes = [candidates[:i] for i in range(1, len(candidates) + 1)]
    # grow coarse to fine: every GROW_STEP-th prefix (stacked, a chunk at a time, stopping at the
    # first chunk where one reaches the target), then every prefix inside the last step
    measured: dict[int, tuple[float, float, float]] = {}
    coarse = list(range(GROW_STEP - 1, len(prefixes), GROW_STEP))
    if not coarse or coarse[-1] != len(prefixes) - 1:
        coarse.append(len(prefixes) - 1)
    chunk = max(1, cfg.max_rows // max(1, min(len(prompts), cfg.batch_size)))
    for i in range(0, len(coarse), chunk):
        todo = coarse[i:i + chunk]
        measured.update(zip(todo, measure([masks(prefixes[j]) for j in todo])))
        if any(measured[j][2] >= cfg.target for j in todo):
            break
    first = min((j for j in measured if measured[j][2] >= cfg.target), default=None)
    if first is not None:
        fine = [j for j in range(max(0, first - GROW_STEP + 1), first) if j not in measured]
        measured.update(zip(fine, measure([masks(prefixes[j]) for j in fine])))
    order = sorted(measured)
    grown = [measured[j] for j in order]
    curve = [point(prefixes[j], "grow", added=f"{prefixes[j][-1][0]}:"
                   f"{format_head(prefixes[j][-1][1])}", accuracy=a, faithfulness=f,
                   lower_bound=lb) for j, (a, f, lb) in zip(order, grown)]
    ceiling_f = None
    reach = [order[i] for i, (_, _, lb) in enumerate(grown) if lb >= cfg.target]
    note = ""
    if not reach:
        ceiling_f = measure([ceiling])[0][1]
        if max(f for _, f, _ in grown) < cfg.target:
            msg = (f"target faithfulness {cfg.target:.2f} is unreachable: all {len(candidates)} "
                   f"candidate heads ({n_units(candidates)} head x role units: every sender with "
                   f"a negative score on the traced edges) reach {grown[-1][1]:.2f}, and keeping "
                   f"every head at the circuit's roles ({', '.join(all_roles)}) reaches "
                   f"{ceiling_f:.2f} (full model accuracy {full:.2f} on {len(prompts)} held-out "
                   f"prompts = faithfulness 1.00). Lower --target or give fixed --sizes.")
            units = candidates
            return units, curve, _summary(loaded, prompts, means, masks(units), full, units,
                                          roles, cfg, ev, grown[-1][1], message=msg,
                                          ceiling=ceiling_f,
                                          unreachable=cfg.on_unreachable == "error")
        best = max(order, key=lambda j: (measured[j][2], -j))
        note = (f"faithfulness {cfg.target:.2f} is reached as an estimate but not with "
                f"{cfg.size_z:g} standard errors to spare on {len(prompts)} held-out prompts; "
                f"kept the prefix with the best lower bound ({measured[best][2]:.2f}); use more "
                f"--n-validate prompts for a firmer size")
        reach = [best]
    units = prefixes[reach[0]]
    ok = lambda lb: lb >= min(cfg.target, measured[reach[0]][2])  # noqa: E731
    # prune: single removals that keep the criterion, then the longest run of them (least harm
    # first) that still keeps it, found by bisection over the run's length
    # (single removals are screened on the first half of the prompts; every accepted removal
    # set is then checked on all of them)
    half = max(1, len(prompts) // 2)
    drops = measure([masks([u for u in units if u != v]) for v in units], half)
    removable = sorted((i for i, (_, f, _) in enumerate(drops) if f >= cfg.target),
                       key=lambda i: -drops[i][1])

    def without_first(n: int) -> list[tuple[str, Head]]:
        gone = set(removable[:n])
        return [u for j, u in enumerate(units) if j not in gone]

    lo, hi = 0, len(removable)  # invariant: removing the first lo keeps the criterion
    while lo < hi:
        mid = (lo + hi + 1) // 2
        trial = without_first(mid)
        (a, f, lb), = measure([masks(trial)])
        curve.append(point(trial, "prune", accuracy=a, faithfulness=f, lower_bound=lb,
                           removed=[f"{units[i][0]}:{format_head(units[i][1])}"
                                    for i in removable[:mid]]))
        lo, hi = (mid, hi) if ok(lb) else (lo, mid - 1)
    units = without_first(lo)
    (_, final_f, final_lb), = measure([masks(units)])
    out = _summary(loaded, prompts, means, masks(units), full, units, roles, cfg, ev, final_f,
                   message=note, ceiling=ceiling_f)
    out["lower_bound"] = final_lb
    return units, curve, out


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
