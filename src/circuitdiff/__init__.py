"""circuitdiff: find the circuit behind entity tracking and compare how fine-tuned models run it.

Data flows one way: task (prompts, counterfactuals, positions) → model (loading, architecture
adapter) → interventions (hooks) → methods → run folder → report.
"""

from .methods.accuracy import AccuracyResult, evaluate_accuracy
from .core.arch import Architecture, ArchitectureError, resolve
from .core.circuit import Circuit, CircuitGroup
from .core.interventions import Read, StopAfter, Write, intervene, run_with_edits
from .core.model import LoadedModel, ModelSpecError, load_model
from .core.task import EntityTrackingTask, Prompt, TaskConfig, TaskError, encode, encode_pair

__version__ = "0.1.0"

__all__ = [
    "AccuracyResult", "Architecture", "ArchitectureError", "Circuit", "CircuitGroup",
    "EntityTrackingTask", "LoadedModel", "ModelSpecError", "Prompt", "Read", "StopAfter",
    "TaskConfig", "TaskError", "Write", "encode", "encode_pair", "evaluate_accuracy", "intervene",
    "load_model", "resolve", "run",
]
