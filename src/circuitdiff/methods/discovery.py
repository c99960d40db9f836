"""Circuit discovery by exact path patching, saved to a run folder.

Two chains:

* ``chain="auto"`` (default, :mod:`.auto_chain`): start at the logits at ``last``, trace every
  group's inputs back — q at its own role, k and v at the roles the position scan marks as
  relevant — keep the senders whose scores stand out from the score spread, name the groups by
  what they attend to, and size the circuit to a faithfulness target on held-out prompts.
* ``chain="paper"``: the paper's fixed four-step chain with fixed sizes, below.

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
from .scan import ScanResult
from .path_patching import (IMPLS, PathPatchingError, ScoreComparison, attribution_scores,
                            compare_scores, path_patching_scores, reuse_captures, top_heads)

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
CHAINS = ("auto", "paper")


def parse_sizes(text: str | Sequence[int], chain: str = "paper") -> tuple[int, ...]:
    """``"20,5,10,5"`` → ``(20, 5, 10, 5)``; one positive size per group (the paper chain), or,
    for the automatic chain, sizes of the groups in discovery order (the last one repeats)."""
    if isinstance(text, str):
        try:
            sizes = tuple(int(x) for x in text.split(","))
        except ValueError:
            raise PathPatchingError(f"sizes {text!r} must be comma-separated integers, e.g. "
                                    f"20,5,10,5") from None
    else:
        sizes = tuple(int(x) for x in text)
    if chain == "auto":
        if not sizes or min(sizes) < 1:
            raise PathPatchingError(f"sizes {text!r}: every group needs at least one head")
        return sizes
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

    Both chains: ``n_prompts`` clean prompts (seed ``seed``) and their counterfactuals for path
    patching; ``method`` exact / attribution / hybrid; ``hybrid_k`` (default ``3 x size``) is how
    many attribution candidates get exact scores; ``compare_exact`` computes both exact and
    attribution scores and reports the attribution's Spearman correlation and top-k recall.

    Paper chain: ``sizes`` (default 20,5,10,5); ``truncate`` leaves the later groups empty when a
    group lies wholly in layer 0 (no head can send to it) instead of failing.

    Automatic chain: ``target`` faithfulness on ``n_validate`` held-out prompts (seed
    ``seed + 1``; means over ``n_mean`` prompts of seed ``seed + 2``) decides the size, unless
    ``sizes`` fixes heads per group — a size counts as reaching the target when the estimate
    minus ``size_z`` paired standard errors does; the position scan uses the first ``n_scan``
    held-out prompts; a sender is significant when its robust z-score against
    the spread of all scored senders is ``<= -z_threshold`` and its score ``<= -min_score``;
    roles whose scan drop (below the group's layers) reaches ``scan_min_drop`` of the model's
    accuracy get their k and v traced; ``on_unreachable`` = ``"error"`` stops with a message
    when even every candidate head misses the target, ``"keep-all"`` keeps them all.
    """

    n_prompts: int = 100
    sizes: tuple[int, ...] | None = None
    method: str = "exact"
    n_boxes: int = 7
    seed: int = 0
    batch_size: int = 32
    hybrid_k: int | None = None
    compare_exact: bool = False
    impl: str = "fast"
    truncate: bool = False
    chain: str = "auto"
    target: float = 0.9
    n_validate: int = 200
    n_scan: int = 100
    size_z: float = 1.0
    n_mean: int = 100
    z_threshold: float = 3.0
    min_score: float = 0.01
    scan_min_drop: float = 0.1
    max_groups: int = 16
    on_unreachable: str = "error"
    max_rows: int = 512

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PathPatchingError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.impl not in IMPLS:
            raise PathPatchingError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if self.chain not in CHAINS:
            raise PathPatchingError(f"chain must be one of {CHAINS}, got {self.chain!r}")
        if self.sizes is None and self.chain == "paper":
            self.sizes = PAPER_SIZES
        if self.sizes is not None:
            self.sizes = parse_sizes(self.sizes, self.chain)
        if not 0 < self.target <= 1:
            raise PathPatchingError(f"target faithfulness must be in (0, 1], got {self.target}")
        if self.on_unreachable not in ("error", "keep-all"):
            raise PathPatchingError(f"on_unreachable must be 'error' or 'keep-all', got "
                                    f"{self.on_unreachable!r}")
        for name in ("n_prompts", "n_validate", "n_scan", "n_mean", "batch_size", "max_groups"):
            if getattr(self, name) < 1:
                raise PathPatchingError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return {**asdict(self), "sizes": None if self.sizes is None else list(self.sizes)}


@dataclass
class DiscoveryResult:
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

    def to_dict(self) -> dict:
        return {"circuit": self.circuit.to_dict(),
                "comparisons": {g: c.to_dict() for g, c in self.comparisons.items()},
                "scan": None if self.scan is None else self.scan.to_dict(),
                "curve": self.curve, "sizing": self.sizing, "edges_scored": self.edges_scored}

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
    desc: str = ""

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
    desc = step.desc or f"{step.index + 1}/{len(PAPER_CHAIN)} {step.group} {loaded.name}"

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
    """Find the circuit of ``loaded`` with the config's chain, saving everything under ``out``.

    ``clean``/``counterfactual`` default to the config's task prompts and ``task.corrupt()`` of
    them (saved as clean.jsonl / counterfactual.jsonl, reused on resume). Writes the scores of
    every step (safetensors) and ``circuit.json``; returns a :class:`DiscoveryResult`. The
    steps' exact scores share one :class:`~circuitdiff.methods.path_patching.CaptureCache`.
    """
    cfg = config or DiscoveryConfig()
    with reuse_captures():  # the steps share clean/counterfactual runs of the same prompts
        if cfg.chain == "auto":
            from .auto_chain import discover_auto

            return discover_auto(loaded, out, cfg, clean=clean, counterfactual=counterfactual,
                                 progress=progress)
        return _discover_paper(loaded, out, cfg, clean, counterfactual, progress)


def _prompt_pairs(loaded: LoadedModel, folder: RunFolder, cfg: DiscoveryConfig,
                  clean: Sequence[Prompt] | None, counterfactual: Sequence[Prompt] | None
                  ) -> tuple[Sequence[Prompt], Sequence[Prompt], dict]:
    """Clean and counterfactual prompts (given, or the config's, saved in ``folder``) and the
    settings every cached score is tagged with."""
    if clean is None:
        clean, counterfactual = discovery_prompts(loaded, folder, cfg)
    elif counterfactual is None:
        raise PathPatchingError("clean prompts given without their counterfactuals")
    else:
        save_jsonl(folder.file("clean.jsonl"), clean)
        save_jsonl(folder.file("counterfactual.jsonl"), counterfactual)
    digest = settings_digest([p.to_dict() for p in clean] + [p.to_dict() for p in counterfactual])
    return clean, counterfactual, {"model": loaded.name, "adapter": loaded.adapter,
                                   "prompts": digest, "n": len(clean)}


def _discover_paper(loaded: LoadedModel, out: str | Path, cfg: DiscoveryConfig,
                    clean: Sequence[Prompt] | None, counterfactual: Sequence[Prompt] | None,
                    progress: bool) -> DiscoveryResult:
    """The paper's four-step chain with fixed sizes."""
    arch = loaded.arch
    for (g, _, _), k in zip(PAPER_CHAIN, cfg.sizes):
        if k > arch.n_layers * arch.n_heads:
            raise PathPatchingError(f"group {g} asks for {k} heads; the model has "
                                    f"{arch.n_layers * arch.n_heads}")
    folder = RunFolder(out)
    clean, counterfactual, base = _prompt_pairs(loaded, folder, cfg, clean, counterfactual)
    digest = base["prompts"]

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
        {"method": "path_patching", "chain": "paper", "scoring": cfg.method,
         "sizes": list(cfg.sizes),
         "n_prompts": len(clean), "n_boxes": clean[0].n_boxes, "seed": cfg.seed,
         "prompts": digest, "adapter": loaded.adapter,
         "hybrid_k": cfg.hybrid_k if cfg.method == "hybrid" else None,
         "truncated_at": truncated_at,
         "top_scores": {g: [float(result.scores[g][l, h]) for l, h in groups[g].heads]
                        for g in groups}})
    result.save(out)
    return result


__all__ = ["CHAINS", "DiscoveryConfig", "DiscoveryResult", "METHODS", "PAPER_CHAIN",
           "PAPER_SIZES", "discover", "discovery_prompts", "parse_sizes"]
