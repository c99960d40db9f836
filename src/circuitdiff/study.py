"""The study: the paper's pipeline end to end on one base model and its fine-tunes.

Steps (:data:`STEPS`, in order; ``StudyConfig.steps`` chooses, dependencies run too):

1. ``accuracy``      — every model's accuracy on the evaluation prompts;
2. ``discover``      — the base model's circuit by path patching with the automatic chain (its
                       first stage is the position scan), sized to a faithfulness target on its own
                       held-out prompts; scan heatmap, score heatmaps, circuit-flow diagram;
3. ``paper_chain``   — the paper's fixed four-group chain on the base, beside it;
4. ``faithfulness``  — both circuits on every model: mean ablation under both protocols, random
                       baseline, faithfulness with a bootstrap interval over prompts;
5. ``own_circuits``  — each fine-tune's own circuit (same discovery) and its overlap with the
                       base circuit's (head, role) units;
6. ``knockout``      — attention-knockout curves on every model;
7. ``dcm``           — DCM per group of the base circuit on the base (what each group encodes);
8. ``functional``    — the DCM-selected heads patched in every model (do the functions hold?);
9. ``cmap``          — CMAP per fine-tune: how much of its gain over the base each group carries.

Then one verdict per fine-tune (:mod:`circuitdiff.methods.verdicts`), ``summary.json``,
``report.md`` (plain text) and ``report.html`` (self-contained). Every step is cached twice: its
pieces inside the methods (a killed step resumes), and the whole step under ``steps/`` with its
settings — a rerun with other settings recomputes the steps whose settings changed, keeps the
others, and says which.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from .core.circuit import Circuit
from .core.model import LoadedModel
from .core.pool import ModelPool
from .core.runs import (RunFolder, atomic_write_text, environment, model_tag,
                        settings_digest)
from .core.task import EntityTrackingTask, TaskConfig
from .methods import accuracy, discovery, evaluation, knockout
from .methods.cmap import CMAPConfig, run as run_cmap
from .methods import dcm
from .methods.dcm import DCMConfig, DCMResult, FunctionalConfig
from .methods.discovery import DiscoveryConfig, DiscoveryError, NoCircuitError
from .methods.evaluation import EvalConfig
from .core.stats import difference_interval
from .methods.verdicts import VerdictRules, unit_overlap, verdicts
from .report.figures import discovery_heatmaps, plot_faithfulness_bars, plot_knockout_curves
from .report.markdown import format_protocols, study_report
from .report.scan import auto_discovery_figures
from .report.tables import format_table, save_table

#: the shipped organisms, in the paper's table order (Llama, Vicuna, Goat, FLoat analogues)
ORGANISM_STUDY = ("organism:base", "organism:chat", "organism:lora", "organism:full")
KNOCKOUT_EDGES = ("last:correct_object", "query_label:prev_query_label", "labels:objects", "random")
#: circuit names in the study's tables
AUTO_CIRCUIT, PAPER_CIRCUIT = "auto_circuit", "paper_circuit"

#: the study's steps, in the order they run
STEPS: tuple[str, ...] = ("accuracy", "discover", "paper_chain", "faithfulness", "own_circuits",
                          "knockout", "dcm", "functional", "cmap")
#: what each step needs (run first, from its saved results when they are there)
DEPENDS: dict[str, tuple[str, ...]] = {
    "accuracy": (), "discover": (), "paper_chain": (), "knockout": (),
    "faithfulness": ("discover",), "own_circuits": ("discover",), "dcm": ("discover",),
    "functional": ("dcm",), "cmap": ("accuracy", "discover")}
STEP_HELP: dict[str, str] = {
    "accuracy": "every model's accuracy",
    "discover": "the base circuit (automatic chain, position scan first)",
    "paper_chain": "the paper's four-group chain on the base, beside it",
    "faithfulness": "both circuits on every model, random baseline",
    "own_circuits": "each fine-tune's own circuit and its overlap with the base's",
    "knockout": "attention-knockout curves on every model",
    "dcm": "DCM per group of the base circuit",
    "functional": "DCM selections patched in every model",
    "cmap": "CMAP per fine-tune"}


def parse_steps(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"all"``/None → every step; ``"discover,dcm"`` → those (in pipeline order). An unknown
    name is a ``ValueError`` that lists the valid ones."""
    if text is None:
        return STEPS
    names = [x.strip() for x in (text.split(",") if isinstance(text, str) else text) if x.strip()]
    if not names or names == ["all"]:
        return STEPS
    bad = [n for n in names if n not in STEPS]
    if bad:
        raise ValueError(f"unknown step {bad[0]!r}; valid steps: {', '.join(STEPS)} (or all)")
    return tuple(s for s in STEPS if s in names)


def with_dependencies(steps: Sequence[str]) -> tuple[str, ...]:
    """``steps`` plus everything they need, in pipeline order."""
    need = set(steps)
    for s in reversed(STEPS):
        if s in need:
            need.update(DEPENDS[s])
    return tuple(s for s in STEPS if s in need)


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
    circuit, on the evaluation prompts, 2 random circuits, 1000 bootstrap resamples."""
    return CMAPConfig(n_prompts=200, random_draws=2)


@dataclass
class StudyConfig:
    """What the study runs: one config per method, the steps, and the verdict rules.

    The task (``n_boxes``), evaluation seed and ``batch_size`` are the evaluation config's;
    every other method uses the same ``n_boxes``. ``own_discovery`` finds each fine-tune's own
    circuit (None: the base's discovery config).
    """

    discovery: DiscoveryConfig = field(default_factory=default_discovery)
    evaluation: EvalConfig = field(default_factory=default_evaluation)
    paper_discovery: DiscoveryConfig | None = field(default_factory=default_paper_discovery)
    own_discovery: DiscoveryConfig | None = field(default_factory=default_own_discovery)
    dcm: DCMConfig = field(default_factory=default_dcm)
    cmap: CMAPConfig = field(default_factory=default_cmap)
    knockout_prompts: int = 100
    rules: VerdictRules = field(default_factory=VerdictRules)
    steps: tuple[str, ...] = STEPS

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

    def to_dict(self) -> dict:
        return {"discovery": self.discovery.to_dict(), "evaluation": asdict(self.evaluation),
                "paper_discovery": None if self.paper_discovery is None
                else self.paper_discovery.to_dict(),
                "own_discovery": self.fine_tune_discovery.to_dict(),
                "dcm": self.dcm.cache_key(), "cmap": self.cmap.settings(),
                "knockout_prompts": self.knockout_prompts, "rules": asdict(self.rules),
                "steps": list(self.steps)}


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def changed_settings(old: dict, new: dict, limit: int = 4) -> str:
    """The dotted names of the settings that differ (at most ``limit``, then a count)."""
    a, b = _flat(old), _flat(new)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    shown = [k if len(str(a.get(k))) > 40 or len(str(b.get(k))) > 40
             else f"{k} {a.get(k)!r} → {b.get(k)!r}" for k in diff[:limit]]
    return ", ".join(shown) + (f" and {len(diff) - limit} more" if len(diff) > limit else "")


class _Study:
    """One study run: the folder, the models, and each step's cached result."""

    def __init__(self, models: Sequence[str], load: Callable[[str], LoadedModel],
                 folder: RunFolder, cfg: StudyConfig, progress: bool,
                 log: Callable[[str], None]):
        self.models, self.load, self.folder, self.cfg = list(models), load, folder, cfg
        self.progress, self.log = progress, log
        self.results: dict[str, Any] = {}
        self.timings: dict[str, dict] = {}

    @property
    def base_spec(self) -> str:
        return self.models[0]

    @property
    def fine_tunes(self) -> list[str]:
        return self.models[1:]

    def step(self, name: str, settings: dict, compute: Callable[[], Any]) -> Any:
        """The result of step ``name``: reused from ``steps/<name>.json`` when saved with equal
        settings, else computed (and saved); either way timed and logged."""
        path = self.folder.file(f"steps/{name}.json")
        settings = json.loads(json.dumps(settings, default=str))
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("settings") == settings:
                self.log(f"[{name}] saved results reused (same settings)")
                self.timings[name] = {"seconds": saved["seconds"], "reused": True}
                self.results[name] = saved["result"]
                return saved["result"]
            self.log(f"[{name}] settings changed ({changed_settings(saved.get('settings', {}), settings)}): "
                     f"recomputing; pieces whose own settings did not change are kept")
        self.log(f"[{name}] {STEP_HELP[name]}")
        t0 = time.perf_counter()
        result = json.loads(json.dumps(compute(), default=str))
        seconds = round(time.perf_counter() - t0, 1)
        atomic_write_text(path, json.dumps({"settings": settings, "seconds": seconds,
                                            "result": result}))
        self.timings[name] = {"seconds": seconds, "reused": False}
        self.results[name] = result
        return result


def run_study(models: Sequence[str] = ORGANISM_STUDY,
              load: Callable[[str], LoadedModel] | None = None,
              out: str | Path = "runs/study", cfg: StudyConfig | None = None,
              progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run the study on ``models`` (the first is the base whose circuit is found); returns the
    summary (also ``summary.json``), with ``report.md`` and ``report.html`` written beside it.

    ``load(spec)`` loads a model (default :func:`circuitdiff.core.model.load_model` on CPU, float32)::

        from circuitdiff import StudyConfig, run_study
        summary = run_study(out="runs/study")                       # the shipped organisms
        summary["verdicts"]["organism:lora"]["gain_carried"]["answer"]
        run_study(["my/base", "my/lora-adapter"], out="runs/mine",
                  cfg=StudyConfig(steps=("discover", "faithfulness")))
    """
    cfg = cfg or StudyConfig()
    if load is None:
        from .core.model import load_model as load
    if not models:
        raise ValueError("the study needs at least one model")
    if len(set(models)) != len(models):
        raise ValueError(f"a model is listed twice: {list(models)}")
    t_start = time.perf_counter()
    folder = RunFolder(out)
    st = _Study(models, load, folder, cfg, progress, log)
    todo = with_dependencies(cfg.steps)
    extra = [s for s in todo if s not in cfg.steps]
    log(f"study of {', '.join(models)}: steps {', '.join(cfg.steps)}"
        + (f" (and {', '.join(extra)}, which they need)" if extra else ""))
    summary: dict = {"models": list(models), "config": cfg.to_dict(), "steps": list(todo)}

    for name in todo:
        if name in ("own_circuits", "cmap") and not st.fine_tunes:
            continue
        try:
            globals()[f"_step_{name}"](st)
        except NoCircuitError as e:
            log(f"no circuit: {e}")
            summary["no_circuit"] = str(e)
            break
    summary.update(_collect(st))
    if "discover" in st.results and "no_circuit" not in summary:
        summary["verdicts"] = verdicts(st.results, st.base_spec, st.fine_tunes, cfg.rules,
                                       AUTO_CIRCUIT)
    summary["timings"] = st.timings
    summary["run"] = {"seconds": round(time.perf_counter() - t_start, 1), **environment()}
    return _finish(st, summary)


# -- the steps ------------------------------------------------------------------------------------
def _step_accuracy(st: _Study) -> None:
    ev = st.cfg.evaluation

    def compute() -> dict:
        out = {}
        for spec in st.models:
            r = accuracy.run(st.load(spec), None, accuracy.AccuracyConfig(
                n_prompts=ev.n_prompts, seed=ev.seed, n_boxes=ev.n_boxes,
                batch_size=ev.batch_size), store=st.folder, progress=st.progress)
            out[spec] = {**r.summary(), "hits": [int(x) for x in r.correct],
                         "chance": 1 / ev.n_boxes}
            st.log(f"  {spec}: {ev.n_boxes}-box accuracy {r.accuracy:.3f} (n={r.n})")
        return out

    st.step("accuracy", {"models": st.models, "n_boxes": ev.n_boxes, "n": ev.n_prompts,
                         "seed": ev.seed}, compute)


def _flow_figure(loaded: LoadedModel, circuit: Circuit, cfg: DiscoveryConfig, path: Path,
                 title: str) -> None:
    """The circuit-flow diagram of ``circuit`` on an example prompt of ``cfg``'s task."""
    from .report.diagram import circuit_flow_figure, example_layout

    prompt = EntityTrackingTask(loaded.tokenizer, TaskConfig(n_boxes=cfg.n_boxes),
                                seed=cfg.seed).sample(1)[0]
    tokens, roles = example_layout(loaded.tokenizer, prompt)
    circuit_flow_figure(circuit, tokens, roles, path, title, n_prompts=cfg.n_prompts)


def _discover_one(st: _Study, spec: str, out: Path, cfg: DiscoveryConfig) -> dict:
    """Automatic-chain discovery on ``spec`` with its figures; the result as a dict."""
    loaded = st.load(spec)
    found = discovery.run(loaded, None, cfg, store=out, progress=st.progress)
    if cfg.chain == "auto":
        auto_discovery_figures(found, out, loaded.name)
    else:
        discovery_heatmaps(found, out, loaded.name)
    _flow_figure(loaded, found.circuit, cfg, out / "circuit_flow.png", f"circuit of {loaded.name}")
    if found.sizing.get("message"):
        st.log(f"  note: {found.sizing['message']}")
    if found.circuit.settings.get("truncated_at"):
        st.log(f"  note: paper chain — no head can send to the previous group, so "
               f"{found.circuit.settings['truncated_at']} and later groups are empty")
    return {"circuit": found.circuit.to_dict(), "sizing": found.sizing, "curve": found.curve,
            "scan": found.scan.to_dict() if found.scan else None}


def _step_discover(st: _Study) -> None:
    cfg = st.cfg.discovery
    st.step("discover", {"model": st.base_spec, "discovery": cfg.to_dict(), "version": 2},
            lambda: _discover_one(st, st.base_spec, st.folder.file("discover"), cfg))


def _step_paper_chain(st: _Study) -> None:
    cfg = st.cfg.paper_discovery
    if cfg is None or st.cfg.discovery.chain != "auto":
        return
    out = st.folder.file("discover_paper")

    def compute() -> dict:
        loaded = st.load(st.base_spec)
        res = discovery.run(loaded, None, cfg, store=out, progress=st.progress)
        discovery_heatmaps(res, out, loaded.name)
        _flow_figure(loaded, res.circuit, cfg, out / "circuit_flow.png",
                     f"paper chain on {loaded.name}")
        if res.circuit.settings.get("truncated_at"):
            st.log(f"  note: paper chain — no head can send to the previous group, so "
                   f"{res.circuit.settings['truncated_at']} and later groups are empty")
        return {"circuit": res.circuit.to_dict()}

    st.step("paper_chain", {"model": st.base_spec, "discovery": cfg.to_dict(), "version": 2},
            compute)


def _circuits(st: _Study) -> dict[str, Circuit]:
    key = AUTO_CIRCUIT if st.cfg.discovery.chain == "auto" else PAPER_CIRCUIT
    out = {key: Circuit.from_dict(st.results["discover"]["circuit"])}
    if "paper_chain" in st.results:
        out[PAPER_CIRCUIT] = Circuit.from_dict(st.results["paper_chain"]["circuit"])
    return out


def _step_faithfulness(st: _Study) -> None:
    ev = st.cfg.evaluation
    circuits = _circuits(st)

    def compute() -> list[dict]:
        first = next(iter(circuits))
        pool = ModelPool(st.models, st.load)
        rows = evaluation.run(pool, None, replace(ev, circuits={first: circuits[first]}),
                              store=st.folder, progress=st.progress).rows
        if len(circuits) > 1:  # the paper chain's circuit is for comparison: no random draws
            rest = {k: c for k, c in circuits.items() if k != first}
            rows += evaluation.run(pool, None, replace(ev, n_random=0, circuits=rest),
                                   store=st.folder, progress=st.progress).rows
        save_table(st.folder, rows)
        plot_faithfulness_bars(rows, st.folder.file("faithfulness.png"))
        st.log(format_table(rows))
        st.log("both ablation protocols:\n" + format_protocols(rows))
        return [r.to_dict() for r in rows]

    st.step("faithfulness", {"models": st.models, "evaluation": asdict(ev), "version": 2,
                             "circuits": {k: c.to_dict() for k, c in circuits.items()}}, compute)


def _step_own_circuits(st: _Study) -> None:
    cfg = st.cfg.fine_tune_discovery
    base = Circuit.from_dict(st.results["discover"]["circuit"])

    def compute() -> dict:
        out = {}
        for spec in st.fine_tunes:
            try:
                res = _discover_one(st, spec, st.folder.file(f"own/{model_tag(spec)}"), cfg)
            except DiscoveryError as e:  # no circuit, or nothing significant to trace
                out[spec] = {"no_circuit": str(e)}
                st.log(f"  {spec}: no circuit ({e})")
                continue
            own = Circuit.from_dict(res["circuit"])
            out[spec] = {"circuit": res["circuit"], "sizing": res["sizing"],
                         "overlap": unit_overlap(base, own)}
            o = out[spec]["overlap"]
            st.log(f"  {spec}: {o['n_other']} units; {o['shared']} shared with the base's "
                   f"{o['n_reference']} (overlap coefficient {o['coefficient'] or 0:.2f}, "
                   f"Jaccard {o['jaccard'] or 0:.2f})")
        return out

    st.step("own_circuits", {"models": st.fine_tunes, "discovery": cfg.to_dict(),
                             "base_circuit": base.to_dict(), "version": 3}, compute)


def _step_knockout(st: _Study) -> None:
    ev = st.cfg.evaluation
    n = min(ev.n_prompts, st.cfg.knockout_prompts)

    cfg = knockout.KnockoutConfig(edges=KNOCKOUT_EDGES, n=n, seed=ev.seed, n_boxes=ev.n_boxes,
                                  batch_size=ev.batch_size)

    def compute() -> dict:
        out = {}
        for spec in st.models:
            loaded = st.load(spec)
            # the config's prompts are the first n evaluation prompts (same task, seed)
            res = knockout.run(loaded, None, cfg, store=st.folder, progress=st.progress)
            plot_knockout_curves(res.curves, st.folder.file(f"knockout/{model_tag(spec)}.png"),
                                 f"{loaded.name}, n={n}")
            out[spec] = {c.edge: c.to_dict() for c in res.curves}
        return out

    st.step("knockout", {"models": st.models, **cfg.cache_key()}, compute)


def _step_dcm(st: _Study) -> None:
    config = replace(st.cfg.dcm, circuit=Circuit.from_dict(st.results["discover"]["circuit"]))

    def compute() -> dict:
        from .report.dcm import save_dcm_tables

        res = dcm.run(st.load(st.base_spec), None, config, store=st.folder, progress=st.progress)
        for note in res.notes:
            st.log(f"  note: {note}")
        if res.rows:
            save_dcm_tables(st.folder, res.rows, res.empty_groups, "dcm_table")
        return res.to_dict()

    st.step("dcm", {"model": st.base_spec, "dcm": config.cache_key()}, compute)


def _step_functional(st: _Study) -> None:
    result = DCMResult.from_dict(st.results["dcm"])
    if not result.rows:
        return

    def compute() -> list[dict]:
        from .core.pool import ModelPool
        from .report.dcm import plot_functional_bars, save_functional_tables

        fun = dcm.functional.run(ModelPool(st.models, st.load), None,
                                 FunctionalConfig(result, replace(st.cfg.dcm, circuit=None)),
                                 store=st.folder, progress=st.progress)
        for note in fun.notes:
            st.log(f"  note: {note}")
        save_functional_tables(st.folder, fun.rows)
        if fun.rows:
            plot_functional_bars(fun.rows, st.folder.file("functional.png"))
        else:
            st.log("  no DCM selection to patch (no selection found a function)")
        return [r.to_dict() for r in fun.rows]

    st.step("functional", {"models": st.models, "dcm": st.results["dcm"]}, compute)


def _step_cmap(st: _Study) -> None:
    circuit = Circuit.from_dict(st.results["discover"]["circuit"])

    def compute() -> dict:
        from .report.cmap import plot_cmap_bars

        out = {}
        acc = st.results["accuracy"]
        rules = st.cfg.rules
        for spec in st.fine_tunes:
            gap = acc[spec]["accuracy"] - acc[st.base_spec]["accuracy"]
            ci = difference_interval(acc[spec]["hits"], acc[st.base_spec]["hits"],
                                     rules.bootstrap, rules.seed, rules.confidence)
            if ci is not None and ci[0] <= 0:  # nothing for a circuit to carry
                why = (f"no significant gain over the base to explain (accuracy gap {gap:+.2f} "
                       f"[{ci[0]:.2f}, {ci[1]:.2f}], n={acc[spec]['n']}); CMAP skipped")
                st.log(f"  {spec}: {why}")
                out[spec] = {"skipped": why, "gap": gap, "gap_ci": ci}
                continue
            res = run_cmap(ModelPool([st.base_spec, spec], st.load), None,
                           replace(st.cfg.cmap, circuit=circuit), store=st.folder,
                           progress=st.progress)
            d = res.directions[0]  # fine-tune -> base
            plot_cmap_bars(d, st.folder.file(f"cmap/{model_tag(spec)}.png"))
            out[spec] = res.to_dict()
            whole = next((r for r in d.rows if r.kind == "circuit"), None)
            if d.gap_ci is not None and d.gap_ci[0] <= 0:
                st.log(f"  {spec}: gap {d.gap:+.2f} [{d.gap_ci[0]:.2f}, {d.gap_ci[1]:.2f}]: "
                       f"no significant gain to explain")
            elif whole is not None:
                share = "undefined" if whole.share is None else f"{whole.share:.2f}"
                st.log(f"  {spec}: gap {d.gap:+.2f}; the circuit carries {share} of it")
        return out

    st.step("cmap", {"base": st.base_spec, "models": st.fine_tunes, "cmap": st.cfg.cmap.settings(),
                     "circuit": circuit.to_dict(),
                     "accuracy": settings_digest(st.results["accuracy"]),
                     "rules": asdict(st.cfg.rules)}, compute)


# -- summary and report -----------------------------------------------------------------------------
def _collect(st: _Study) -> dict:
    """The summary's sections from the step results (the keys ``report`` reads)."""
    r, out = st.results, {}
    if "accuracy" in r:
        out["accuracy"] = {k: {kk: vv for kk, vv in v.items() if kk != "hits"}
                           for k, v in r["accuracy"].items()}
    if "discover" in r:
        out["circuit"] = r["discover"]["circuit"]
        if r["discover"].get("sizing"):
            out["discovery"] = {k: r["discover"][k] for k in ("sizing", "curve", "scan")}
    if "paper_chain" in r:
        out["paper_circuit"] = r["paper_chain"]["circuit"]
    if "faithfulness" in r:
        out["faithfulness"] = [{k: v for k, v in row.items() if not k.endswith("_hits")}
                               for row in r["faithfulness"]]
    if "own_circuits" in r:
        out["own_circuits"] = r["own_circuits"]
    if "knockout" in r:
        out["knockout"] = r["knockout"]
    if "dcm" in r:
        out["dcm"] = r["dcm"]
    if "functional" in r:
        out["functional"] = [{k: v for k, v in row.items() if k != "hits"}
                             for row in r["functional"]]
    if "cmap" in r:
        out["cmap"] = r["cmap"]
    return out


def _finish(st: _Study, summary: dict) -> dict:
    from .report.study_html import write_study_html

    folder = st.folder
    folder.save_json("summary.json", summary)
    md_path = atomic_write_text(folder.file("report.md"), study_report(summary))
    html_path = write_study_html(summary, folder.path, folder.file("report.html"))
    st.log(f"report: {html_path} (plain text: {md_path})")
    _screenshot(st, html_path)
    return summary


def _screenshot(st: _Study, html_path: Path) -> None:
    """Where a Chromium is installed: load the report headless, note what it saw, and save a
    screenshot of its first screen as ``report.png`` (skipped quietly without a browser)."""
    from .report.browser import check_page, find_browser

    browser = find_browser()
    if browser is None:
        return
    try:
        res = check_page(html_path, st.folder.file("report.png"), browser, timeout=60)
    except Exception as e:  # a browser that fails must not fail the study
        st.log(f"  (could not render the report headless: {type(e).__name__}: {e})")
        return
    if not res.ok:
        st.log(f"  warning: the report did not render cleanly in {browser}: {res}")


__all__ = ["STEPS", "StudyConfig", "run_study", "parse_steps", "with_dependencies",
           "ORGANISM_STUDY"]
