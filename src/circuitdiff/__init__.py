"""circuitdiff: find the circuit behind entity tracking and compare how fine-tuned models run it.

The package reads as the pipeline, imports going one way only:
``core`` (task and positions, model loading, architecture adapter, interventions, metrics,
circuit, run folder) → ``methods`` (accuracy, path patching, discovery, ablation, faithfulness,
evaluation, completeness, minimality, knockout) → ``report`` (tables, figures, markdown) →
``study`` → ``cli``. This module exports what a notebook needs.
"""

from .core.arch import Architecture, ArchitectureError, resolve
from .core.circuit import Circuit, CircuitGroup
from .core.interventions import Read, StopAfter, Write, intervene, run_with_edits
from .core.metrics import answer_prob, correct, last_logits
from .core.model import LoadedModel, ModelSpecError, load_model
from .core.runs import RunFolder
from .core.task import EntityTrackingTask, Prompt, TaskConfig, TaskError, encode, encode_pair
from .methods import accuracy, discovery, evaluation, knockout  # each method's run()
from .methods.accuracy import AccuracyConfig, AccuracyResult, evaluate_accuracy
from .methods.discovery import DiscoveryConfig, DiscoveryResult
from .methods.evaluation import AnalysisConfig, EvalConfig, EvaluationResult
from .methods.knockout import Edge, KnockoutConfig, KnockoutCurve, KnockoutResult, knockout_curve
from .methods.path_patching import (FastOptions, PatchRequest, Scores, attribution_scores,
                                    path_patching_scores)
from .study import StudyConfig, run_study

__version__ = "0.1.0"

__all__ = [
    "AccuracyConfig", "AccuracyResult", "AnalysisConfig", "Architecture", "ArchitectureError", "Circuit",
    "CircuitGroup", "DiscoveryConfig", "DiscoveryResult", "Edge", "EntityTrackingTask",
    "EvalConfig", "EvaluationResult", "FastOptions", "KnockoutConfig", "KnockoutCurve",
    "KnockoutResult", "LoadedModel", "ModelSpecError", "PatchRequest", "Prompt", "Read",
    "RunFolder", "Scores", "StopAfter", "StudyConfig", "TaskConfig", "TaskError", "Write",
    "accuracy", "answer_prob", "attribution_scores", "correct", "discovery", "encode",
    "encode_pair", "evaluate_accuracy", "evaluation", "intervene", "knockout", "knockout_curve",
    "last_logits", "load_model",
    "path_patching_scores", "resolve", "run_study", "run_with_edits",
]
