"""The study: the paper's pipeline end to end on one base model and its fine-tunes.

Steps (:data:`REGISTRY`, :class:`Step` records in pipeline order; ``StudyConfig.steps``
chooses, what they need runs too):

1. ``accuracy``      — every model's accuracy on the evaluation prompts;
2. ``discover``      — the base model's circuit by path patching with the automatic chain (its
                       first stage is the position scan), sized to a faithfulness target on its own
                       held-out prompts; or the circuit the user brings (``circuit=``);
3. ``stability``     — the base circuit rediscovered on another seed stream (disjoint draws):
                       the Jaccard of two discoveries, the ceiling of "uses the base circuit";
4. ``paper_chain``   — the paper's fixed four-group chain on the base, beside it;
5. ``faithfulness``  — both circuits on every model: mean ablation under both protocols, random
                       baseline with one interval per draw, faithfulness with a bootstrap interval;
6. ``own_circuits``  — each fine-tune's own circuit (same discovery), its faithfulness, and its
                       overlap with the base circuit's (head, role) units against the exact null
                       and against random circuits of the base's shape (calibration);
7. ``knockout``      — attention-knockout curves on every model;
8. ``dcm``           — DCM per group of the base circuit on the base (what each group encodes);
9. ``functional``    — the DCM-selected heads patched in every model (do the functions hold?);
10. ``cmap``         — CMAP per fine-tune: how much of its gain over the base each group carries.

Then one verdict per fine-tune (:mod:`circuitdiff.methods.verdicts`), each with its null and its
false-positive rate on random circuits, ``summary.json``, ``report.md`` and ``report.html``.
Every step is cached twice: its pieces inside the methods (a killed step resumes), and the whole
step under ``steps/`` with its settings (derived from the method configs' ``cache_key()``) — a
rerun with other settings recomputes the steps whose settings changed, keeps the others, and
says which.
"""

from .config import (ORGANISM_STUDY, StudyConfig, default_cmap, default_dcm, default_discovery,
                     default_evaluation, default_own_discovery, default_paper_discovery)
from .runner import StudyRun, changed_settings, run_study
from .steps import (AUTO_CIRCUIT, GIVEN_CIRCUIT, KNOCKOUT_EDGES, PAPER_CIRCUIT, REGISTRY, STEPS,
                    Step, parse_steps, with_dependencies)

__all__ = ["STEPS", "REGISTRY", "Step", "StudyConfig", "StudyRun", "run_study", "parse_steps",
           "with_dependencies", "changed_settings", "ORGANISM_STUDY", "AUTO_CIRCUIT",
           "PAPER_CIRCUIT", "GIVEN_CIRCUIT", "KNOCKOUT_EDGES", "default_cmap", "default_dcm",
           "default_discovery", "default_evaluation", "default_own_discovery",
           "default_paper_discovery"]
