"""Circuit discovery: the paper's chain of four path-patching steps, saved to a run folder.

Value Fetchers (receiver: logits, at last) → Position Transmitters (q of the top VF heads, last)
→ Position Detectors (v of the top PT heads, query label) → Structure Readers (v of the top PD
heads, previous query label). Each step keeps the ``size`` heads with the most negative scores
(paper: 20 / 5 / 10 / 5) and they become the next step's receivers.

Every step's scores are cached in the run folder (safetensors, tagged with the settings that
produced them), so a killed run resumes at the first missing step; the prompts and the circuit
JSON are written alongside (heatmaps are drawn by :mod:`circuitdiff.report.figures`).

Methods: ``exact`` (fast exact path patching), ``attribution`` (gradient estimate, one
forward/backward pair per batch) and ``hybrid`` (attribution, then exact scores for the top
``hybrid_k`` candidates only; the group is chosen among those candidates).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..core.circuit import PAPER_GROUPS, Circuit, CircuitGroup, Head, format_head
from ..core.model import LoadedModel
from ..core.runs import RunFolder, settings_digest
from ..core.task import EntityTrackingTask, Prompt, TaskConfig, load_jsonl, save_jsonl
from .path_patching import (IMPLS, PathPatchingError, ScoreComparison, attribution_scores,
                            compare_scores, path_patching_scores, top_heads)

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
class DiscoveryConfig:
    """Everything that decides a discovery run.

    ``hybrid_k`` (default ``3 x size``) is how many attribution candidates get exact scores;
    ``compare_exact`` computes both exact and attribution scores for every group and reports the
    attribution's Spearman correlation and top-``size`` recall; ``truncate`` leaves the later
    groups empty when a group lies wholly in layer 0 (no head can send to it) instead of failing.
    """

    n_prompts: int = 100
    sizes: tuple[int, ...] = PAPER_SIZES
    method: str = "exact"
    n_boxes: int = 7
    seed: int = 0
    batch_size: int = 32
    hybrid_k: int | None = None
    compare_exact: bool = False
    impl: str = "fast"
    truncate: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PathPatchingError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.impl not in IMPLS:
            raise PathPatchingError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        self.sizes = parse_sizes(self.sizes)

    def to_dict(self) -> dict:
        return {**asdict(self), "sizes": list(self.sizes)}


@dataclass
class DiscoveryResult:
    """The circuit, each step's scores ``[layers, heads]`` and, if asked, estimate-vs-exact."""

    circuit: Circuit
    scores: dict[str, torch.Tensor]
    attribution: dict[str, torch.Tensor] = field(default_factory=dict)
    comparisons: dict[str, ScoreComparison] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"circuit": self.circuit.to_dict(),
                "comparisons": {g: c.to_dict() for g, c in self.comparisons.items()}}

    def save(self, out: str | Path) -> None:
        """``circuit.json`` (and ``comparison.json`` when scores were compared) in ``out``."""
        folder = RunFolder(out)
        self.circuit.save(folder.file("circuit.json"))
        if self.comparisons:
            folder.save_json("comparison.json",
                             {g: c.to_dict() for g, c in self.comparisons.items()})


def discovery_prompts(loaded: LoadedModel, folder: RunFolder, cfg: DiscoveryConfig
                      ) -> tuple[list[Prompt], list[Prompt]]:
    """``cfg.n_prompts`` task prompts and ``task.corrupt()`` of them, reused from ``folder``
    when saved there with the same settings."""
    want = {"n": cfg.n_prompts, "n_boxes": cfg.n_boxes, "seed": cfg.seed}
    if all(folder.file(f).exists() for f in ("clean.jsonl", "counterfactual.jsonl", "prompts.json")) \
            and folder.load_json("prompts.json") == want:
        return load_jsonl(folder.file("clean.jsonl"))[0], \
            load_jsonl(folder.file("counterfactual.jsonl"))[0]
    task = EntityTrackingTask(loaded.tokenizer, TaskConfig(n_boxes=cfg.n_boxes), seed=cfg.seed)
    clean = task.sample(cfg.n_prompts)
    counterfactual = task.corrupt(clean)
    save_jsonl(folder.file("clean.jsonl"), clean)
    save_jsonl(folder.file("counterfactual.jsonl"), counterfactual)
    folder.save_json("prompts.json", want)
    return clean, counterfactual


@dataclass
class _Step:
    """One path-patching step of the chain, with what it needs to score and cache."""

    index: int
    group: str
    position: str
    kind: str
    receivers: list[Head]
    size: int
    eligible: torch.Tensor          # bool [L, H]: heads below the last receiver layer
    settings: dict

    def pick(self, scores: torch.Tensor, k: int) -> list[Head]:
        masked = torch.where(self.eligible, scores, torch.full_like(scores, float("nan")))
        return top_heads(masked, min(k, int(self.eligible.sum())))

    def masked(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores with heads that cannot reach the receivers set to NaN (left out of comparisons)."""
        return torch.where(self.eligible, scores, float("nan"))


def _score_step(loaded: LoadedModel, folder: RunFolder, clean, counterfactual,
                cfg: DiscoveryConfig, step: _Step, progress: bool):
    """Scores, chosen heads, attribution (or None) and comparison (or None) of one step."""
    kw = dict(batch_size=cfg.batch_size, progress=progress)
    args = (loaded, clean, counterfactual, step.position, step.receivers, step.kind)
    desc = f"{step.index + 1}/{len(PAPER_CHAIN)} {step.group} {loaded.name}"

    def exact(senders=None) -> torch.Tensor:
        return path_patching_scores(*args, senders=senders, impl=cfg.impl, desc=desc, **kw)

    def cached(name: str, method: str, compute, **extra) -> torch.Tensor:
        return folder.cached_tensors(f"{name}_{step.group}.safetensors",
                                     {**step.settings, "method": method, **extra},
                                     lambda: {"scores": compute()})["scores"]

    att = comparison = None
    if cfg.method == "exact":
        scores = cached("scores", "exact", exact)
        if cfg.compare_exact:  # how well would the gradient estimate have done?
            att = cached("attribution", "attribution", lambda: attribution_scores(*args, **kw))
            comparison = compare_scores(att, step.masked(scores), step.size)
        return scores, step.pick(scores, step.size), att, comparison
    att = cached("attribution", "attribution", lambda: attribution_scores(*args, **kw))
    if cfg.method == "attribution":
        scores = att
    else:
        cands = step.pick(att, max(cfg.hybrid_k or 3 * step.size, step.size))

        def hybrid() -> torch.Tensor:
            ex = exact(cands)
            scored = torch.zeros_like(ex, dtype=torch.bool)
            idx = torch.tensor(cands)
            scored[idx[:, 0], idx[:, 1]] = True
            rest = torch.where(step.eligible, float("nan"), 0 * ex)  # ineligible: exactly 0
            return torch.where(scored, ex, rest)
        scores = cached("scores", "hybrid", hybrid, hybrid_k=len(cands))
    if cfg.compare_exact:
        full = cached("exact", "exact", exact)
        comparison = compare_scores(att, step.masked(full), step.size)
    return scores, step.pick(scores, step.size), att, comparison


def discover(loaded: LoadedModel, out: str | Path, config: DiscoveryConfig | None = None, *,
             clean: Sequence[Prompt] | None = None,
             counterfactual: Sequence[Prompt] | None = None,
             progress: bool = False) -> DiscoveryResult:
    """Run the four-step chain on ``loaded``, saving everything under ``out``.

    ``clean``/``counterfactual`` default to the config's task prompts and ``task.corrupt()`` of
    them (saved as clean.jsonl / counterfactual.jsonl, reused on resume). Writes
    ``scores_<group>.safetensors`` and ``circuit.json``; returns a :class:`DiscoveryResult`.
    """
    cfg = config or DiscoveryConfig()
    arch = loaded.arch
    for (g, _, _), k in zip(PAPER_CHAIN, cfg.sizes):
        if k > arch.n_layers * arch.n_heads:
            raise PathPatchingError(f"group {g} asks for {k} heads; the model has "
                                    f"{arch.n_layers * arch.n_heads}")
    folder = RunFolder(out)
    if clean is None:
        clean, counterfactual = discovery_prompts(loaded, folder, cfg)
    elif counterfactual is None:
        raise PathPatchingError("clean prompts given without their counterfactuals")
    else:
        save_jsonl(folder.file("clean.jsonl"), clean)
        save_jsonl(folder.file("counterfactual.jsonl"), counterfactual)
    digest = settings_digest([p.to_dict() for p in clean] + [p.to_dict() for p in counterfactual])
    base = {"model": loaded.name, "prompts": digest, "n": len(clean)}

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
        step = _Step(i, group, position, kind, receivers, size, eligible,
                     {**base, "group": group, "position": position, "receiver_kind": kind,
                      "receivers": [format_head(h) for h in receivers]})
        scores, chosen, att, comparison = _score_step(loaded, folder, clean, counterfactual, cfg,
                                                      step, progress)
        result.scores[group] = scores
        if att is not None:
            result.attribution[group] = att
        if comparison is not None:
            result.comparisons[group] = comparison
        groups[group] = CircuitGroup(chosen, position)
        receivers = chosen
    result.circuit = Circuit(
        groups, arch.n_layers, arch.n_heads, loaded.name,
        {"method": "path_patching", "scoring": cfg.method, "sizes": list(cfg.sizes),
         "n_prompts": len(clean), "n_boxes": clean[0].n_boxes, "seed": cfg.seed,
         "prompts": digest, "adapter": loaded.adapter,
         "hybrid_k": cfg.hybrid_k if cfg.method == "hybrid" else None,
         "truncated_at": truncated_at,
         "top_scores": {g: [float(result.scores[g][l, h]) for l, h in groups[g].heads]
                        for g in groups}})
    result.save(out)
    return result


__all__ = ["DiscoveryConfig", "DiscoveryResult", "METHODS", "PAPER_CHAIN", "PAPER_SIZES",
           "discover", "discovery_prompts", "parse_sizes"]
