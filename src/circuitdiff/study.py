"""The study: the paper's pipeline end to end on one base model and its fine-tunes.

1. path-patching discovery of the base model's circuit with the automatic chain (positions as
   well as heads, sized to a faithfulness target on held-out prompts; scan heatmap, circuit graph
   and size curve in ``discover/``), and the paper's fixed four-group chain beside it
   (``discover_paper/``) so a reader sees what the positions change;
2. attention-knockout curves on the base model;
3. both circuits evaluated on every model (accuracy, mean ablation under both protocols,
   faithfulness; the random baseline for the automatic circuit).

Each step is cached in the run folder, so a killed study resumes where it stopped. The summary
is ``summary.json``; ``report.md`` is written by :mod:`circuitdiff.report.markdown`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from .core.model import LoadedModel
from .core.runs import RunFolder, atomic_write_text, model_tag, safe_name
from .core.task import EntityTrackingTask, TaskConfig
from .methods.accuracy import evaluate_accuracy
from .methods.auto_chain import NoCircuitError
from .methods.discovery import DiscoveryConfig, discover
from .methods.evaluation import EvalConfig, evaluate_matrix
from .methods.knockout import Edge, KnockoutCurve, knockout_curve
from .report.figures import discovery_heatmaps, plot_knockout_curves
from .report.markdown import format_protocols, study_report
from .report.scan import auto_discovery_figures
from .report.tables import format_table, save_table

#: the shipped organisms, in the paper's table order (Llama, Vicuna, Goat, FLoat analogues)
ORGANISM_STUDY = ("organism:base", "organism:chat", "organism:lora", "organism:full")
KNOCKOUT_EDGES = ("last:correct_object", "query_label:prev_query_label", "labels:objects", "random")
#: knockout runs on at most this many of the evaluation prompts (its curves need many forwards)
KNOCKOUT_MAX_PROMPTS = 100


#: circuit names in the study's tables
AUTO_CIRCUIT, PAPER_CIRCUIT = "auto_circuit", "paper_circuit"


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


def default_evaluation() -> EvalConfig:
    """The study's evaluation: 200 prompts and 200 mean-ablation prompts (laptop-sized)."""
    return EvalConfig(n_prompts=200, n_mean=200)


@dataclass
class StudyConfig:
    """What the study runs: a discovery config and an evaluation config, plus the steps.

    The task (``n_boxes``) and ``batch_size`` are the evaluation config's; discovery uses the
    same ``n_boxes``.
    """

    discovery: DiscoveryConfig = field(default_factory=default_discovery)
    evaluation: EvalConfig = field(default_factory=default_evaluation)
    knockout: bool = True
    discover: bool = True
    paper_discovery: DiscoveryConfig | None = field(default_factory=default_paper_discovery)

    def __post_init__(self) -> None:
        for d in (self.discovery, self.paper_discovery):
            if d is not None and d.n_boxes != self.evaluation.n_boxes:
                raise ValueError(f"discovery uses {d.n_boxes} boxes but evaluation "
                                 f"{self.evaluation.n_boxes}: the study needs one task")

    def to_dict(self) -> dict:
        return {"discovery": self.discovery.to_dict(), "evaluation": asdict(self.evaluation),
                "knockout": self.knockout, "discover": self.discover,
                "paper_discovery": None if self.paper_discovery is None
                else self.paper_discovery.to_dict()}


def run_study(models: Sequence[str], load: Callable[[str], LoadedModel], out: str | Path,
              cfg: StudyConfig | None = None, progress: bool = True,
              log: Callable[[str], None] = print) -> dict:
    """Run the study on ``models`` (the first is the base whose circuit is found)."""
    cfg = cfg or StudyConfig()
    if not models:
        raise ValueError("the study needs at least one model")
    ev = cfg.evaluation
    folder = RunFolder(out)
    summary: dict = {"models": list(models), "config": cfg.to_dict()}

    base = load(models[0])
    log(f"base model: {base.name} — {base.arch.describe()}")
    task = EntityTrackingTask(base.tokenizer, TaskConfig(n_boxes=ev.n_boxes), seed=ev.seed)
    if not cfg.discover:
        prompts = task.sample(ev.n_prompts)
        settings = {"model": base.name, "n_boxes": ev.n_boxes, "n": ev.n_prompts, "seed": ev.seed}
        acc = folder.cached(f"accuracy/{model_tag(base.name)}.json", settings,
                            lambda: evaluate_accuracy(base, prompts, ev.batch_size,
                                                      progress).to_dict())
        log(f"{ev.n_boxes}-box accuracy: {acc['accuracy']:.3f} "
            f"(in-context {acc['in_context_accuracy']:.3f}, n={acc['n']})")
        summary["accuracy"] = {base.name: acc}
        return _finish(folder, summary, log)

    log(f"step 1/3: path-patching discovery of the base circuit ({cfg.discovery.chain} chain)")
    try:
        found = discover(base, folder.file("discover"), cfg.discovery, progress=progress)
    except NoCircuitError as e:
        log(f"no circuit: {e}")
        summary["no_circuit"] = str(e)
        return _finish(folder, summary, log)
    circuits = {AUTO_CIRCUIT if cfg.discovery.chain == "auto" else PAPER_CIRCUIT: found.circuit}
    if cfg.discovery.chain == "auto":
        auto_discovery_figures(found, folder.file("discover"), base.name)
        summary["discovery"] = {"sizing": found.sizing, "curve": found.curve,
                                "scan": found.scan.to_dict() if found.scan else None}
        if found.sizing.get("message"):
            log(f"note: {found.sizing['message']}")
    else:
        discovery_heatmaps(found, folder.file("discover"), base.name)
    summary["circuit"] = found.circuit.to_dict()
    paper = cfg.paper_discovery
    if paper is not None and cfg.discovery.chain == "auto":
        log("        and the paper's four-group chain beside it")
        res = discover(base, folder.file("discover_paper"), paper, progress=progress)
        discovery_heatmaps(res, folder.file("discover_paper"), base.name)
        circuits[PAPER_CIRCUIT] = res.circuit
        summary["paper_circuit"] = res.circuit.to_dict()
        if res.circuit.settings.get("truncated_at"):
            log(f"note: paper chain — no head can send to the previous group, so "
                f"{res.circuit.settings['truncated_at']} and later groups are empty")

    if cfg.knockout:
        log("step 2/3: attention knockout on the base model")
        ko_prompts = task.sample(min(ev.n_prompts, KNOCKOUT_MAX_PROMPTS))
        curves: dict[str, dict] = {}
        for spec in KNOCKOUT_EDGES:
            edge = Edge.parse(spec)
            settings = {"model": base.name, "edge": str(edge), "n": len(ko_prompts),
                        "seed": ev.seed}
            curves[str(edge)] = folder.cached(
                f"knockout/{safe_name(str(edge))}.json", settings,
                lambda: knockout_curve(base, ko_prompts, edge, seed=ev.seed,
                                       batch_size=ev.batch_size, progress=progress).to_dict())
        plot_knockout_curves([KnockoutCurve(**c) for c in curves.values()],
                             folder.file("knockout/knockout.png"), base.name)
        summary["knockout"] = curves
    del base

    log("step 3/3: the base circuit(s) on every model (mean ablation)")
    first = next(iter(circuits))
    rows = evaluate_matrix({first: circuits[first]}, list(models), load, folder, ev,
                           progress=progress)
    if len(circuits) > 1:  # the paper chain's circuit is shown for comparison: no random draws
        rows += evaluate_matrix({k: c for k, c in circuits.items() if k != first}, list(models),
                                load, folder, replace(ev, n_random=0), progress=progress)
    save_table(folder, rows)
    log(format_table(rows))
    log("both ablation protocols:\n" + format_protocols(rows))
    summary["faithfulness"] = [r.to_dict() for r in rows]
    return _finish(folder, summary, log)


def _finish(folder: RunFolder, summary: dict, log: Callable[[str], None]) -> dict:
    folder.save_json("summary.json", summary)
    path = atomic_write_text(folder.file("report.md"), study_report(summary))
    log(f"report: {path}")
    return summary
