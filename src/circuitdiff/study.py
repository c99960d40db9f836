"""The study: the paper's pipeline end to end on one base model and its fine-tunes.

1. accuracy of every model;
2. path-patching discovery of the base model's circuit (four groups);
3. the base circuit evaluated on every model (mean ablation, faithfulness, random baseline);
4. attention-knockout curves on the base model.

Each step is cached in the run folder, so a killed study resumes where it stopped. Results are
summarised in ``report.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .ablation import model_tag, safe_name
from .circuit import Circuit
from .model import LoadedModel
from .runs import RunFolder

#: the shipped organisms, in the paper's table order (Llama, Vicuna, Goat, FLoat analogues)
ORGANISM_STUDY = ("organism:base", "organism:chat", "organism:lora", "organism:full")
KNOCKOUT_EDGES = ("last:correct_object", "query_label:prev_query_label", "random")


@dataclass
class StudyConfig:
    """What the study runs; defaults fit the shipped organisms on a laptop CPU."""

    n_prompts: int = 200
    n_boxes: int = 7
    seed: int = 0
    sizes: tuple[int, ...] = (6, 3, 4, 2)
    n_discovery: int = 100
    n_mean: int = 200
    random_draws: int = 10
    batch_size: int = 32
    knockout: bool = True
    discover: bool = True
    extra: dict = field(default_factory=dict)


def _fmt(x) -> str:
    return "undefined" if x is None else f"{x:.2f}"


def run_study(models: Sequence[str], load: Callable[[str], LoadedModel], out: str | Path,
              cfg: StudyConfig | None = None, progress: bool = True,
              log: Callable[[str], None] = print) -> dict:
    """Run the study on ``models`` (the first is the base whose circuit is found)."""
    from .accuracy import evaluate_accuracy
    from .compare import EvalConfig, evaluate_matrix
    from .discovery import discover_circuit
    from .faithfulness import format_table, save_table
    from .knockout import Edge, KnockoutCurve, knockout_curve, plot_curves
    from .task import EntityTrackingTask, TaskConfig

    cfg = cfg or StudyConfig()
    if not models:
        raise ValueError("the study needs at least one model")
    folder = RunFolder(out)
    summary: dict = {"models": list(models), "config": {k: v for k, v in vars(cfg).items()}}
    report = [f"# circuitdiff study\n", f"models: {', '.join(models)}; {cfg.n_boxes} boxes, "
              f"{cfg.n_prompts} evaluation prompts, seed {cfg.seed}\n"]

    base = load(models[0])
    log(f"base model: {base.name} — {base.arch.describe()}")
    if not cfg.discover:
        task = EntityTrackingTask(base.tokenizer, TaskConfig(n_boxes=cfg.n_boxes), seed=cfg.seed)
        prompts = task.sample(cfg.n_prompts)
        settings = {"model": base.name, "n_boxes": cfg.n_boxes, "n": cfg.n_prompts,
                    "seed": cfg.seed}
        acc = folder.cached(f"accuracy/{model_tag(base.name)}.json", settings, lambda: evaluate_accuracy(
            base, prompts, cfg.batch_size, progress).to_dict())
        log(f"{cfg.n_boxes}-box accuracy: {acc['accuracy']:.3f} "
            f"(in-context {acc['in_context_accuracy']:.3f}, n={acc['n']})")
        report.append(f"\n{base.name}: {cfg.n_boxes}-box accuracy {acc['accuracy']:.3f} "
                      f"(in-context {acc['in_context_accuracy']:.3f}, n={acc['n']})\n")
        summary["accuracy"] = {base.name: acc}
        folder.save_json("summary.json", summary)
        (folder.path / "report.md").write_text("".join(report))
        return summary

    log("step 1/3: path-patching discovery of the base circuit")
    found = discover_circuit(base, folder.file("discover"), n_prompts=cfg.n_discovery,
                             sizes=cfg.sizes, n_boxes=cfg.n_boxes, seed=cfg.seed + 100,
                             batch_size=cfg.batch_size, progress=progress, truncate=True)
    circuit: Circuit = found.circuit
    if circuit.settings.get("truncated_at"):
        log(f"note: no head can send to the previous group, so {circuit.settings['truncated_at']}"
            f" and later groups are empty")
    summary["circuit"] = circuit.to_dict()
    report.append("\n## Circuit of the base model (path patching)\n\n")
    for g, grp in circuit.groups.items():
        report.append(f"- **{g}** ({grp.position}): "
                      f"{' '.join(f'{l}.{h}' for l, h in grp.heads) or '(empty)'}\n")

    curves: dict[str, dict] = {}
    if cfg.knockout:
        log("step 2/3: attention knockout on the base model")
        task = EntityTrackingTask(base.tokenizer, TaskConfig(n_boxes=cfg.n_boxes), seed=cfg.seed)
        ko_prompts = task.sample(min(cfg.n_prompts, 100))
        for spec in KNOCKOUT_EDGES:
            edge = Edge.parse(spec)
            settings = {"model": base.name, "edge": str(edge), "n": len(ko_prompts),
                        "seed": cfg.seed}
            curves[str(edge)] = folder.cached(
                f"knockout/{safe_name(str(edge))}.json", settings,
                lambda: knockout_curve(base, ko_prompts, edge, seed=cfg.seed,
                                       batch_size=cfg.batch_size).to_dict())
        plot_curves([KnockoutCurve(**c) for c in curves.values()],
                    folder.file("knockout/knockout.png"), base.name)
        summary["knockout"] = curves
        report.append("\n## Attention knockout (base model; accuracy when blocked in layers ≥ L)\n\n")
        for name, c in curves.items():
            report.append(f"- {name} (unblocked {c['baseline']:.2f}): " + ", ".join(
                f"L={l}: {a:.2f}" for l, a in zip(c["layers"], c["accuracy"])) + "\n")
    del base

    log("step 3/3: the base circuit on every model (mean ablation)")
    ecfg = EvalConfig(n_prompts=cfg.n_prompts, seed=cfg.seed, n_boxes=cfg.n_boxes,
                      n_mean=cfg.n_mean, n_random=cfg.random_draws, batch_size=cfg.batch_size)
    rows = evaluate_matrix({"base_circuit": circuit}, list(models), load, folder, ecfg,
                           progress=progress)
    save_table(folder, rows)
    table = format_table(rows)
    log(table)
    summary["faithfulness"] = [r.to_dict() for r in rows]
    report.append("\n## The base circuit on every model\n\n```\n" + table + "\n```\n")
    folder.save_json("summary.json", summary)
    (folder.path / "report.md").write_text("".join(report))
    log(f"report: {folder.file('report.md')}")
    return summary
