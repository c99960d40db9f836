"""The study runner: one run folder, one model pool, each step's cached result, the verdicts
and the report."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ..core.circuit import Circuit
from ..core.distributed import is_main
from ..core.model import LoadedModel
from ..core.pool import ModelPool
from ..core.runs import RunFolder, atomic_write_text, environment, no_progress_bars
from ..methods.discovery import NoCircuitError
from ..methods.verdicts import verdicts
from .config import ORGANISM_STUDY, StudyConfig
from .steps import FINE_TUNE_STEPS, STEP_BY_NAME, circuit_name, with_dependencies


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


class StudyRun:
    """One study run: the folder, the model pool, the circuit given (if any), and each step's
    cached result."""

    def __init__(self, models: Sequence[str], load: Callable[[str], LoadedModel],
                 folder: RunFolder, cfg: StudyConfig, progress: bool,
                 log: Callable[[str], None], given: tuple[Circuit, str] | None = None):
        self.models, self.load, self.folder, self.cfg = list(models), load, folder, cfg
        self.pool = ModelPool(self.models, load)
        self.progress, self.log, self.given = progress, log, given
        self.results: dict[str, Any] = {}
        self.timings: dict[str, dict] = {}

    @property
    def base_spec(self) -> str:
        return self.models[0]

    @property
    def fine_tunes(self) -> list[str]:
        return self.models[1:]

    def model(self, spec: str) -> LoadedModel:
        """``spec`` loaded (the previously loaded model is freed first)."""
        return self.pool.get(spec)

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
            self.log(f"[{name}] settings changed "
                     f"({changed_settings(saved.get('settings', {}), settings)}): "
                     f"recomputing; pieces whose own settings did not change are kept")
        self.log(f"[{name}] {STEP_BY_NAME[name].help}")
        t0 = time.perf_counter()
        result = json.loads(json.dumps(compute(), default=str))
        seconds = round(time.perf_counter() - t0, 1)
        atomic_write_text(path, json.dumps({"settings": settings, "seconds": seconds,
                                            "result": result}))
        self.timings[name] = {"seconds": seconds, "reused": False}
        self.results[name] = result
        return result


def _given_circuit(circuit: "Circuit | str | Path | None") -> tuple[Circuit, str] | None:
    if circuit is None:
        return None
    if isinstance(circuit, Circuit):
        return circuit, "given by the caller"
    path = Path(circuit)
    if not path.exists():
        raise FileNotFoundError(f"--circuit {path}: no such file (a circuit.json as "
                                f"`circuitdiff discover` writes)")
    return Circuit.load(path), f"loaded from {path}"


def _load_with_thread_rule(spec: str) -> LoadedModel:
    """:func:`~circuitdiff.core.model.load_model` on CPU, then the CLI's thread rule for it."""
    import torch

    from ..core.model import default_threads, load_model

    loaded = load_model(spec)
    torch.set_num_threads(default_threads(loaded.model))
    return loaded


def run_study(models: Sequence[str] = ORGANISM_STUDY,
              load: Callable[[str], LoadedModel] | None = None,
              out: str | Path = "runs/study", cfg: StudyConfig | None = None,
              progress: bool = True, log: Callable[[str], None] = print, *,
              circuit: "Circuit | str | Path | None" = None) -> dict:
    """Run the study on ``models`` (the first is the base whose circuit is found); returns the
    summary (also ``summary.json``), with ``report.md`` and ``report.html`` written beside it.

    ``load(spec)`` loads a model (default :func:`circuitdiff.core.model.load_model` on CPU,
    float32, with the CLI's thread rule :func:`~circuitdiff.core.model.default_threads`).
    ``progress=False`` silences every progress bar (transformers' loading bars included);
    ``log`` receives the step lines (``print`` by default). ``circuit`` (a :class:`Circuit` or a circuit.json path) is studied instead of
    discovering one; every other step and verdict runs as usual::

        from circuitdiff import StudyConfig, run_study
        summary = run_study(out="runs/study")                       # the shipped organisms
        summary["verdicts"]["organism:lora"]["gain_carried"]["answer"]
        run_study(["my/base", "my/lora-adapter"], out="runs/mine",
                  cfg=StudyConfig(steps=("discover", "faithfulness")))
    """
    quiet = contextlib.nullcontext() if progress else no_progress_bars()
    with quiet:
        return _run_study(models, load, out, cfg, progress, log, circuit)


def _run_study(models: Sequence[str], load: Callable[[str], LoadedModel] | None,
               out: str | Path, cfg: StudyConfig | None, progress: bool,
               log: Callable[[str], None], circuit: "Circuit | str | Path | None") -> dict:
    cfg = cfg or StudyConfig()
    if load is None:
        load = _load_with_thread_rule
    if not models:
        raise ValueError("the study needs at least one model")
    if len(set(models)) != len(models):
        raise ValueError(f"a model is listed twice: {list(models)}")
    t_start = time.perf_counter()
    st = StudyRun(models, load, RunFolder(out), cfg, progress, log, _given_circuit(circuit))
    todo = with_dependencies(cfg.steps)
    extra = [s for s in todo if s not in cfg.steps]
    log(f"study of {', '.join(models)}: steps {', '.join(cfg.steps)}"
        + (f" (and {', '.join(extra)}, which they need)" if extra else ""))
    summary: dict = {"models": list(models), "config": cfg.to_dict(), "steps": list(todo)}
    for name in todo:
        if name in FINE_TUNE_STEPS and not st.fine_tunes:
            continue
        try:
            STEP_BY_NAME[name].run(st)
        except NoCircuitError as e:
            log(f"no circuit: {e}")
            summary["no_circuit"] = str(e)
            break
    st.pool.free()
    summary.update(_collect(st))
    if "discover" in st.results and "no_circuit" not in summary:
        summary["verdicts"] = verdicts(st.results, st.base_spec, st.fine_tunes, cfg.rules,
                                       circuit_name(st))
        summary["rules_table"] = cfg.rules.table()
    summary["timings"] = st.timings
    summary["run"] = {"seconds": round(time.perf_counter() - t_start, 1), **environment()}
    return _finish(st, summary)


def _collect(st: StudyRun) -> dict:
    """The summary's sections from the step results (the keys ``report`` reads)."""
    r, out = st.results, {}
    if "accuracy" in r:
        out["accuracy"] = {k: {kk: vv for kk, vv in v.items() if kk != "hits"}
                           for k, v in r["accuracy"].items()}
    if "discover" in r:
        out["circuit"] = r["discover"]["circuit"]
        out["circuit_name"] = circuit_name(st)
        out["circuit_source"] = r["discover"].get("source", "discovered")
        if r["discover"].get("sizing"):
            out["discovery"] = {k: r["discover"][k] for k in ("sizing", "curve", "scan")}
    if "stability" in r:
        out["stability"] = r["stability"]
    if "paper_chain" in r:
        out["paper_circuit"] = r["paper_chain"]["circuit"]
    if "faithfulness" in r:
        out["faithfulness"] = [{k: v for k, v in row.items() if not k.endswith("_hits")}
                               for row in r["faithfulness"]]
    for key in ("own_circuits", "knockout", "dcm", "cmap"):
        if key in r:
            out[key] = r[key]
    if "functional" in r:
        out["functional"] = [{k: v for k, v in row.items() if k != "hits"}
                             for row in r["functional"]]
    return out


def _finish(st: StudyRun, summary: dict) -> dict:
    from ..report.markdown import study_report
    from ..report.study_html import write_study_html

    folder = st.folder
    folder.save_json("summary.json", summary)
    md_path = atomic_write_text(folder.file("report.md"), study_report(summary))
    html_path = write_study_html(summary, folder.path, folder.file("report.html"))
    st.log(f"report: {html_path} (plain text: {md_path})")
    if st.cfg.screenshot:
        _screenshot(st, html_path)
    return summary


def _screenshot(st: StudyRun, html_path: Path) -> None:
    """Where a Chromium is installed: load the report headless, note what it saw, and save a
    screenshot of its first screen as ``report.png`` (skipped quietly without a browser)."""
    from ..report.browser import check_page, find_browser

    browser = find_browser()
    if browser is None or not is_main():  # rank 0 alone writes the run folder
        return
    try:
        res = check_page(html_path, st.folder.file("report.png"), browser, timeout=60)
    except Exception as e:  # a browser that fails must not fail the study
        st.log(f"  (could not render the report headless: {type(e).__name__}: {e})")
        return
    if not res.ok:
        st.log(f"  warning: the report did not render cleanly in {browser}: {res}")
