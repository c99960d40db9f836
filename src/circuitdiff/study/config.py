"""The study's configuration: one config per method, the steps, and the verdict rules."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..methods.cmap import CMAPConfig
from ..methods.dcm import DCMConfig
from ..methods.discovery import DiscoveryConfig
from ..methods.evaluation import EvalConfig
from ..methods.verdicts import VerdictRules
from .cmap_step import cmap_key
from .steps import parse_steps

#: the shipped organisms, in the paper's table order (Llama, Vicuna, Goat, FLoat analogues)
ORGANISM_STUDY = ("organism:base", "organism:chat", "organism:lora", "organism:full")


def default_discovery() -> DiscoveryConfig:
    """The study's discovery: the automatic chain sized to faithfulness 0.9 on its own held-out
    prompts, with its own prompt seed (100 above the evaluation seed, so the study's evaluation
    prompts are held out from discovery and sizing); if the target cannot be reached every
    candidate is kept and the report says so."""
    return DiscoveryConfig(n_prompts=100, seed=100, chain="auto", on_unreachable="keep-all")


def default_paper_discovery() -> DiscoveryConfig:
    """The paper chain shown beside it: sizes for the organisms' 4 x 8 head grid, later groups
    left empty when a group sits in layer 0."""
    return DiscoveryConfig(n_prompts=100, sizes=(6, 3, 4, 2), seed=100, truncate=True,
                           chain="paper")


def default_own_discovery() -> DiscoveryConfig:
    """Each fine-tune's own circuit: the same automatic chain and 100 prompts to patch, sized on
    100 held-out prompts (scan and means on 50) — it is compared with the base's, not reported on
    its own. Fewer prompts to patch is not enough (measured: at 50, organism:lora's own circuit
    reached faithfulness 0.05; at 100, 0.94)."""
    return DiscoveryConfig(n_prompts=100, seed=100, chain="auto", on_unreachable="keep-all",
                           n_validate=100, n_scan=50, n_mean=50)


def default_evaluation() -> EvalConfig:
    """The study's evaluation: 200 prompts, 200 mean-ablation prompts and 5 random circuits
    (laptop-sized)."""
    return EvalConfig(n_prompts=200, n_mean=200, n_random=5)


def default_dcm() -> DCMConfig:
    """DCM at laptop size: the paper's three desiderata, 200/100/100 train/val/test prompts."""
    return DCMConfig(seed=200)


def default_cmap() -> CMAPConfig:
    """CMAP per fine-tune: output patching per group, its cumulative prefixes and the whole
    circuit, on the evaluation prompts, 20 random circuits for the whole circuit (5 of them for
    the group and cumulative rows, which no verdict reads), 1000 bootstrap resamples. Twenty,
    because "gain carried" ranks the circuit among them (p = rank / 21 can reach 0.05) and its
    leave-one-out calibration ranks each draw among the other 19 (p = 1 / 20)."""
    return CMAPConfig(n_prompts=200, random_draws=20, group_random_draws=5)


@dataclass
class StudyConfig:
    """What the study runs: one config per method, the steps, and the verdict rules.

    The task (``n_boxes``), evaluation seed and ``batch_size`` are the evaluation config's;
    every other method uses the same ``n_boxes``. ``own_discovery`` finds each fine-tune's own
    circuit (None: the base's discovery config). ``knockout_prompts``: prompts per knockout
    curve (at most the evaluation's). ``stability``: rediscover the base circuit on a disjoint
    prompt set (the ceiling of the "uses the base circuit" overlap). ``screenshot``: where a
    Chromium is installed, load the finished report headless, check it and save its first screen
    as ``report.png`` (a few seconds per run; False skips it, e.g. in quick tests).
    """

    discovery: DiscoveryConfig = field(default_factory=default_discovery)
    evaluation: EvalConfig = field(default_factory=default_evaluation)
    paper_discovery: DiscoveryConfig | None = field(default_factory=default_paper_discovery)
    own_discovery: DiscoveryConfig | None = field(default_factory=default_own_discovery)
    dcm: DCMConfig = field(default_factory=default_dcm)
    cmap: CMAPConfig = field(default_factory=default_cmap)
    knockout_prompts: int = 100
    rules: VerdictRules = field(default_factory=VerdictRules)
    steps: tuple[str, ...] | None = None
    screenshot: bool = True

    def __post_init__(self) -> None:
        self.steps = parse_steps(self.steps)
        n = self.evaluation.n_boxes
        for what, k in (("discovery", self.discovery.n_boxes),
                        ("paper discovery", None if self.paper_discovery is None
                         else self.paper_discovery.n_boxes),
                        ("own discovery", None if self.own_discovery is None
                         else self.own_discovery.n_boxes),
                        ("DCM", self.dcm.n_boxes), ("CMAP", self.cmap.n_boxes)):
            if k is not None and k != n:
                raise ValueError(f"{what} uses {k} boxes but evaluation {n}: the study needs "
                                 f"one task")
        if self.knockout_prompts < 1:
            raise ValueError(f"knockout_prompts must be >= 1, got {self.knockout_prompts}")

    @property
    def fine_tune_discovery(self) -> DiscoveryConfig:
        return self.own_discovery or self.discovery

    def to_dict(self) -> dict[str, Any]:
        return {"discovery": self.discovery.to_dict(), "evaluation": asdict(self.evaluation),
                "paper_discovery": None if self.paper_discovery is None
                else self.paper_discovery.to_dict(),
                "own_discovery": self.fine_tune_discovery.to_dict(),
                "dcm": self.dcm.cache_key(), "cmap": cmap_key(self.cmap),
                "knockout_prompts": self.knockout_prompts, "rules": asdict(self.rules),
                "steps": list(self.steps)}

