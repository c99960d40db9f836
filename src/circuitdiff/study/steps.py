"""The study's steps: one :class:`Step` record each, in pipeline order (:data:`REGISTRY`).

A step's ``run(st)`` reads what its ``needs`` left in ``st.results`` and hands the study its
settings (derived from the method configs' ``cache_key()``) and a ``compute`` that calls the
methods through their ``run(model_or_pool, prompts, config, store=, progress=)`` entry points
(models from the study's :class:`~circuitdiff.core.pool.ModelPool`, one loaded at a time).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..core.circuit import Circuit
from ..core.model import LoadedModel
from ..core.runs import RunFolder, model_tag, split_pieces
from ..core.stats import sub_seed
from ..core.task import EntityTrackingTask, TaskConfig
from ..methods import accuracy, dcm, discovery, evaluation, knockout
from ..methods.dcm import DCMResult, FunctionalConfig
from ..methods.discovery import DiscoveryConfig, DiscoveryError
from ..methods.faithfulness import random_circuits, random_draw_key
from ..methods.verdicts import unit_overlap

if TYPE_CHECKING:  # the runner's context; not imported (the runner imports this module)
    StudyRun = Any

KNOCKOUT_EDGES = ("last:correct_object", "query_label:prev_query_label", "labels:objects", "random")
#: circuit names in the study's tables: the automatic chain's, the paper chain's, a user's
AUTO_CIRCUIT, PAPER_CIRCUIT, GIVEN_CIRCUIT = "auto_circuit", "paper_circuit", "given_circuit"


@dataclass(frozen=True)
class Step:
    """One step of the study: its name, the steps it needs (run first, from their saved results
    when there), a one-line help, and ``run(st)``, which records its result in ``st.results``."""

    name: str
    needs: tuple[str, ...]
    help: str
    run: Callable[["StudyRun"], None]


# -- helpers -------------------------------------------------------------------------------------
def _flow_figure(loaded: LoadedModel, circuit: Circuit, cfg: DiscoveryConfig, path: Path,
                 title: str) -> None:
    """The circuit-flow diagram of ``circuit`` on an example prompt of ``cfg``'s task."""
    from ..report.diagram import circuit_flow_figure, example_layout

    prompt = EntityTrackingTask(loaded.tokenizer, TaskConfig(n_boxes=cfg.n_boxes),
                                seed=cfg.seed).sample(1)[0]
    tokens, roles = example_layout(loaded.tokenizer, prompt)
    circuit_flow_figure(circuit, tokens, roles, path, title, n_prompts=cfg.n_prompts)


def _note_truncated(st: "StudyRun", circuit: Circuit) -> None:
    if circuit.settings.get("truncated_at"):
        st.log(f"  note: paper chain — no head can send to the previous group, so "
               f"{circuit.settings['truncated_at']} and later groups are empty")


def _discover_one(st: "StudyRun", spec: str, out: Path, cfg: DiscoveryConfig,
                  figures: bool = True) -> dict:
    """Discovery on ``spec`` (with its figures unless ``figures`` is False); the result as a
    dict."""
    from ..report.figures import discovery_heatmaps
    from ..report.scan import auto_discovery_figures

    loaded = st.model(spec)
    found = discovery.run(loaded, None, cfg, store=out, progress=st.progress)
    if figures:
        if cfg.chain == "auto":
            auto_discovery_figures(found, out, loaded.name)
        else:
            discovery_heatmaps(found, out, loaded.name)
        _flow_figure(loaded, found.circuit, cfg, out / "circuit_flow.png",
                     f"circuit of {loaded.name}")
    if found.sizing.get("message"):
        st.log(f"  note: {found.sizing['message']}")
    _note_truncated(st, found.circuit)
    return {"circuit": found.circuit.to_dict(), "sizing": found.sizing, "curve": found.curve,
            "scan": found.scan.to_dict() if found.scan else None}


def discovery_key(cfg: DiscoveryConfig) -> dict:
    """A discovery step's settings: the config's key and its named seed streams (so a run
    folder from before the streams were named recomputes, and the log says why)."""
    return {**cfg.cache_key(), "seeds": cfg.seed_streams()}


def circuit_name(st: "StudyRun") -> str:
    """The name of the study's circuit in its tables."""
    if st.given is not None:
        return GIVEN_CIRCUIT
    return AUTO_CIRCUIT if st.cfg.discovery.chain == "auto" else PAPER_CIRCUIT


def base_circuit(st: "StudyRun") -> Circuit:
    return Circuit.from_dict(st.results["discover"]["circuit"])


def per_model(st: "StudyRun", one: Callable[[int, "RunFolder | None"], Any],
              cached_under: str, then: Callable[[int, Any], None]) -> list:
    """``one(i, store)`` for every model of the study, in model order, each followed by
    ``then(i, piece)``: under ``torchrun`` each rank runs its share of the models
    (:func:`~circuitdiff.core.runs.split_pieces`, the pieces cached under ``cached_under``);
    then the pool is freed."""
    try:
        return split_pieces(st.folder, len(st.models), one, cached_under=[cached_under],
                            then=then)
    finally:
        st.pool.free()


def _grid(c: Circuit) -> tuple[int, int]:
    return (c.n_layers, c.n_heads)


# -- the steps ------------------------------------------------------------------------------------
def _step_accuracy(st: "StudyRun") -> None:
    ev = st.cfg.evaluation
    cfg = accuracy.AccuracyConfig(n_prompts=ev.n_prompts, seed=ev.seed, n_boxes=ev.n_boxes,
                                  batch_size=ev.batch_size)

    def one(i: int, store: RunFolder | None) -> dict:
        r = accuracy.run(st.model(st.models[i]), None, cfg, store=store, progress=st.progress)
        return {**r.summary(), "hits": [int(x) for x in r.correct], "chance": 1 / ev.n_boxes}

    def log(i: int, r: dict) -> None:
        st.log(f"  {st.models[i]}: {ev.n_boxes}-box accuracy {r['accuracy']:.3f} (n={r['n']})")

    def compute() -> dict:
        return dict(zip(st.models, per_model(st, one, "accuracy/", log)))

    st.step("accuracy", {"models": st.models, "accuracy": cfg.cache_key()}, compute)


def _step_discover(st: "StudyRun") -> None:
    if st.given is not None:  # the user's circuit: nothing to discover
        circuit, source = st.given

        def given() -> dict:
            st.log(f"  the circuit is {source} (not discovered): {len(circuit.groups)} groups, "
                   f"{sum(len(g.heads) for g in circuit.groups.values())} heads")
            return {"circuit": circuit.to_dict(), "sizing": None, "curve": None, "scan": None,
                    "source": source}

        st.step("discover", {"model": st.base_spec, "circuit": circuit.to_dict(),
                             "source": source}, given)
        return
    cfg = st.cfg.discovery
    st.step("discover", {"model": st.base_spec, "discovery": discovery_key(cfg)},
            lambda: {**_discover_one(st, st.base_spec, st.folder.file("discover"), cfg),
                     "source": "discovered"})


def stability_discovery(cfg: DiscoveryConfig) -> DiscoveryConfig:
    """The study's discovery on another, named seed stream (its prompts, counterfactuals,
    held-out and mean sets are new draws): the rediscovery the stability ceiling compares."""
    return replace(cfg, seed=sub_seed(cfg.seed, "stability"))


def _step_stability(st: "StudyRun") -> None:
    cfg = st.cfg.discovery
    again = stability_discovery(cfg)

    def compute() -> dict:
        first = base_circuit(st)
        if st.given is not None:  # the ceiling is discovery's own noise: discover twice
            first = Circuit.from_dict(_discover_one(st, st.base_spec,
                                                    st.folder.file("stability/first"), cfg,
                                                    figures=False)["circuit"])
        second = Circuit.from_dict(_discover_one(st, st.base_spec,
                                                 st.folder.file("stability/again"), again,
                                                 figures=False)["circuit"])
        o = unit_overlap(first, second, _grid(first))
        st.log(f"  the base circuit rediscovered on other prompts: {o['shared']} of "
               f"{o['n_reference']} units again (Jaccard {o['jaccard'] or 0:.2f})")
        return {"jaccard": o["jaccard"], "overlap": o, "circuit": second.to_dict(),
                "seed": again.seed}

    st.step("stability", {"model": st.base_spec, "discovery": discovery_key(cfg),
                          "again": discovery_key(again),
                          "circuit": None if st.given is None else base_circuit(st).to_dict()},
            compute)


def _step_paper_chain(st: "StudyRun") -> None:
    cfg = st.cfg.paper_discovery
    if cfg is None or (st.given is None and st.cfg.discovery.chain != "auto"):
        return
    out = st.folder.file("discover_paper")

    def compute() -> dict:
        from ..report.figures import discovery_heatmaps

        loaded = st.model(st.base_spec)
        res = discovery.run(loaded, None, cfg, store=out, progress=st.progress)
        discovery_heatmaps(res, out, loaded.name)
        _flow_figure(loaded, res.circuit, cfg, out / "circuit_flow.png",
                     f"paper chain on {loaded.name}")
        _note_truncated(st, res.circuit)
        return {"circuit": res.circuit.to_dict()}

    st.step("paper_chain", {"model": st.base_spec, "discovery": discovery_key(cfg)}, compute)


def _circuits(st: "StudyRun") -> dict[str, Circuit]:
    out = {circuit_name(st): base_circuit(st)}
    if "paper_chain" in st.results:
        out[PAPER_CIRCUIT] = Circuit.from_dict(st.results["paper_chain"]["circuit"])
    return out


def _step_faithfulness(st: "StudyRun") -> None:
    ev = st.cfg.evaluation
    circuits = _circuits(st)
    first = next(iter(circuits))
    rest = {k: c for k, c in circuits.items() if k != first}
    # the study's circuit with random draws; the paper chain's for comparison, without
    configs = [replace(ev, circuits={first: circuits[first]})]
    if rest:
        configs.append(replace(ev, n_random=0, circuits=rest))

    def compute() -> list[dict]:
        from ..report.figures import plot_faithfulness_bars
        from ..report.markdown import format_protocols
        from ..report.tables import format_table, save_table

        rows = []
        for c in configs:
            rows += evaluation.run(st.pool, None, c, store=st.folder, progress=st.progress).rows
        save_table(st.folder, rows)
        plot_faithfulness_bars(rows, st.folder.file("faithfulness.png"))
        st.log(format_table(rows))
        st.log("both ablation protocols:\n" + format_protocols(rows))
        return [r.to_dict() for r in rows]

    st.step("faithfulness", {"models": st.models, "evaluation": ev.cache_key() | {
        "circuits": {k: c.to_dict() for k, c in circuits.items()}} | {
        k: v for c in circuits.values() for k, v in random_draw_key(c).items()},
        "row": evaluation.FaithfulnessRow.VERSION}, compute)


def _step_own_circuits(st: "StudyRun") -> None:
    cfg = st.cfg.fine_tune_discovery
    ev = st.cfg.evaluation
    base = base_circuit(st)
    grid = _grid(base)
    # the faithfulness step's random circuits of the base's shape: the calibration's draws
    randoms = random_circuits(base, ev.n_random, ev.random_seed)

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
            row = evaluation.run(st.model(spec), None,
                                 replace(ev, n_random=0, circuits={"own_circuit": own}),
                                 store=st.folder.file(f"own/{model_tag(spec)}/faithfulness"),
                                 progress=st.progress).rows[0]
            o = unit_overlap(base, own, grid)
            out[spec] = {"circuit": res["circuit"], "sizing": res["sizing"], "overlap": o,
                         "faithfulness": row.faithfulness, "faithfulness_ci": row.faithfulness_ci,
                         "random_overlaps": [unit_overlap(r, own, grid) for r in randoms]}
            f = "-" if row.faithfulness is None else f"{row.faithfulness:.2f}"
            st.log(f"  {spec}: {o['n_other']} units (faithfulness {f} on the evaluation "
                   f"prompts); {o['shared']} shared with the base's {o['n_reference']} "
                   f"(random circuits of its shape: {o['null_mean']:.1f}, p = {o['null_p']:.2g}; "
                   f"overlap coefficient {o['coefficient'] or 0:.2f}, Jaccard "
                   f"{o['jaccard'] or 0:.2f})")
        return out

    st.step("own_circuits", {"models": st.fine_tunes, "discovery": discovery_key(cfg),
                             "evaluation": replace(ev, circuits={}).cache_key(),
                             "row": evaluation.FaithfulnessRow.VERSION,
                             "base_circuit": base.to_dict()}, compute)


def _step_knockout(st: "StudyRun") -> None:
    ev = st.cfg.evaluation
    n = min(ev.n_prompts, st.cfg.knockout_prompts)
    # the config's prompts are the first n evaluation prompts (same task, seed)
    cfg = knockout.KnockoutConfig(edges=KNOCKOUT_EDGES, n=n, seed=ev.seed, n_boxes=ev.n_boxes,
                                  batch_size=ev.batch_size)

    def one(i: int, store: RunFolder | None) -> tuple[str, list[dict]]:
        loaded = st.model(st.models[i])
        res = knockout.run(loaded, None, cfg, store=store, progress=st.progress)
        return loaded.name, [c.to_dict() for c in res.curves]

    def plot(i: int, piece: tuple[str, list[dict]]) -> None:
        from ..report.figures import plot_knockout_curves

        name, curves = piece
        plot_knockout_curves([knockout.KnockoutCurve.from_dict(c) for c in curves],
                             st.folder.file(f"knockout/{model_tag(st.models[i])}.png"),
                             f"{name}, n={n}")

    def compute() -> dict:
        return {spec: {c["edge"]: c for c in curves}
                for spec, (_, curves) in zip(st.models, per_model(st, one, "knockout/", plot))}

    st.step("knockout", {"models": st.models, **cfg.cache_key()}, compute)


def _step_dcm(st: "StudyRun") -> None:
    config = replace(st.cfg.dcm, circuit=base_circuit(st))

    def compute() -> dict:
        from ..report.dcm import save_dcm_tables

        res = dcm.run(st.model(st.base_spec), None, config, store=st.folder,
                      progress=st.progress)
        for note in res.notes:
            st.log(f"  note: {note}")
        if res.rows:
            save_dcm_tables(st.folder, res.rows, res.empty_groups, "dcm_table")
        return res.to_dict()

    st.step("dcm", {"model": st.base_spec, "dcm": config.cache_key()}, compute)


def _step_functional(st: "StudyRun") -> None:
    result = DCMResult.from_dict(st.results["dcm"])
    if not result.rows:
        return
    config = FunctionalConfig(result, replace(st.cfg.dcm, circuit=None))

    def compute() -> list[dict]:
        from ..report.dcm import plot_functional_bars, save_functional_tables

        fun = dcm.functional.run(st.pool, None, config, store=st.folder, progress=st.progress)
        for note in fun.notes:
            st.log(f"  note: {note}")
        save_functional_tables(st.folder, fun.rows)
        if fun.rows:
            plot_functional_bars(fun.rows, st.folder.file("functional.png"))
        else:
            st.log("  no DCM selection to patch (no selection found a function)")
        return [r.to_dict() for r in fun.rows]

    st.step("functional", {"models": st.models, "dcm": st.results["dcm"]}, compute)


def _step_cmap(st: "StudyRun") -> None:
    from .cmap_step import cmap_settings, run_cmap

    circuit = base_circuit(st)
    st.step("cmap", cmap_settings(st, circuit), lambda: run_cmap(st, circuit))


#: the study's steps, in pipeline order (``StudyConfig.steps`` chooses; what they need runs too)
REGISTRY: tuple[Step, ...] = (
    Step("accuracy", (), "every model's accuracy", _step_accuracy),
    Step("discover", (), "the base circuit (automatic chain, position scan first; or the "
                         "circuit given)", _step_discover),
    Step("stability", ("discover",), "the base circuit rediscovered on other prompts (the "
                                     "overlap ceiling)", _step_stability),
    Step("paper_chain", (), "the paper's four-group chain on the base, beside it",
         _step_paper_chain),
    Step("faithfulness", ("discover",), "both circuits on every model, random baseline",
         _step_faithfulness),
    Step("own_circuits", ("discover",), "each fine-tune's own circuit, its faithfulness and "
                                        "its overlap with the base's", _step_own_circuits),
    Step("knockout", (), "attention-knockout curves on every model", _step_knockout),
    Step("dcm", ("discover",), "DCM per group of the base circuit", _step_dcm),
    Step("functional", ("dcm",), "DCM selections patched in every model", _step_functional),
    Step("cmap", ("accuracy", "discover"), "CMAP per fine-tune", _step_cmap),
)
#: the step names, in pipeline order
STEPS: tuple[str, ...] = tuple(s.name for s in REGISTRY)
STEP_BY_NAME: dict[str, Step] = {s.name: s for s in REGISTRY}
#: steps that compare fine-tunes with the base (skipped with no fine-tune)
FINE_TUNE_STEPS = ("own_circuits", "cmap")


def parse_steps(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"all"``/None → every step; ``"discover,dcm"`` → those (in pipeline order). An unknown
    name is a ``ValueError`` that lists the valid ones."""
    if text is None:
        return STEPS
    names = [x.strip() for x in (text.split(",") if isinstance(text, str) else text) if x.strip()]
    if not names or names == ["all"]:
        return STEPS
    bad = [n for n in names if n not in STEP_BY_NAME]
    if bad:
        raise ValueError(f"unknown step {bad[0]!r}; valid steps: {', '.join(STEPS)} (or all)")
    return tuple(s for s in STEPS if s in names)


def with_dependencies(steps: Sequence[str]) -> tuple[str, ...]:
    """``steps`` plus everything they need, in pipeline order."""
    need = set(steps)
    for s in reversed(REGISTRY):
        if s.name in need:
            need.update(s.needs)
    return tuple(s for s in STEPS if s in need)
