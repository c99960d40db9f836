"""The study's CMAP step: per fine-tune, how much of its gain over the base the circuit carries
(skipped, with the reason, when the gain is not distinguishable from 0)."""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

from ..core.circuit import Circuit
from ..core.runs import RunFolder, model_tag, settings_digest, split_pieces
from ..core.stats import difference_interval
from ..core.pool import ModelPool
from ..methods import cmap
from ..methods.cmap import CMAPConfig, CMAPResult, CMAPRow

if TYPE_CHECKING:  # the runner's context; not imported (the runner imports this module)
    StudyRun = Any


def cmap_key(cfg: CMAPConfig) -> dict:
    """The CMAP config's derived key without the circuit (the study's circuit is its own)."""
    return cfg.settings()


def cmap_settings(st: "StudyRun", circuit: Circuit) -> dict:
    return {"base": st.base_spec, "models": st.fine_tunes,
            "cmap": replace(st.cfg.cmap, circuit=circuit).cache_key(),
            "row": CMAPRow.VERSION, "accuracy": settings_digest(st.results["accuracy"]),
            "rules": asdict(st.cfg.rules)}


def run_cmap(st: "StudyRun", circuit: Circuit) -> dict:
    """CMAP of ``circuit`` per fine-tune with a significant gain over the base (the others are
    skipped, with the reason); under ``torchrun`` each rank runs its share of the fine-tunes
    (:func:`~circuitdiff.core.runs.split_pieces`), gathered in the study's model order."""
    from ..report.cmap import plot_cmap_bars

    acc = st.results["accuracy"]
    rules = st.cfg.rules
    fine_tunes = st.fine_tunes

    def one(i: int, store: RunFolder | None) -> dict:
        spec = fine_tunes[i]
        gap = acc[spec]["accuracy"] - acc[st.base_spec]["accuracy"]
        ci = difference_interval(acc[spec]["hits"], acc[st.base_spec]["hits"],
                                 rules.bootstrap, rules.seed, rules.confidence)
        if ci is not None and ci[0] <= 0:  # nothing for a circuit to carry
            why = (f"no significant gain over the base to explain (accuracy gap {gap:+.2f} "
                   f"[{ci[0]:.2f}, {ci[1]:.2f}], n={acc[spec]['n']}); CMAP skipped")
            return {"skipped": why, "gap": gap, "gap_ci": ci}
        st.pool.free()
        return cmap.run(ModelPool([st.base_spec, spec], st.load), None,
                        replace(st.cfg.cmap, circuit=circuit), store=store,
                        progress=st.progress).to_dict()

    def report(i: int, res: dict) -> None:
        spec = fine_tunes[i]
        if "skipped" in res:
            st.log(f"  {spec}: {res['skipped']}")
            return
        d = CMAPResult.from_dict(res).directions[0]  # fine-tune -> base
        plot_cmap_bars(d, st.folder.file(f"cmap/{model_tag(spec)}.png"))
        whole = next((r for r in d.rows if r.kind == "circuit"), None)
        if d.gap_ci is not None and d.gap_ci[0] <= 0:
            st.log(f"  {spec}: gap {d.gap:+.2f} [{d.gap_ci[0]:.2f}, {d.gap_ci[1]:.2f}]: "
                   f"no significant gain to explain")
        elif whole is not None:
            share = "undefined" if whole.share is None else f"{whole.share:.2f}"
            rnd = [x for x in whole.random_shares if x is not None]
            null = (f"; random circuits of its shape {sum(rnd) / len(rnd):.2f} on average, "
                    f"rank {whole.rank} of {len(rnd) + 1}" if rnd else "")
            st.log(f"  {spec}: gap {d.gap:+.2f}; the circuit carries {share} of it{null}")

    # the cached direction results of either order (fine-tune -> base, base -> fine-tune), not
    # the recordings (large, and only ever read by the rank that made them)
    cached = [f"cmap/{model_tag(s)}__" for s in st.models]
    pieces = split_pieces(st.folder, len(fine_tunes), one, cached_under=cached, then=report)
    return dict(zip(fine_tunes, pieces))
