"""The paper's fixed four-step chain with fixed sizes.

Value Fetchers (receiver: logits, at last) → Position Transmitters (q of the top VF heads, last)
→ Position Detectors (v of the top PT heads, query label) → Structure Readers (v of the top PD
heads, previous query label). Each step keeps the ``size`` heads with the most negative scores
(paper: 20 / 5 / 10 / 5) and they become the next step's receivers.
"""

from __future__ import annotations

import torch

from ...core.circuit import Circuit, CircuitGroup, Head, format_head
from ..path_patching import PathPatchingError
from .config import PAPER_CHAIN
from .steps import Context, DiscoveryResult, Step, score_step


def run_paper(ctx: Context) -> DiscoveryResult:
    """The paper chain on ``ctx``'s prompts; writes every step's scores and ``circuit.json``."""
    loaded, cfg = ctx.loaded, ctx.cfg
    arch = loaded.arch
    for (g, _, _), k in zip(PAPER_CHAIN, cfg.sizes):
        if k > arch.n_layers * arch.n_heads:
            raise PathPatchingError(f"group {g} asks for {k} heads; the model has "
                                    f"{arch.n_layers * arch.n_heads}")
    groups: dict[str, CircuitGroup] = {}
    result = DiscoveryResult(None, {})  # circuit set below
    receivers: list[Head] = []
    truncated_at: str | None = None
    for i, ((group, position, _), size) in enumerate(zip(PAPER_CHAIN, cfg.sizes)):
        kind = PAPER_CHAIN[i][2] or "q"
        # only heads below the last receiver layer can reach a receiver (the others score 0)
        end = max(l for l, _ in receivers) if receivers else arch.n_layers
        if truncated_at is not None or (end == 0 and cfg.truncate):
            truncated_at = truncated_at or group
            groups[group] = CircuitGroup([], position)
            result.scores[group] = torch.zeros(arch.n_layers, arch.n_heads)
            continue
        if end == 0:
            prev = PAPER_CHAIN[i - 1][0]
            raise PathPatchingError(
                f"every {prev} head found is in layer 0, so no head can send to them and {group} "
                f"cannot be found; keep more {prev} heads (sizes) or pass --truncate")
        eligible = torch.zeros(arch.n_layers, arch.n_heads, dtype=torch.bool)
        eligible[:end] = True
        step = Step(i, group, position, kind, receivers, size, eligible,
                    {**ctx.base, "group": group, "position": position, "receiver_kind": kind,
                     "receivers": [format_head(h) for h in receivers]},
                    desc=f"{i + 1}/{len(PAPER_CHAIN)} {group} {loaded.name}",
                    paper=True, min_candidates=size)
        scored = score_step(ctx, step, compare=cfg.compare_exact)
        result.scores[group] = scored.scores
        if scored.attribution is not None:
            result.attribution[group] = scored.attribution
        if scored.comparison is not None:
            result.comparisons[group] = scored.comparison
        chosen = step.pick(scored.scores, size)
        groups[group] = CircuitGroup(chosen, position)
        receivers = chosen
    result.circuit = Circuit(
        groups, arch.n_layers, arch.n_heads, loaded.name,
        {"method": "path_patching", "chain": "paper", "scoring": cfg.method,
         "sizes": list(cfg.sizes),
         "n_prompts": len(ctx.clean), "n_boxes": ctx.clean[0].n_boxes, "seed": cfg.seed,
         "prompts": ctx.base["prompts"], "adapter": loaded.adapter,
         "hybrid_k": cfg.hybrid_k if cfg.method == "hybrid" else None,
         "truncated_at": truncated_at,
         "top_scores": {g: [float(result.scores[g][l, h]) for l, h in groups[g].heads]
                        for g in groups}})
    return result


__all__ = ["run_paper"]
