"""circuitdiff: find the circuit behind entity tracking and compare how fine-tuned models run it.

Data flows one way: task (prompts, counterfactuals, positions) → model (loading, architecture
adapter) → interventions (hooks) → methods → run folder → report.
"""

from .accuracy import AccuracyResult, evaluate_accuracy
from .arch import Architecture, ArchitectureError, resolve
from .circuit import Circuit, CircuitGroup
from .interventions import Read, StopAfter, Write, intervene, run
from .model import LoadedModel, ModelSpecError, load_model
from .task import EntityTrackingTask, Prompt, TaskConfig, TaskError, encode, encode_pair

__version__ = "0.1.0"

__all__ = [
    "AccuracyResult", "Architecture", "ArchitectureError", "Circuit", "CircuitGroup",
    "EntityTrackingTask", "LoadedModel", "ModelSpecError", "Prompt", "Read", "StopAfter",
    "TaskConfig", "TaskError", "Write", "encode", "encode_pair", "evaluate_accuracy", "intervene",
    "load_model", "resolve", "run",
]
