"""circuitdiff: find the circuit behind entity tracking and compare how fine-tuned models run it.

The package reads as the pipeline, imports going one way only:
``core`` (task and positions, model loading, architecture adapter, interventions, metrics,
circuit, run folder) → ``methods`` (accuracy, path patching, discovery, ablation, faithfulness,
evaluation, completeness, minimality, knockout) → ``report`` (tables, figures, markdown) →
``study`` → ``cli``. This module exports what a notebook needs.

The exports are lazy (PEP 562): ``import circuitdiff`` imports neither torch nor transformers,
so ``circuitdiff --help`` and argument errors answer at once; the first use of a name imports
its module.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: exported name -> the module (relative to this package) that defines it; a name equal to its
#: module's last part is the module itself (``circuitdiff.accuracy`` is ``methods.accuracy``)
_EXPORTS = {
    **dict.fromkeys(("Architecture", "ArchitectureError", "resolve"), ".core.arch"),
    **dict.fromkeys(("Circuit", "CircuitGroup"), ".core.circuit"),
    **dict.fromkeys(("Read", "StopAfter", "Write", "intervene", "run_with_edits"),
                    ".core.interventions"),
    **dict.fromkeys(("answer_prob", "correct", "last_logits"), ".core.metrics"),
    **dict.fromkeys(("LoadedModel", "ModelSpecError", "load_model"), ".core.model"),
    "RunFolder": ".core.runs",
    **dict.fromkeys(("EntityTrackingTask", "Prompt", "TaskConfig", "TaskError", "encode",
                     "encode_pair"), ".core.task"),
    **dict.fromkeys(("accuracy", "discovery", "evaluation", "knockout"), ".methods"),
    **dict.fromkeys(("AccuracyConfig", "AccuracyResult", "evaluate_accuracy"),
                    ".methods.accuracy"),
    **dict.fromkeys(("DiscoveryConfig", "DiscoveryResult"), ".methods.discovery"),
    **dict.fromkeys(("AnalysisConfig", "EvalConfig", "EvaluationResult"), ".methods.evaluation"),
    **dict.fromkeys(("Edge", "KnockoutConfig", "KnockoutCurve", "KnockoutResult",
                     "knockout_curve"), ".methods.knockout"),
    **dict.fromkeys(("FastOptions", "PatchRequest", "Scores", "attribution_scores",
                     "path_patching_scores"), ".methods.path_patching"),
    **dict.fromkeys(("StudyConfig", "run_study"), ".study"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Import an exported name on first use (PEP 562) and keep it as a module attribute."""
    where = _EXPORTS.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(where, __name__)
    value = importlib.import_module(f"{where}.{name}", __name__) if where == ".methods" \
        else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
