"""DCM desiderata: (base prompt, counterfactual prompt, target token) triples, one function each.

A *desideratum* states what a group of heads should carry: patch the group's head outputs at its
position from the counterfactual into the base run, and the model should now answer the target.

* **object_value** — target = the counterfactual's own answer (the heads carry the object);
* **position** — target = the base object at the counterfactual's query position;
* **box_label** — target = the base object in the box carrying the counterfactual's query label.

These three share one counterfactual per base prompt (``EntityTrackingTask.dcm_counterfactuals``,
whose three targets are three different tokens). The *robustness* set asks whether the position
information survives changes of the counterfactual's surface form: random text at its start or
before its query, extra tokens inside every segment, an extra segment at the start, at the end or
right before the queried one, the other wording ("Box F contains the apple"), the base's own
objects and labels bound differently, no commas, a comma after each object. (The original code's
"query about a different segment index" is the position desideratum itself: its counterfactual
always queries another index than the base.) In all of them the base prompt is the task's plain prompt and only the
counterfactual changes; the target is the base object at the counterfactual's queried segment
*ordinal* (its index among the counterfactual's segments, added segments included), which never
equals the base answer, and the counterfactual's labels avoid the base's labels where the alphabet
allows, so only positional information can produce the target.

Counterfactuals of the robustness set have other token lengths than the base, so every prompt is
located on its own (:func:`locate_text`: ``core.task.locate_rendered``, the one locator) and DCM
reads the counterfactual at *its* copy of the group's position.

Adding a desideratum is writing one function ``fn(task, base, rng) -> Example`` decorated with
:func:`desideratum`; an optional ``requires(task) -> reason | None`` says when it cannot apply to a
task's layout (the reason is shown to the user before any model is loaded).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ...core.stats import draw_rng
from ...core.task import (PLACEHOLDER, POSITION_NAMES, Batch, EntityTrackingTask, Located,
                          Prompt, Rendered, locate_rendered, make_batch, pad_token_id,
                          single_token_words)
from ...core.task import render as render_text

#: words random text is made of (kept if the tokenizer has them as one token; task words dropped)
FILLER_WORDS: tuple[str, ...] = (
    "and", "of", "a", "to", "it", "was", "on", "at", "with", "he", "she", "they", "we", "there",
    "big", "small", "red", "blue", "old", "new", "happy", "cat", "dog", "bird", "park", "house",
    "garden", "today", "now", "often", "Tom", "Ann", "likes", "sees", "finds", "the", "is", "in")
#: the other wording of a segment, used by ``altered_box_object_order``
ALTERED_TEMPLATE = "Box {label} contains the {object}"
#: the three desiderata of the paper, and the robustness set used for the position heads
PAPER_DESIDERATA: tuple[str, ...] = ("object_value", "position", "box_label")
ROBUSTNESS_DESIDERATA: tuple[str, ...] = (
    "random_text_start", "random_text_end", "tokens_between_box_and_object", "extra_segment_start",
    "extra_segment_end", "extra_box_before_correct", "altered_box_object_order",
    "altered_association", "no_commas", "comma_after_object")


class DesiderataError(ValueError):
    """Raised for a desideratum that is unknown or cannot apply to the task's layout."""


# -- prompts as text with spans ----------------------------------------------------------------
@dataclass
class TextPrompt(Rendered):
    """A prompt as free text plus the character spans of its objects, labels and query label.

    Unlike :class:`~circuitdiff.core.task.Prompt` the text is arbitrary (random prefixes, other
    separators, extra segments), so the spans are kept (:class:`~circuitdiff.core.task.Rendered`)
    instead of being re-derived.
    """

    objects: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    query_index: int | None = None

    @property
    def query_label(self) -> str:
        return self.text[self.query_span[0]:self.query_span[1]]

    @property
    def answer(self) -> str | None:
        return None if self.query_index is None else self.objects[self.query_index]

    def to_dict(self) -> dict:
        return {"text": self.text, "objects": self.objects, "labels": self.labels,
                "query_index": self.query_index}


def render(objects: Sequence[str], labels: Sequence[str], query_index: int | None,
           query_label: str | None = None, **surface) -> TextPrompt:
    """:func:`core.task.render <circuitdiff.core.task.render>` as a :class:`TextPrompt` (the
    query label defaults to the queried box's; ``surface``: templates, separator, prefix,
    interlude). With the defaults it is exactly ``Prompt.text``."""
    if len(objects) != len(labels):
        raise DesiderataError(f"{len(objects)} objects but {len(labels)} labels")
    query_label = labels[query_index] if query_label is None else query_label
    r = render_text(objects, labels, query_label, **surface)
    return TextPrompt(r.text, r.object_spans, r.label_spans, r.query_span, list(objects),
                      list(labels), query_index)


def from_prompt(p: Prompt) -> TextPrompt:
    """The :class:`TextPrompt` of a task prompt (same text, same spans)."""
    return render(p.objects, p.labels, p.query_index, p.query_label,
                  segment_template=p.segment_template, query_template=p.query_template)


def locate_text(tp: TextPrompt, tokenizer) -> Located:
    """Token ids and named positions of ``tp`` (``core.task.locate_rendered``; variants without
    separators get the scalar roles, labels and objects only)."""
    return locate_rendered(tp, tp, tp.query_index, tokenizer, partial_roles=True)


# -- examples and the registry -------------------------------------------------------------
@dataclass
class Example:
    """One DCM example: the target is the object of box ``target_box`` in the ``target_in``
    prompt (``"base"`` or ``"counterfactual"``), so its token is read from that prompt."""

    base: TextPrompt
    counterfactual: TextPrompt
    target_in: str
    target_box: int

    def __post_init__(self) -> None:
        if self.target_in not in ("base", "counterfactual"):
            raise DesiderataError(f"target_in must be 'base' or 'counterfactual', "
                                  f"got {self.target_in!r}")
        src = self.base if self.target_in == "base" else self.counterfactual
        if not 0 <= self.target_box < len(src.objects):
            raise DesiderataError(f"target box {self.target_box} is not a box of the "
                                  f"{self.target_in} prompt ({len(src.objects)} boxes)")

    @property
    def target_word(self) -> str:
        src = self.base if self.target_in == "base" else self.counterfactual
        return src.objects[self.target_box]


Maker = Callable[[EntityTrackingTask, Prompt, random.Random], Example]
Requirement = Callable[[EntityTrackingTask], "str | None"]


@dataclass(frozen=True)
class Desideratum:
    """A registered desideratum: its example maker, a one-line description, its requirement."""

    name: str
    make: Maker
    description: str
    requires: Requirement | None = None

    def why_not(self, task: EntityTrackingTask) -> str | None:
        """Why this desideratum cannot apply to ``task``'s layout, or ``None`` if it can."""
        return None if self.requires is None else self.requires(task)


DESIDERATA: dict[str, Desideratum] = {}


def desideratum(name: str, description: str,
                requires: Requirement | None = None) -> Callable[[Maker], Maker]:
    """Register ``fn(task, base, rng) -> Example`` as desideratum ``name`` (the extension point)."""
    def register(fn: Maker) -> Maker:
        if name in DESIDERATA:
            raise DesiderataError(f"desideratum {name!r} is already registered")
        DESIDERATA[name] = Desideratum(name, fn, description, requires)
        return fn
    return register


def resolve_names(names: Sequence[str]) -> list[str]:
    """Expand ``paper`` / ``robustness`` / ``all`` and check every name is registered."""
    out: list[str] = []
    for n in names:
        if n == "paper":
            out += PAPER_DESIDERATA
        elif n == "robustness":
            out += ("position",) + ROBUSTNESS_DESIDERATA
        elif n == "all":
            out += list(DESIDERATA)
        elif n in DESIDERATA:
            out.append(n)
        else:
            raise DesiderataError(f"unknown desideratum {n!r}; choose from {sorted(DESIDERATA)} "
                                  f"or paper / robustness / all")
    if not out:
        raise DesiderataError("no desideratum given")
    return list(dict.fromkeys(out))


def check_applicable(names: Sequence[str], task: EntityTrackingTask) -> None:
    """Raise, naming the reason, if any desideratum cannot apply to ``task``'s layout."""
    for n in names:
        why = DESIDERATA[n].why_not(task)
        if why:
            raise DesiderataError(f"desideratum {n!r} does not apply to this task: {why}. "
                                  f"Drop it from --desiderata")


def build_examples(task: EntityTrackingTask, name: str, base: Sequence[Prompt],
                   seed: int) -> list[Example]:
    """Examples of desideratum ``name`` for the ``base`` prompts.

    Example ``i`` draws from :func:`~circuitdiff.core.stats.draw_rng` ``(seed, i)`` whatever the
    desideratum,
    so the paper's three desiderata get the same counterfactual for the same base prompt (and the
    training batches over desiderata share the base rows).
    """
    d = DESIDERATA[name]
    why = d.why_not(task)
    if why:
        raise DesiderataError(f"desideratum {name!r} does not apply to this task: {why}")
    return [d.make(task, p, draw_rng(seed, i)) for i, p in enumerate(base)]


@dataclass
class EncodedExamples:
    """Examples of one desideratum as batches: the base and counterfactual prompts (each
    left-padded, positions per prompt) and the target token id per example."""

    name: str
    base: Batch
    counterfactual: Batch
    targets: torch.Tensor            # [N] long
    target_words: list[str] = field(default_factory=list)


def encode_examples(name: str, examples: Sequence[Example], tokenizer) -> EncodedExamples:
    """Locate every prompt and read each target's token id from the prompt that holds it."""
    if not examples:
        raise DesiderataError(f"desideratum {name!r} has no examples")
    pad = pad_token_id(tokenizer)
    lb = [locate_text(e.base, tokenizer) for e in examples]
    lc = [locate_text(e.counterfactual, tokenizer) for e in examples]
    targets = [(b if e.target_in == "base" else c).object_ids[e.target_box]
               for e, b, c in zip(examples, lb, lc)]
    return EncodedExamples(name, make_batch(lb, pad), make_batch(lc, pad),
                           torch.tensor(targets, dtype=torch.long),
                           [e.target_word for e in examples])


def check_position(enc: EncodedExamples, position: str) -> None:
    """The group's position must exist in every base and counterfactual prompt."""
    if position not in POSITION_NAMES:
        raise DesiderataError(f"DCM groups are read at one per-prompt position "
                              f"({', '.join(POSITION_NAMES)}), not {position!r}")
    for which, batch in (("base", enc.base), ("counterfactual", enc.counterfactual)):
        if bool((batch.positions[position] < 0).any()):
            raise DesiderataError(f"desideratum {enc.name!r}: some {which} prompts have no "
                                  f"{position} token, so a group read there cannot be patched")


# -- helpers the built-in desiderata share ---------------------------------------------------
def filler_words(task: EntityTrackingTask) -> list[str]:
    """Words for random text: single tokens for the task's tokenizer, none of its objects or
    labels (random text must not add a candidate answer). Cached on the task."""
    cached = getattr(task, "_dcm_filler", None)
    if cached is None:
        taken = set(task.objects) | set(task.labels) | {"Box", "contains"}
        cached = [w for w in single_token_words(task.tokenizer, FILLER_WORDS, "filler word")
                  if w not in taken]
        task._dcm_filler = cached  # type: ignore[attr-defined]
    return cached


def _random_text(task: EntityTrackingTask, rng: random.Random, lo: int = 2, hi: int = 4) -> str:
    words = [rng.choice(filler_words(task)) for _ in range(rng.randint(lo, hi))]
    return " ".join(words)


def _needs_filler(task: EntityTrackingTask) -> str | None:
    n = len(filler_words(task))
    return None if n >= 2 else (f"the tokenizer has {n} single-token filler words (of "
                                f"FILLER_WORDS, minus the task's objects and labels); random "
                                f"text needs at least 2")


def _needs_boxes(k: int) -> Requirement:
    def check(task: EntityTrackingTask) -> str | None:
        n = task.config.n_boxes
        return None if n >= k else (f"it needs at least {k} boxes so that its target differs "
                                    f"from the base answer, the task has {n}")
    return check


def _all_of(*checks: Requirement) -> Requirement:
    def check(task: EntityTrackingTask) -> str | None:
        return next((why for c in checks if (why := c(task))), None)
    return check


def _paper_example(task: EntityTrackingTask, base: Prompt, rng: random.Random,
                   kind: str) -> Example:
    """The task's own DCM counterfactual; the target word is located in base or counterfactual."""
    ds = task.dcm_counterfactuals([base], seed=rng.randrange(2 ** 31))
    cf, word = ds.counterfactual[0], ds.targets[kind][0]
    where, box = ("base", base.objects.index(word)) if word in base.objects else \
        ("counterfactual", cf.objects.index(word))
    return Example(from_prompt(base), from_prompt(cf), where, box)


@dataclass
class _Counterfactual:
    """A position counterfactual before rendering: segments, queried box, extra text."""

    objects: list[str]
    labels: list[str]
    query_index: int
    segment_template: str
    separator: str = ", "
    prefix: str = ""
    interlude: str = ""

    def render(self, query_template: str) -> TextPrompt:
        return render(self.objects, self.labels, self.query_index,
                      segment_template=self.segment_template, query_template=query_template,
                      separator=self.separator, prefix=self.prefix, interlude=self.interlude)


def _position_variant(task: EntityTrackingTask, base: Prompt, rng: random.Random,
                      insert: str | None = None, **surface) -> Example:
    """A position counterfactual with fresh objects (and labels disjoint from the base's when the
    alphabet allows), optionally one extra segment inserted at the ``start``, the ``end`` or
    ``before`` the queried one; target = base object at the queried segment's ordinal."""
    n, i = base.n_boxes, base.query_index
    shift = 1 if insert in ("start", "before") else 0
    choices = [j for j in range(n) if j + shift < n and j + shift != i]
    j = rng.choice(choices)
    extra = 1 if insert else 0
    objs = rng.sample([o for o in task.objects if o not in base.objects], n + extra)
    free = [lab for lab in task.labels if lab not in base.labels]
    labs = rng.sample(free if len(free) >= n + extra else list(task.labels), n + extra)
    if insert == "start":
        at, q = 0, j + 1
    elif insert == "before":
        at, q = j, j + 1
    elif insert == "end":
        at, q = n, j
    else:
        at, q = None, j
    if at is None:
        objs, labs = objs[:n], labs[:n]
    else:  # the last drawn (object, label) is the extra segment
        objs = objs[:n][:at] + [objs[n]] + objs[:n][at:]
        labs = labs[:n][:at] + [labs[n]] + labs[:n][at:]
    cf = _Counterfactual(objs, labs, q, surface.pop("segment_template", base.segment_template),
                         **surface)
    return Example(from_prompt(base), cf.render(base.query_template), "base", q)


# -- the paper's three -----------------------------------------------------------------------
@desideratum("object_value", "target = the counterfactual's own answer", _needs_boxes(3))
def object_value(task: EntityTrackingTask, base: Prompt, rng: random.Random) -> Example:
    return _paper_example(task, base, rng, "object_value")


@desideratum("position", "target = base object at the counterfactual's query position",
             _needs_boxes(3))
def position(task: EntityTrackingTask, base: Prompt, rng: random.Random) -> Example:
    return _paper_example(task, base, rng, "position")


@desideratum("box_label", "target = base object in the box with the counterfactual's query label",
             _needs_boxes(3))
def box_label(task: EntityTrackingTask, base: Prompt, rng: random.Random) -> Example:
    return _paper_example(task, base, rng, "box_label")


# -- the robustness set (position information under surface changes) -------------------------
def _extra_segment_fits(task: EntityTrackingTask) -> str | None:
    n = task.config.n_boxes
    if len(task.objects) < 2 * n + 1:
        return (f"an extra segment needs {2 * n + 1} distinct single-token objects (base, "
                f"counterfactual and one more), the tokenizer keeps {len(task.objects)}")
    if len(task.labels) < n + 1:
        return f"an extra segment needs {n + 1} labels, the tokenizer keeps {len(task.labels)}"
    return None


def _text_after_object(task: EntityTrackingTask) -> str | None:
    tmpl = task.config.segment_template
    return None if not tmpl.endswith("{object}") else (
        f"the segment template {tmpl!r} ends with the object, so the separator's comma already "
        f"follows it")


def _other_wording(task: EntityTrackingTask) -> str | None:
    tmpl = task.config.segment_template
    return None if tmpl != ALTERED_TEMPLATE else (
        f"the task already uses the altered wording {ALTERED_TEMPLATE!r}")


def _with_filler_between(template: str, filler: str) -> str:
    """``template`` with ``filler`` inserted after its first placeholder (between the object and
    the box label in either word order)."""
    m = PLACEHOLDER.search(template)
    return template[:m.end()] + " " + filler + template[m.end():]


@desideratum("random_text_start", "position counterfactual with random text before the context",
             _all_of(_needs_boxes(3), _needs_filler))
def random_text_start(task: EntityTrackingTask, base: Prompt, rng: random.Random) -> Example:
    text = _random_text(task, rng)
    return _position_variant(task, base, rng, prefix=text[:1].upper() + text[1:] + ". ")


@desideratum("random_text_end", "position counterfactual with random text between context "
             "and query", _all_of(_needs_boxes(3), _needs_filler))
def random_text_end(task: EntityTrackingTask, base: Prompt, rng: random.Random) -> Example:
    text = _random_text(task, rng)
    return _position_variant(task, base, rng, interlude=text[:1].upper() + text[1:] + ". ")


@desideratum("tokens_between_box_and_object", "position counterfactual with extra tokens between "
             "each object and its box", _all_of(_needs_boxes(3), _needs_filler))
def tokens_between_box_and_object(task: EntityTrackingTask, base: Prompt,
                                  rng: random.Random) -> Example:
    tmpl = _with_filler_between(base.segment_template, _random_text(task, rng, 1, 3))
    return _position_variant(task, base, rng, segment_template=tmpl)


@desideratum("extra_segment_start", "position counterfactual with one more segment at the start "
             "(target shifts by one)", _all_of(_needs_boxes(3), _extra_segment_fits))
def extra_segment_start(task: EntityTrackingTask, base: Prompt, rng: random.Random) -> Example:
    return _position_variant(task, base, rng, insert="start")


@desideratum("extra_segment_end", "position counterfactual with one more segment at the end",
             _all_of(_needs_boxes(3), _extra_segment_fits))
def extra_segment_end(task: EntityTrackingTask, base: Prompt, rng: random.Random) -> Example:
    return _position_variant(task, base, rng, insert="end")


@desideratum("extra_box_before_correct", "position counterfactual with one more segment right "
             "before the queried one (target shifts by one)",
             _all_of(_needs_boxes(3), _extra_segment_fits))
def extra_box_before_correct(task: EntityTrackingTask, base: Prompt, rng: random.Random) -> Example:
    return _position_variant(task, base, rng, insert="before")


@desideratum("altered_box_object_order", "position counterfactual worded 'Box F contains the "
             "apple'", _all_of(_needs_boxes(3), _other_wording))
def altered_box_object_order(task: EntityTrackingTask, base: Prompt, rng: random.Random) -> Example:
    return _position_variant(task, base, rng, segment_template=ALTERED_TEMPLATE)


def _derangement(n: int, rng: random.Random) -> list[int]:
    """A permutation of ``range(n)`` that moves every index (n >= 2)."""
    while True:
        perm = rng.sample(range(n), n)
        if all(p != i for i, p in enumerate(perm)):
            return perm


@desideratum("altered_association", "counterfactual with the base's own objects and labels, "
             "each moved to another segment", _needs_boxes(3))
def altered_association(task: EntityTrackingTask, base: Prompt, rng: random.Random) -> Example:
    """Objects and labels are both deranged, so at the queried ordinal ``j`` the counterfactual's
    object and label differ from the base's: the position target ``base.objects[j]`` differs from
    the value target and from the box-label target."""
    n, i = base.n_boxes, base.query_index
    j = rng.choice([x for x in range(n) if x != i])
    objs = [base.objects[k] for k in _derangement(n, rng)]
    labs = [base.labels[k] for k in _derangement(n, rng)]
    cf = render(objs, labs, j, segment_template=base.segment_template,
                query_template=base.query_template)
    return Example(from_prompt(base), cf, "base", j)


@desideratum("no_commas", "position counterfactual with segments separated by spaces only",
             _needs_boxes(3))
def no_commas(task: EntityTrackingTask, base: Prompt, rng: random.Random) -> Example:
    return _position_variant(task, base, rng, separator=" ")


@desideratum("comma_after_object", "position counterfactual with a comma after each object",
             _all_of(_needs_boxes(3), _text_after_object))
def comma_after_object(task: EntityTrackingTask, base: Prompt, rng: random.Random) -> Example:
    tmpl = base.segment_template.replace("{object}", "{object},")
    return _position_variant(task, base, rng, segment_template=tmpl)
