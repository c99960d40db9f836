"""Circuit discovery by exact path patching, saved to a run folder.

One entry point, :func:`run` (the method protocol of :mod:`circuitdiff.methods.base`); two
chains, chosen by ``DiscoveryConfig.chain``:

* ``"auto"`` (default, :mod:`.auto`): start at the logits at ``last``, trace every group's
  inputs back — q at its own role, k and v at the roles the position scan marks as relevant —
  keep the senders whose scores stand out, name the groups by what they attend to, and size the
  circuit to a faithfulness target on held-out prompts (:mod:`.sizing`).
* ``"paper"`` (:mod:`.paper`): the paper's fixed four-step chain with fixed sizes.

Both score their steps with the one scorer of :mod:`.steps` (exact, attribution or hybrid),
cache every step's scores in the run folder (safetensors tagged with the settings that produced
them, so a killed run resumes at the first missing step), and share one
:class:`~circuitdiff.methods.path_patching.CaptureCache` over the steps. The prompts and the
circuit JSON are written alongside (heatmaps are drawn by :mod:`circuitdiff.report.figures`).

Modules import one way: ``config`` ← ``steps``, ``sizing`` ← ``auto``, ``paper`` ← this dispatcher.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

from ...core.model import LoadedModel
from ...core.runs import RunFolder
from ...core.task import Prompt
from ..base import as_store
from ..path_patching import CaptureCache
from .auto import attention_sources, run_auto, significant_senders
from .config import (CHAINS, METHODS, PAPER_CHAIN, PAPER_SIZES, DiscoveryConfig, DiscoveryError,
                     NoCircuitError, TargetUnreachable, parse_sizes)
from .paper import run_paper
from .steps import Context, DiscoveryResult, discovery_prompts


def run(loaded: LoadedModel,
        prompts: tuple[Sequence[Prompt], Sequence[Prompt]] | None = None,
        config: DiscoveryConfig | None = None, *, store: "RunFolder | str | Path | None" = None,
        progress: bool | None = None, cache: CaptureCache | None = None) -> DiscoveryResult:
    """Find the circuit of ``loaded`` with the config's chain.

    ``prompts``: None for the config's task prompts and ``task.corrupt()`` of them (saved as
    clean.jsonl / counterfactual.jsonl, reused on resume), or a ``(clean, counterfactual)``
    pair. ``store``: the run folder every step's scores, ``circuit.json`` (and the automatic
    chain's scan, sizing, curve) are cached in; None computes in a temporary folder that is
    removed afterwards. The steps share one capture cache (``cache``, a new one by default).
    """
    cfg = config or DiscoveryConfig()
    folder = as_store(store)
    if folder is None:
        with tempfile.TemporaryDirectory(prefix="circuitdiff-discovery-") as tmp:
            return _run(loaded, prompts, cfg, RunFolder(tmp), bool(progress), cache, save=False)
    return _run(loaded, prompts, cfg, folder, bool(progress), cache, save=True)


def _run(loaded: LoadedModel, prompts, cfg: DiscoveryConfig, folder: RunFolder, progress: bool,
         cache: CaptureCache | None, save: bool) -> DiscoveryResult:
    cfg, rules = cfg.resolved(loaded.arch.n_layers, loaded.arch.n_heads)
    if progress:
        import sys

        for rule in rules:
            print(f"[discover] {rule}", file=sys.stderr)
    ctx = Context.open(loaded, folder, cfg, prompts, progress,
                       cache if cache is not None else CaptureCache())
    ctx.rules = rules
    result = run_auto(ctx) if cfg.chain == "auto" else run_paper(ctx)
    if save:
        result.save(folder.path)
    return result


__all__ = ["CHAINS", "DiscoveryConfig", "DiscoveryError", "DiscoveryResult", "METHODS",
           "NoCircuitError", "PAPER_CHAIN", "PAPER_SIZES", "TargetUnreachable",
           "attention_sources", "discovery_prompts", "parse_sizes", "run", "significant_senders"]
