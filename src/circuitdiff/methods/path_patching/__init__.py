"""Path patching: the effect of one sender head on the metric through chosen receivers only.

For every sender head ``(layer, head)`` and every clean prompt with its counterfactual
(``task.corrupt``):

1. **pass 1** — run clean, but at every position ``>= p`` (the sender position, per sample) freeze
   *all* head outputs to their clean values, except the sender, which takes its counterfactual
   value; record the receivers' inputs (q, k or v projection output, per sample at ``p``);
2. **pass 2** — run clean with only those receiver inputs replaced;
3. score = mean over samples of ``(p_patched(answer) - p_clean(answer)) / p_clean(answer)``
   (the clean answer). With no receivers the receiver is the logits: pass 1's own output.

Receivers are query heads ``(layer, head)``. For ``q`` a receiver is that head's query; for
``k``/``v`` under GQA the input is shared: patching receiver head ``h``'s v patches kv head
``arch.kv_head_of(h)`` (so every query head of that group sees it). The position is any role of
the task's position schema (``last``, ``query_label``, ``labels``, ``separators``,
``prev_query_label+1`` …; see :mod:`circuitdiff.core.task`), possibly covering several tokens per
prompt: the sender takes its counterfactual value at every token of the role, every head is frozen
from the role's first token on, and the receivers' inputs are patched at every token of the role
(for k/v that is where the receiving head reads keys and values, e.g. q at ``last`` but k and v
at ``labels``). The sender and the receiver input share the role. The counterfactual value is read at the *clean*
prompt's index: :func:`~circuitdiff.core.task.encode_pair` gives a counterfactual that lacks the named
token (no previous query label) the clean index, and all prompts share one layout.

Logits receivers need position ``last`` (elsewhere every path to the logits is frozen).

Call shape: ``path_patching_scores(loaded, clean, counterfactual, PatchRequest(position,
receivers, kind, senders), FastOptions(...), cache=CaptureCache())`` → :class:`Scores`
``(mean, se)``.

Two implementations give the same scores:

* ``impl="naive"`` — the faithful oracle: two full forwards per sender (one for logits
  receivers), batched over samples, with every head edited at every position ``>= p``.
* ``impl="fast"`` — exact, much cheaper. Positions ``< p`` are untouched (causal), and the
  receiver input at ``p`` is a function of the residual stream at ``p`` only; with every head
  output at ``p`` frozen except the sender's, that residual differs from clean only through the
  sender's output and the MLPs *at p*. So pass 1 is a single-position computation: start from the
  clean residual at ``p``, add ``o_proj`` of the edited head vector (the model's own ``o_proj``
  module, LoRA included), then run each later layer's MLP live with its attention output fixed
  to the clean one. Many senders are stacked along the batch dimension; senders at or after the
  last receiver layer score exactly 0. Pass 2 only changes positions ``>= p`` in layers ``>=`` the
  first receiver's, so it runs the model's own forward on the suffix only (samples grouped by
  ``p``), with a clean KV cache of the prefix and the clean residual entering the first receiver
  layer, stacked over senders. The replay is checked numerically against the clean forward on
  every batch; a decoder layer of another shape (e.g. Gemma-3's extra norms) falls back to the
  naive path with a warning.

Also here: a gradient estimate (``attribution_scores``, one forward/backward pair per batch) and
:func:`compare_scores` (Spearman rank correlation and top-k recall against exact scores).
"""

from .attribution import ScoreComparison, attribution_scores, compare_scores
from .common import (IMPLS, RECEIVER_KINDS, PatchRequest, PathPatchingError, all_heads,
                     check_position, top_heads)
from .exact import CaptureCache, FastOptions, Scores, path_patching_scores

__all__ = ["CaptureCache", "FastOptions", "IMPLS", "PatchRequest", "PathPatchingError",
           "RECEIVER_KINDS", "ScoreComparison", "Scores", "all_heads", "attribution_scores",
           "check_position", "compare_scores", "path_patching_scores", "top_heads"]
