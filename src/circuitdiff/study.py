"""The study: the paper's pipeline end to end on one base model and its fine-tunes.

1. path-patching discovery of the base model's circuit (four groups);
2. attention-knockout curves on the base model;
3. the base circuit evaluated on every model (accuracy, mean ablation, faithfulness, random
   baseline).

Each step is cached in the run folder, so a killed study resumes where it stopped. The summary
is ``summary.json``; ``report.md`` is written by :mod:`circuitdiff.report.markdown`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .core.model import LoadedModel
from .core.runs import RunFolder, model_tag, safe_name
from .core.task import EntityTrackingTask, TaskConfig
from .methods.accuracy import evaluate_accuracy
from .methods.discovery import DiscoveryConfig, discover
from .methods.evaluation import EvalConfig, evaluate_matrix
from .methods.knockout import Edge, KnockoutCurve, knockout_curve
from .report.figures import discovery_heatmaps, plot_knockout_curves
from .report.markdown import study_report
from .report.tables import format_table, save_table

#: the shipped organisms, in the paper's table order (Llama, Vicuna, Goat, FLoat analogues)
ORGANISM_STUDY = ("organism:base", "organism:chat", "organism:lora", "organism:full")
KNOCKOUT_EDGES = ("last:correct_object", "query_label:prev_query_label", "random")
#: knockout runs on at most this many of the evaluation prompts (its curves need many forwards)
KNOCKOUT_MAX_PROMPTS = 100


def default_discovery() -> DiscoveryConfig:
    """The study's discovery: sizes for the organisms' 4 x 8 head grid, its own prompt seed
    (100 above the evaluation seed), later groups left empty when a group sits in layer 0."""
    return DiscoveryConfig(n_prompts=100, sizes=(6, 3, 4, 2), seed=100, truncate=True)


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

    def __post_init__(self) -> None:
        if self.discovery.n_boxes != self.evaluation.n_boxes:
            raise ValueError(f"discovery uses {self.discovery.n_boxes} boxes but evaluation "
                             f"{self.evaluation.n_boxes}: the study needs one task")

    def to_dict(self) -> dict:
        return {"discovery": self.discovery.to_dict(), "evaluation": asdict(self.evaluation),
                "knockout": self.knockout, "discover": self.discover}


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

    log("step 1/3: path-patching discovery of the base circuit")
    found = discover(base, folder.file("discover"), cfg.discovery, progress=progress)
    discovery_heatmaps(found, folder.file("discover"), base.name)
    circuit = found.circuit
    if circuit.settings.get("truncated_at"):
        log(f"note: no head can send to the previous group, so {circuit.settings['truncated_at']}"
            f" and later groups are empty")
    summary["circuit"] = circuit.to_dict()

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

    log("step 3/3: the base circuit on every model (mean ablation)")
    rows = evaluate_matrix({"base_circuit": circuit}, list(models), load, folder, ev,
                           progress=progress)
    save_table(folder, rows)
    log(format_table(rows))
    summary["faithfulness"] = [r.to_dict() for r in rows]
    return _finish(folder, summary, log)


def _finish(folder: RunFolder, summary: dict, log: Callable[[str], None]) -> dict:
    folder.save_json("summary.json", summary)
    path = folder.file("report.md")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(study_report(summary))
    tmp.replace(path)
    log(f"report: {path}")
    return summary
