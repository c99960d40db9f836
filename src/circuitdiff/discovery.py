"""Circuit discovery: the paper's chain of four path-patching steps, saved to a run folder.

Value Fetchers (receiver: logits, at last) → Position Transmitters (q of the top VF heads, last)
→ Position Detectors (v of the top PT heads, query label) → Structure Readers (v of the top PD
heads, previous query label). Each step keeps the ``size`` heads with the most negative scores
(paper: 20 / 5 / 10 / 5) and they become the next step's receivers.

Every step's scores are cached in the run folder (safetensors, tagged with the settings that
produced them), so a killed run resumes at the first missing step; the prompts, the circuit JSON
and a heatmap per group are written alongside.

Methods: ``exact`` (fast exact path patching), ``attribution`` (gradient estimate, one
forward/backward pair per batch) and ``hybrid`` (attribution, then exact scores for the top
``hybrid_k`` candidates only; the group is chosen among those candidates).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .circuit import PAPER_GROUPS, Circuit, CircuitGroup, Head, format_head
from .model import LoadedModel
from .path_patching import (PathPatchingError, ScoreComparison, attribution_scores,
                            compare_scores, path_patching_scores, top_heads)
from .plotting import pyplot, save_figure
from .runs import RunFolder
from .task import EntityTrackingTask, Prompt, TaskConfig, load_jsonl, save_jsonl

#: (group, position, receiver kind for the next group) — receivers of step i are group i-1
PAPER_CHAIN: tuple[tuple[str, str, str | None], ...] = (
    ("value_fetcher", "last", None),
    ("position_transmitter", "last", "q"),
    ("position_detector", "query_label", "v"),
    ("structure_reader", "prev_query_label", "v"),
)
assert tuple((g, p) for g, p, _ in PAPER_CHAIN) == PAPER_GROUPS
#: receivers kept from each step for the next (Prakash et al., Llama-7B)
PAPER_SIZES: tuple[int, ...] = (20, 5, 10, 5)
METHODS = ("exact", "attribution", "hybrid")


def parse_sizes(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"20,5,10,5"`` → ``(20, 5, 10, 5)``; one positive size per group."""
    if isinstance(text, str):
        try:
            sizes = tuple(int(x) for x in text.split(","))
        except ValueError:
            raise PathPatchingError(f"sizes {text!r} must be comma-separated integers, e.g. "
                                    f"20,5,10,5") from None
    else:
        sizes = tuple(int(x) for x in text)
    if len(sizes) != len(PAPER_CHAIN):
        raise PathPatchingError(f"give {len(PAPER_CHAIN)} sizes (one per group: "
                                f"{', '.join(g for g, _, _ in PAPER_CHAIN)}), got {len(sizes)}")
    for (g, _, _), k in zip(PAPER_CHAIN, sizes):
        if k < 1:
            raise PathPatchingError(f"group {g} has size {k}: every group needs at least one "
                                    f"head (an empty group has no receivers for the next step)")
    return sizes


@dataclass
class DiscoveryResult:
    """The circuit, each step's scores ``[layers, heads]`` and, if asked, estimate-vs-exact."""

    circuit: Circuit
    scores: dict[str, torch.Tensor]
    attribution: dict[str, torch.Tensor] = field(default_factory=dict)
    comparisons: dict[str, ScoreComparison] = field(default_factory=dict)


def _heatmap(scores: torch.Tensor, title: str, path: Path, heads: Sequence[Head]) -> None:
    plt = pyplot()

    s = scores.float().numpy()
    lim = float(abs(scores[torch.isfinite(scores)]).max()) if torch.isfinite(scores).any() else 1.0
    fig, ax = plt.subplots(figsize=(max(4, s.shape[1] * 0.25 + 2), max(3, s.shape[0] * 0.2 + 1)))
    im = ax.imshow(s, cmap="RdBu", vmin=-lim or -1, vmax=lim or 1, aspect="auto",
                   interpolation="nearest")
    for layer, head in heads:
        ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, lw=1.2))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="path-patching score")
    save_figure(fig, path, dpi=100)


def discover_circuit(loaded: LoadedModel, out: str | Path, *, n_prompts: int = 100,
                     sizes: Sequence[int] | str = PAPER_SIZES, method: str = "exact",
                     n_boxes: int = 7, seed: int = 0, clean: Sequence[Prompt] | None = None,
                     counterfactual: Sequence[Prompt] | None = None, batch_size: int = 32,
                     hybrid_k: int | None = None, compare_exact: bool = False,
                     impl: str = "fast", progress: bool = False,
                     heatmaps: bool = True, truncate: bool = False) -> DiscoveryResult:
    """Run the four-step chain on ``loaded``, saving everything under ``out``.

    ``clean``/``counterfactual`` default to ``n_prompts`` task prompts and ``task.corrupt()`` of
    them (saved as clean.jsonl / counterfactual.jsonl, reused on resume). ``hybrid_k`` (default
    ``3 x size``) is how many attribution candidates get exact scores. ``compare_exact`` computes
    both exact and attribution scores for every group (whatever the method) and reports the
    attribution's Spearman rank correlation and top-``size`` recall against exact scores, over
    the heads that can reach the receivers. Writes ``scores_<group>.safetensors``, ``circuit.json``,
    ``heatmap_<group>.png``; returns a :class:`DiscoveryResult`.
    """
    if method not in METHODS:
        raise PathPatchingError(f"method must be one of {METHODS}, got {method!r}")
    sizes = parse_sizes(sizes)
    arch = loaded.arch
    for (g, _, _), k in zip(PAPER_CHAIN, sizes):
        if k > arch.n_layers * arch.n_heads:
            raise PathPatchingError(f"group {g} asks for {k} heads; the model has "
                                    f"{arch.n_layers * arch.n_heads}")
    folder = RunFolder(out)
    if clean is None:
        if (folder.file("clean.jsonl").exists() and folder.file("counterfactual.jsonl").exists()
                and folder.file("prompts.json").exists()
                and folder.load_json("prompts.json") == {"n": n_prompts, "n_boxes": n_boxes,
                                                         "seed": seed}):
            clean, _ = load_jsonl(folder.file("clean.jsonl"))
            counterfactual, _ = load_jsonl(folder.file("counterfactual.jsonl"))
        else:
            task = EntityTrackingTask(loaded.tokenizer, TaskConfig(n_boxes=n_boxes), seed=seed)
            clean = task.sample(n_prompts)
            counterfactual = task.corrupt(clean)
            save_jsonl(folder.file("clean.jsonl"), clean)
            save_jsonl(folder.file("counterfactual.jsonl"), counterfactual)
            folder.save_json("prompts.json", {"n": n_prompts, "n_boxes": n_boxes, "seed": seed})
    elif counterfactual is None:
        raise PathPatchingError("clean prompts given without their counterfactuals")
    else:
        save_jsonl(folder.file("clean.jsonl"), clean)
        save_jsonl(folder.file("counterfactual.jsonl"), counterfactual)
    prompts_id = [p.to_dict() for p in clean] + [p.to_dict() for p in counterfactual]
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(prompts_id, sort_keys=True).encode()).hexdigest()[:16]
    base = {"model": loaded.name, "prompts": digest, "n": len(clean)}

    groups: dict[str, CircuitGroup] = {}
    scores: dict[str, torch.Tensor] = {}
    attrs: dict[str, torch.Tensor] = {}
    comps: dict[str, ScoreComparison] = {}
    receivers: list[Head] = []
    truncated_at: str | None = None
    kw = dict(batch_size=batch_size, progress=progress)
    for step, ((group, position, _), size) in enumerate(zip(PAPER_CHAIN, sizes)):
        kind = PAPER_CHAIN[step][2] or "q"
        # only heads below the last receiver layer can reach a receiver (the others score 0)
        end = max(l for l, _ in receivers) if receivers else arch.n_layers
        if truncated_at is not None or (end == 0 and truncate):
            truncated_at = truncated_at or group
            groups[group] = CircuitGroup([], position)
            scores[group] = torch.zeros(arch.n_layers, arch.n_heads)
            continue
        if end == 0:
            raise PathPatchingError(
                f"every {PAPER_CHAIN[step - 1][0]} head found is in layer 0, so no head can send "
                f"to them and {group} cannot be found; keep more {PAPER_CHAIN[step - 1][0]} "
                f"heads (sizes) or use more prompts")
        eligible = torch.zeros(arch.n_layers, arch.n_heads, dtype=torch.bool)
        eligible[:end] = True
        nan = float("nan")

        def pick(s: torch.Tensor, k: int) -> list[Head]:
            return top_heads(torch.where(eligible, s, torch.full_like(s, nan)),
                             min(k, int(eligible.sum())))
        settings = {**base, "group": group, "position": position, "receiver_kind": kind,
                    "receivers": [format_head(h) for h in receivers]}
        desc = f"{step + 1}/4 {group}"

        def exact(senders=None):
            return path_patching_scores(loaded, clean, counterfactual, position, receivers, kind,
                                        senders=senders, impl=impl, desc=desc, **kw)

        def attribution():
            return attribution_scores(loaded, clean, counterfactual, position, receivers, kind,
                                      **kw)

        if method == "exact":
            got = folder.cached_tensors(f"scores_{group}.safetensors",
                                        {**settings, "method": "exact"},
                                        lambda: {"scores": exact()})
            chosen = pick(got["scores"], size)
            if compare_exact:  # how well would the gradient estimate have done?
                attrs[group] = folder.cached_tensors(f"attribution_{group}.safetensors",
                                                     {**settings, "method": "attribution"},
                                                     lambda: {"scores": attribution()})["scores"]
                comps[group] = compare_scores(attrs[group],
                                              torch.where(eligible, got["scores"], nan), size)
        else:
            att = folder.cached_tensors(f"attribution_{group}.safetensors",
                                        {**settings, "method": "attribution"},
                                        lambda: {"scores": attribution()})["scores"]
            attrs[group] = att
            if method == "attribution":
                got = {"scores": att}
                chosen = pick(att, size)
            else:
                cands = pick(att, max(hybrid_k or 3 * size, size))
                k = len(cands)

                def hybrid():
                    ex = exact(cands)
                    mask = torch.zeros_like(ex, dtype=torch.bool)
                    idx = torch.tensor(cands)
                    mask[idx[:, 0], idx[:, 1]] = True
                    unscored = torch.full_like(ex, nan)
                    rest = torch.where(eligible, unscored, 0 * ex)  # ineligible: exactly 0
                    return {"scores": torch.where(mask, ex, rest)}
                got = folder.cached_tensors(f"scores_{group}.safetensors",
                                            {**settings, "method": "hybrid", "hybrid_k": k},
                                            hybrid)
                chosen = pick(got["scores"], size)
            if compare_exact:
                full = folder.cached_tensors(f"exact_{group}.safetensors",
                                             {**settings, "method": "exact"},
                                             lambda: {"scores": exact()})["scores"]
                # heads that cannot reach the receivers are 0 in both: leave them out
                comps[group] = compare_scores(att, torch.where(eligible, full, nan), size)
        scores[group] = got["scores"]
        groups[group] = CircuitGroup(chosen, position)
        if heatmaps:
            _heatmap(got["scores"], f"{group} @ {position}\n{Path(loaded.name).name}",
                     folder.file(f"heatmap_{group}.png"), chosen)
        receivers = chosen
    circuit = Circuit(groups, arch.n_layers, arch.n_heads, loaded.name,
                      {"method": "path_patching", "scoring": method, "sizes": list(sizes),
                       "n_prompts": len(clean), "n_boxes": clean[0].n_boxes, "seed": seed,
                       "prompts": digest, "adapter": loaded.adapter,
                       "hybrid_k": hybrid_k if method == "hybrid" else None,
                       "truncated_at": truncated_at,
                       "top_scores": {g: [float(scores[g][l, h]) for l, h in groups[g].heads]
                                      for g in groups}})
    circuit.save(folder.file("circuit.json"))
    if comps:
        folder.save_json("comparison.json", {g: c.to_dict() for g, c in comps.items()})
    return DiscoveryResult(circuit, scores, attrs, comps)


__all__ = ["DiscoveryResult", "METHODS", "PAPER_CHAIN", "PAPER_SIZES", "discover_circuit",
           "parse_sizes"]
