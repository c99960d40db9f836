"""What both chains share: the run context (model, prompts, folder, capture cache), the
prompts, the result, and ONE scorer of a path-patching step (exact, attribution or hybrid),
cached in the run folder.

Scores of heads the step did not score exactly: **NaN** for a head that could have reached
the receivers but was not among the hybrid's candidates ("not scored": left out of choices,
comparisons and significance), **0** for a head at or above the last receiver layer (it
cannot reach a receiver: its effect is exactly 0). Both chains use this one rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ...core.circuit import Circuit, Head, format_head
from ...core.model import LoadedModel
from ...core.runs import RunFolder, settings_digest
from ...core.task import EntityTrackingTask, Prompt, TaskConfig, load_jsonl, save_jsonl
from ..base import Result
from ..path_patching import (CaptureCache, FastOptions, PatchRequest, PathPatchingError,
                             ScoreComparison, attribution_scores, compare_scores,
                             path_patching_scores, top_heads)
from ..scan import ScanResult
from .config import DiscoveryConfig


@dataclass
class DiscoveryResult(Result):
    """The circuit, each step's scores ``[layers, heads]`` (keyed by group for the paper chain,
    by traced edge for the automatic one) and, if asked, estimate-vs-exact. The automatic chain
    adds the position scan, the size-vs-faithfulness curve and its summary numbers."""

    circuit: Circuit
    scores: dict[str, torch.Tensor]
    attribution: dict[str, torch.Tensor] = field(default_factory=dict)
    comparisons: dict[str, ScoreComparison] = field(default_factory=dict)
    scan: "ScanResult | None" = None
    curve: list[dict] = field(default_factory=list)
    sizing: dict = field(default_factory=dict)
    edges_scored: list[dict] = field(default_factory=list)
    #: wall seconds per phase of the call that made this result (validate, means, scan, edges,
    #: naming, sizing; a phase loaded from the run folder takes ~0)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The JSON part (``discovery.json``): circuit, comparisons, scan, curve, sizing,
        traced edges (score tensors are in the run folder's safetensors)."""
        return {"circuit": self.circuit.to_dict(),
                "comparisons": {g: c.to_dict() for g, c in self.comparisons.items()},
                "scan": None if self.scan is None else self.scan.to_dict(),
                "curve": self.curve, "sizing": self.sizing, "edges_scored": self.edges_scored,
                "timings": self.timings}

    def save(self, out: str | Path) -> None:
        """``circuit.json`` (and ``comparison.json`` when scores were compared; ``curve.json``
        and ``discovery.json`` for the automatic chain) in ``out``."""
        folder = RunFolder(out)
        self.circuit.save(folder.file("circuit.json"))
        if self.comparisons:
            folder.save_json("comparison.json",
                             {g: c.to_dict() for g, c in self.comparisons.items()})
        if self.curve:
            folder.save_json("curve.json", {"curve": self.curve, **self.sizing})
        if self.scan is not None:
            folder.save_json("discovery.json", self.to_dict())


def discovery_prompts(loaded: LoadedModel, folder: RunFolder, cfg: DiscoveryConfig
                      ) -> tuple[list[Prompt], list[Prompt]]:
    """``cfg.n_prompts`` task prompts and ``task.corrupt()`` of them, reused from ``folder``
    when saved there with the same settings."""
    want = {"n": cfg.n_prompts, "n_boxes": cfg.n_boxes, "seed": cfg.seed}
    if all(folder.file(f).exists() for f in ("clean.jsonl", "counterfactual.jsonl",
                                             "prompts.json")) \
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
class Context:
    """One discovery run: the model, its folder, the prompt pairs, the config, the settings
    every cached score is tagged with (``base``) and the capture cache the steps share."""

    loaded: LoadedModel
    folder: RunFolder
    clean: Sequence[Prompt]
    counterfactual: Sequence[Prompt]
    cfg: DiscoveryConfig
    base: dict
    progress: bool = False
    cache: CaptureCache | None = None
    #: why ``auto`` settings resolved as they did on this model (kept in the circuit's metadata)
    rules: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, loaded: LoadedModel, folder: RunFolder, cfg: DiscoveryConfig,
             prompts: tuple[Sequence[Prompt], Sequence[Prompt]] | None, progress: bool,
             cache: CaptureCache | None) -> "Context":
        """Clean and counterfactual prompts (given, or the config's, saved in ``folder``) and
        the base settings."""
        if prompts is None:
            clean, counterfactual = discovery_prompts(loaded, folder, cfg)
        else:
            try:
                clean, counterfactual = prompts
            except (TypeError, ValueError):
                raise PathPatchingError("prompts must be None or a (clean, counterfactual) "
                                        "pair of prompt lists") from None
            if counterfactual is None:
                raise PathPatchingError("clean prompts given without their counterfactuals")
            save_jsonl(folder.file("clean.jsonl"), clean)
            save_jsonl(folder.file("counterfactual.jsonl"), counterfactual)
        digest = settings_digest([p.to_dict() for p in clean] +
                                 [p.to_dict() for p in counterfactual])
        base = {"model": loaded.name, "adapter": loaded.adapter, "prompts": digest,
                "n": len(clean)}
        return cls(loaded, folder, clean, counterfactual, cfg, base, progress, cache)


@dataclass
class Step:
    """One path-patching step of a chain, with what it needs to score and cache.

    ``size`` is the group size the hybrid's candidates scale with (``hybrid_k`` or 3 x size,
    at least ``min_candidates``); ``paper`` selects the paper chain's cache tags (the two
    chains' saved settings differ and are kept as they were)."""

    index: int
    group: str
    position: str
    kind: str
    receivers: list[Head]
    size: int
    eligible: torch.Tensor          # bool [L, H]: heads below the last receiver layer
    settings: dict
    desc: str = ""
    paper: bool = True
    min_candidates: int = 1

    def request(self, senders: Sequence[Head] | None = None) -> PatchRequest:
        return PatchRequest(self.position, self.receivers, self.kind, senders)

    def pick(self, scores: torch.Tensor, k: int) -> list[Head]:
        """The ``k`` most negative eligible scored heads (fewer if fewer are eligible)."""
        masked = torch.where(self.eligible, scores, torch.full_like(scores, float("nan")))
        return top_heads(masked, min(k, int(self.eligible.sum())))

    def masked(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores with heads that cannot reach the receivers set to NaN (left out of
        comparisons)."""
        return torch.where(self.eligible, scores, float("nan"))

    def tags(self, method: str, candidates: list[Head] | None) -> dict:
        """The settings a cached score of this step is saved with."""
        if self.paper:
            extra = {} if candidates is None else {"hybrid_k": len(candidates)}
            return {**self.settings, "method": method, **extra}
        return {**self.settings, "method": method, "senders":
                None if candidates is None else [format_head(h) for h in candidates]}


@dataclass
class StepScores:
    """What :func:`score_step` gives: scores (NaN = not scored, 0 = cannot reach), their
    standard errors (0 where not scored exactly), the attribution estimate if computed and the
    estimate-vs-exact comparison if asked."""

    scores: torch.Tensor
    se: torch.Tensor
    attribution: torch.Tensor | None = None
    comparison: ScoreComparison | None = None


def score_step(ctx: Context, step: Step, compare: bool = False) -> StepScores:
    """The one scorer of both chains: ``exact`` path patching of every head; ``hybrid``
    exact scores of the attribution's top candidates only; ``attribution``: the estimate
    itself (the automatic chain's with its per-prompt standard error). Every piece is
    cached in the run folder; ``compare`` adds the attribution-vs-exact comparison."""
    cfg, folder = ctx.cfg, ctx.folder
    options = FastOptions(impl=cfg.impl, batch_size=cfg.batch_size)
    desc = step.desc or f"{step.group} {ctx.loaded.name}"

    def cached(name: str, tags: dict, compute) -> dict[str, torch.Tensor]:
        return folder.cached_tensors(f"{name}_{step.group}.safetensors", tags, compute)

    def exact(candidates: list[Head] | None, name: str = "scores") -> tuple[torch.Tensor,
                                                                            torch.Tensor]:
        def compute() -> dict[str, torch.Tensor]:
            s = path_patching_scores(ctx.loaded, ctx.clean, ctx.counterfactual,
                                     step.request(candidates), options, cache=ctx.cache,
                                     progress=ctx.progress, desc=desc)
            return {"scores": s.mean, "se": s.se}
        t = cached(name, step.tags("exact" if candidates is None else cfg.method, candidates),
                   compute)
        scores, se = t["scores"], t.get("se", torch.zeros_like(t["scores"]))
        if candidates is not None:  # the one rule: NaN = not scored, 0 = cannot reach
            scored = torch.zeros_like(scores, dtype=torch.bool)
            idx = torch.tensor(candidates)
            scored[idx[:, 0], idx[:, 1]] = True
            scores = torch.where(scored, scores,
                                 torch.where(step.eligible, float("nan"), 0.0))
            se = torch.where(scored, se, 0.0)
        return scores, se

    def attribution() -> torch.Tensor:
        return cached("attribution", {**step.settings, "method": "attribution"},
                      lambda: {"scores": attribution_scores(
                          ctx.loaded, ctx.clean, ctx.counterfactual, step.request(),
                          batch_size=cfg.batch_size, progress=ctx.progress,
                          cache=ctx.cache)})["scores"]

    def estimate_with_se() -> tuple[torch.Tensor, torch.Tensor]:
        """The automatic chain's attribution scores: the estimate and its standard error over
        prompts (heads at or above the last receiver layer: 0, they cannot reach it)."""
        def compute() -> dict[str, torch.Tensor]:
            mean, se = attribution_scores(ctx.loaded, ctx.clean, ctx.counterfactual,
                                          step.request(), batch_size=cfg.batch_size,
                                          progress=ctx.progress, with_se=True, cache=ctx.cache,
                                          desc=f"attribution {desc}")
            return {"scores": mean, "se": se}
        t = cached("attribution_se", {**step.settings, "method": "attribution", "se": True},
                   compute)
        return (torch.where(step.eligible, t["scores"], 0.0),
                torch.where(step.eligible, t["se"], 0.0))

    att = comparison = None
    if cfg.method == "exact":
        scores, se = exact(None)
        if compare:  # how well would the gradient estimate have done?
            att = attribution()
            comparison = compare_scores(att, step.masked(scores), step.size)
        return StepScores(scores, se, att, comparison)
    if cfg.method == "attribution" and not step.paper:
        scores, se = estimate_with_se()
        att = scores
        if compare:
            full, _ = exact(None, "exact")
            comparison = compare_scores(att, step.masked(full), step.size)
        return StepScores(scores, se, att, comparison)
    att = attribution()
    if cfg.method == "attribution" and step.paper:
        scores, se = att, torch.zeros_like(att)
    else:
        k = max(cfg.hybrid_k or 3 * step.size, step.min_candidates)
        scores, se = exact(step.pick(att, k))
    if compare:
        full, _ = exact(None, "exact")
        comparison = compare_scores(att, step.masked(full), step.size)
    return StepScores(scores, se, att, comparison)


__all__ = ["Context", "DiscoveryResult", "Step", "StepScores", "discovery_prompts",
           "score_step"]
