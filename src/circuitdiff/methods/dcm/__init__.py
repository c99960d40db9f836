"""DCM (desiderata-based component masking) on a circuit's groups, and functional patching of
the selected heads across models.

For each group of a :class:`~circuitdiff.core.circuit.Circuit` DCM can train on (:func:`dcm_view`)
and each desideratum (:mod:`.desiderata`), one mask value per head of the group is learned: at the
group's position the head output becomes ``m * base + (1 - m) * counterfactual``; the loss is
``-logit(target) + λ * Σ(1 - m)`` (Adam). Heads whose mask rounds to 0 (``m < 0.5``) are
*selected*: patching them alone from the counterfactual makes the model produce the target.

**Clamp, not sigmoid.** The mask is the parameter itself, initialised at exactly 1 and clamped to
``[0, 1]`` after every Adam step (as the original DCM code did). With a sigmoid the mask could
never start at 1 (the model itself), never reach 0 (a plain patch), and its gradient vanishes
near both ends; with a clamp the L1 penalty ``λ Σ(1 - m)`` acts linearly and "rounded m = 0" is a
threshold on the trained value.

Splits (paper: 1000 / 500 / 500, λ 0.01, lr 0.1, 2 epochs) default to 200 / 100 / 100 here so a
group trains in seconds on a CPU organism. A λ sweep trains all λ and all desiderata in one pass
(mask rows of the same forward); the default λ is the largest whose *validation* target accuracy
is within ``tolerance`` of the best validation accuracy of the sweep (fewest heads for nearly the
best accuracy) — the test split only reports. A selection counts (``found``) only if its
validation accuracy beats both no patching and random head sets of its size with a bootstrap
interval; every selection is compared on the test split with the unpatched model, the whole group
patched, and random head sets of the same size drawn from the whole head grid without replacement
(seeded, as :func:`~circuitdiff.methods.faithfulness.random_circuits`).

Modules: :mod:`.config` (:class:`DCMConfig`), :mod:`.desiderata`, :mod:`.masks` (the engine),
:mod:`.run` (``run(loaded, prompts, config, *, store, progress) -> DCMResult``) and
:mod:`.functional` (``run(pool, prompts, FunctionalConfig, *, store, progress) ->
FunctionalResult``: the found selections patched in every model).
"""

from __future__ import annotations

from . import functional
from .config import DEFAULT_LAMBDAS, PAPER_LAMBDA, PAPER_SPLITS, DCMConfig
from .desiderata import (DESIDERATA, PAPER_DESIDERATA, ROBUSTNESS_DESIDERATA, DesiderataError,
                         Example, TextPrompt, desideratum)
from .functional import (FunctionalConfig, FunctionalResult, FunctionalRow, check_tokenizers)
from .masks import DCMError, patched_last_logits
from .run import (NO_FUNCTION, DCMPlan, DCMResult, DesideratumResult, choose_lambda, dcm_view,
                  found_gate, prepare, random_gate_calibration, random_head_sets, run)

__all__ = ["DCMConfig", "DCMError", "DCMPlan", "DCMResult", "DEFAULT_LAMBDAS", "DESIDERATA",
           "DesideratumResult", "DesiderataError", "Example", "FunctionalConfig",
           "FunctionalResult", "FunctionalRow", "NO_FUNCTION", "PAPER_DESIDERATA", "PAPER_LAMBDA",
           "PAPER_SPLITS", "ROBUSTNESS_DESIDERATA", "TextPrompt", "check_tokenizers",
           "choose_lambda", "dcm_view", "desideratum", "found_gate", "functional",
           "patched_last_logits", "prepare", "random_gate_calibration", "random_head_sets", "run"]
