"""Entity-tracking task: prompts, counterfactual sets and their token positions.

A prompt lists ``n_boxes`` (object, box label) pairs and asks for the object in one box::

    The apple is in Box F, the book is in Box C, the map is in Box D. Box C contains the  -> " book"

Every token position a method needs is a named **role** computed from the tokenizer's own
offsets for *this* prompt — never from padded lengths or hard-coded offsets — so the same code is
right for any tokenizer. The position schema (:data:`SCALAR_ROLES`, :data:`MULTI_ROLES`,
:func:`role_names`) covers every token of the template:

* one token per prompt: ``last``, ``query_label``, ``prev_query_label`` (the queried box's label
  in the context), ``correct_object``, and each box's ``label_i``, ``object_i``, ``separator_i``
  (the ``,``/``.`` token closing segment ``i``);
* several tokens per prompt: ``labels``, ``objects``, ``separators`` (every box), ``fillers``
  (the template's other context words: ``the``, ``is``, ``in``, ``Box``), ``query_words`` (query
  tokens other than the query label and ``last``) and ``prefix`` (special tokens before the text,
  e.g. BOS; only defined for tokenizers that add one);
* any role with an offset, ``prev_query_label+1``, ``labels-1`` (every position shifted).

:meth:`Batch.role` resolves a role name (offset included) to ``[B]`` or ``[B, P]`` indices; an
unknown role or an offset that leaves the prompt is a :class:`TaskError` naming the defined roles.
Objects and labels are kept only if they are a single token (with the leading space) for the
tokenizer at hand.
"""

from __future__ import annotations

import json
import random
import re
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .config import Config
from .runs import atomic_write_text

DEFAULT_OBJECTS: tuple[str, ...] = (
    "apple", "book", "map", "cup", "key", "pen", "hat", "ball", "bag", "box", "coat", "card",
    "bell", "coin", "lamp", "ring", "shoe", "sock", "toy", "watch", "bread", "milk", "egg",
    "fish", "cake", "phone", "clock", "chair", "table", "plate", "bowl", "spoon", "fork",
    "knife", "bottle", "brush", "comb", "glass", "rope", "stone", "shell", "leaf", "flower",
    "seed", "rock", "wire", "tape", "paper", "letter", "note", "photo", "picture", "ticket",
    "wallet", "camera", "radio", "guitar", "drum", "violin", "piano", "ribbon", "button",
    "candle", "mirror", "pillow", "blanket", "towel", "soap", "shirt", "dress", "jacket",
    "glove", "scarf", "belt", "boot", "wheel", "engine", "cable", "battery", "bulb", "file",
    "disk", "drug", "plane", "train", "car", "boat", "bike", "document", "pot", "tea",
    "coffee", "wine", "beer", "sugar", "salt", "rice", "meat", "cheese", "orange", "banana",
    "lemon", "grape", "onion", "potato", "tomato", "fan", "gift", "toothbrush", "magnet",
)
DEFAULT_LABELS: tuple[str, ...] = tuple(string.ascii_uppercase)

DEFAULT_TEMPLATE = "the {object} is in Box {label}"
DEFAULT_QUERY = "Box {label} contains the"

#: names of the per-prompt scalar positions every prompt carries (the paper's four)
POSITION_NAMES: tuple[str, ...] = ("last", "query_label", "prev_query_label", "correct_object")
#: per-box scalar roles: ``label_i``, ``object_i``, ``separator_i`` for box ``i``
BOX_ROLES: tuple[str, ...] = ("label", "object", "separator")
#: roles that cover several tokens of every prompt (one or more per box, or template words)
MULTI_ROLES: tuple[str, ...] = ("labels", "objects", "separators", "fillers", "query_words",
                                "prefix")
#: disjoint roles that together cover every token of a prompt (the scan's default rows)
PARTITION_ROLES: tuple[str, ...] = ("prefix", "objects", "labels", "separators", "fillers",
                                    "query_words", "query_label", "last")
#: legacy names of the per-box position matrices (same as ``labels`` / ``objects``)
LEGACY_ALIASES: dict[str, str] = {"box_label": "labels", "box_object": "objects"}
_OFFSET = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*?)(?:([+-])(\d+))?$")


def role_names(n_boxes: int) -> list[str]:
    """Every role name of the schema for prompts with ``n_boxes`` boxes (without offsets)."""
    per_box = [f"{r}_{i}" for i in range(n_boxes) for r in BOX_ROLES]
    return list(POSITION_NAMES) + per_box + list(MULTI_ROLES)


def split_role(name: str) -> tuple[str, int]:
    """``"prev_query_label+1"`` → ``("prev_query_label", 1)``; ``"labels"`` → ``("labels", 0)``."""
    m = _OFFSET.match(name.replace(" ", "")) if isinstance(name, str) else None
    if m is None:
        raise TaskError(f"role {name!r} is not NAME or NAME+K / NAME-K (e.g. prev_query_label+1)")
    base, sign, k = m.groups()
    return base, (0 if sign is None else int(k) * (1 if sign == "+" else -1))


def check_role(name: str, n_boxes: int | None = None) -> str:
    """``name`` if it is a schema role (offset allowed), else a one-line :class:`TaskError`
    listing the defined roles. Without ``n_boxes`` any ``label_i``/``object_i``/``separator_i``
    passes (the box count is checked when a batch resolves the role)."""
    base, _ = split_role(name)
    base = LEGACY_ALIASES.get(base, base)
    box = re.match(r"^(label|object|separator)_(\d+)$", base)
    if base in POSITION_NAMES or base in MULTI_ROLES:
        return name
    if box and (n_boxes is None or int(box.group(2)) < n_boxes):
        return name
    shown = role_names(n_boxes) if n_boxes is not None else \
        list(POSITION_NAMES) + ["label_I", "object_I", "separator_I"] + list(MULTI_ROLES)
    raise TaskError(f"unknown role {name!r}; the task defines: {', '.join(shown)} "
                    f"(any of them with an offset, e.g. prev_query_label+1)")


class TaskError(ValueError):
    """Raised for a task specification that cannot produce valid prompts."""


@dataclass(frozen=True)
class TaskConfig:
    """What prompts look like: number of boxes, vocabularies and wording."""

    n_boxes: int = 7
    objects: tuple[str, ...] = DEFAULT_OBJECTS
    labels: tuple[str, ...] = DEFAULT_LABELS
    segment_template: str = DEFAULT_TEMPLATE
    query_template: str = DEFAULT_QUERY

    def __post_init__(self) -> None:
        if self.n_boxes < 1:
            raise TaskError(f"n_boxes must be >= 1, got {self.n_boxes}")
        for name in ("{object}", "{label}"):
            if name not in self.segment_template:
                raise TaskError(f"segment_template {self.segment_template!r} lacks {name}")
        if "{label}" not in self.query_template:
            raise TaskError(f"query_template {self.query_template!r} lacks {{label}}")
        if len(set(self.labels)) < self.n_boxes:
            raise TaskError(
                f"n_boxes={self.n_boxes} is larger than the label alphabet "
                f"({len(set(self.labels))} distinct labels); use fewer boxes or more labels")
        if len(set(self.objects)) < self.n_boxes:
            raise TaskError(
                f"n_boxes={self.n_boxes} needs at least that many distinct objects, "
                f"got {len(set(self.objects))}")


@dataclass
class Prompt:
    """One entity-tracking prompt, as words; token positions come from :func:`locate`."""

    objects: list[str]
    labels: list[str]
    query_index: int | None  # box being asked about; None when the query label is in no box
    query_label: str
    segment_template: str = DEFAULT_TEMPLATE
    query_template: str = DEFAULT_QUERY

    @property
    def n_boxes(self) -> int:
        return len(self.objects)

    @property
    def answer(self) -> str | None:
        """The correct object word (without leading space), or None if the query matches no box."""
        return None if self.query_index is None else self.objects[self.query_index]

    def rendered(self) -> "Rendered":
        """The prompt's text and the character spans of its words (:func:`render`)."""
        return render(self.objects, self.labels, self.query_label,
                      segment_template=self.segment_template, query_template=self.query_template)

    @property
    def text(self) -> str:
        return self.rendered().text

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Prompt":
        return cls(**d)


@dataclass
class Located:
    """A prompt with its token ids and per-prompt token positions for one tokenizer."""

    prompt: Prompt
    input_ids: list[int]
    positions: dict[str, int]          # POSITION_NAMES -> index (prev/correct = -1 if absent)
    box_label_positions: list[int]
    box_object_positions: list[int]
    object_ids: list[int]              # token id of each box's object
    answer_id: int | None
    roles: dict[str, list[int]] = field(default_factory=dict)  # every schema role -> indices


PLACEHOLDER = re.compile(r"\{(object|label)\}")


@dataclass
class Rendered:
    """A prompt as text plus the character spans of its objects, labels and query label (kept
    instead of re-derived, so variants with other separators or extra text locate the same way)."""

    text: str
    object_spans: list[tuple[int, int]]
    label_spans: list[tuple[int, int]]
    query_span: tuple[int, int]


def render(objects: Sequence[str], labels: Sequence[str], query_label: str, *,
           segment_template: str = DEFAULT_TEMPLATE, query_template: str = DEFAULT_QUERY,
           separator: str = ", ", prefix: str = "", interlude: str = "") -> Rendered:
    """``prefix + separator.join(segments) + ". " + interlude + query``, spans tracked.

    The one renderer of prompt text: with the defaults it is :attr:`Prompt.text` (first segment
    capitalised); DCM's counterfactual variants pass other separators, prefixes and interludes.
    """
    if len(objects) != len(labels):
        raise TaskError(f"{len(objects)} objects but {len(labels)} labels")
    parts: list[str] = [prefix]
    cursor = len(prefix)
    obj_spans, lab_spans = [], []
    for n, (obj, lab) in enumerate(zip(objects, labels)):
        if n:
            parts.append(separator)
            cursor += len(separator)
        pieces = PLACEHOLDER.split(segment_template)  # text, name, text, name, text
        for k, piece in enumerate(pieces):
            if k % 2 == 1:
                word = obj if piece == "object" else lab
                (obj_spans if piece == "object" else lab_spans).append((cursor, cursor + len(word)))
                piece = word
            elif n == 0 and k == 0 and piece:
                piece = piece[:1].upper() + piece[1:]
            parts.append(piece)
            cursor += len(piece)
    head = "".join(parts) + ". " + interlude
    q_start = len(head) + query_template.index("{label}")
    return Rendered(head + query_template.format(label=query_label), obj_spans, lab_spans,
                    (q_start, q_start + len(query_label)))


def token_at(offsets: Sequence[tuple[int, int]], span: tuple[int, int], what: str,
              text: str) -> int:
    """Index of the single token covering ``span``; error if the word spans several tokens."""
    s, e = span
    hits = [i for i, (a, b) in enumerate(offsets) if b > s and a < e and b > a]
    if len(hits) != 1:
        raise TaskError(f"{what} {text[s:e]!r} is not a single token in {text!r} "
                        f"(covered by {len(hits)} tokens)")
    a, b = offsets[hits[0]]
    if b > e or a < s - 1 or (a == s - 1 and text[a] != " "):
        raise TaskError(f"{what} {text[s:e]!r} shares its token with neighbouring text in {text!r}")
    return hits[0]


def encode_text(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` (with the tokenizer's special tokens) and each token's character
    offsets, from a fast tokenizer (positions are computed from offsets, never guessed)."""
    if not getattr(tokenizer, "is_fast", False):
        raise TaskError("circuitdiff needs a fast (Rust-backed) tokenizer to compute token "
                        "positions from offsets; load it with use_fast=True")
    enc = tokenizer(text, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def locate(prompt: Prompt, tokenizer) -> Located:
    """Tokenise ``prompt`` and find every named position from the tokenizer's offsets."""
    return locate_rendered(prompt, prompt.rendered(), prompt.query_index, tokenizer)


def locate_rendered(prompt, rendered: Rendered, query_index: int | None, tokenizer, *,
                    partial_roles: bool = False) -> Located:
    """Token ids and named positions of ``rendered`` text from the tokenizer's offsets; each
    object, label and the query label must be one token. ``prompt`` is kept on the result.
    ``partial_roles``: a text without ``,``/``.`` separators (a DCM variant) gets the scalar
    roles, labels and objects only, instead of an error."""
    text = rendered.text
    ids, offsets = encode_text(tokenizer, text)
    obj_pos = [token_at(offsets, sp, "object", text) for sp in rendered.object_spans]
    lab_pos = [token_at(offsets, sp, "box label", text) for sp in rendered.label_spans]
    q_pos = token_at(offsets, rendered.query_span, "query label", text)
    # the last real token is the one that ends at the end of the text (skip trailing specials)
    last = max(i for i, (a, b) in enumerate(offsets) if b > a)
    qi = query_index
    positions = {
        "last": last,
        "query_label": q_pos,
        "prev_query_label": lab_pos[qi] if qi is not None else -1,
        "correct_object": obj_pos[qi] if qi is not None else -1,
    }
    object_ids = [ids[p] for p in obj_pos]
    try:
        roles = role_indices(text, offsets, positions, lab_pos, obj_pos)
    except TaskError:
        if not partial_roles:
            raise
        roles = {**{k: [v] for k, v in positions.items()}, "labels": lab_pos, "objects": obj_pos}
    return Located(prompt, ids, positions, lab_pos, obj_pos, object_ids,
                   object_ids[qi] if qi is not None else None, roles)


def role_indices(text: str, offsets: Sequence[tuple[int, int]], positions: dict[str, int],
                 lab_pos: list[int], obj_pos: list[int]) -> dict[str, list[int]]:
    """Every schema role of one located prompt, as lists of token indices (scalar roles have
    one entry, or ``[-1]`` when absent from this prompt)."""
    roles = {name: [pos] for name, pos in positions.items()}
    # the separator closing segment i is the token covering the first ',' or '.' after its
    # last word (label or object, whichever the template puts last)
    seps = []
    for lab, obj in zip(lab_pos, obj_pos):
        end = offsets[max(lab, obj)][1]
        cut = min((i for i in (text.find(",", end), text.find(".", end)) if i >= 0), default=-1)
        hit = [i for i, (a, b) in enumerate(offsets) if a <= cut < b] if cut >= 0 else []
        if not hit:
            raise TaskError(f"no ',' or '.' token closes the segment ending at character {end} "
                            f"of {text!r}")
        seps.append(hit[0])
    for i, (lab, obj, sep) in enumerate(zip(lab_pos, obj_pos, seps)):
        roles[f"label_{i}"], roles[f"object_{i}"], roles[f"separator_{i}"] = [lab], [obj], [sep]
    named = set(lab_pos) | set(obj_pos) | set(seps) | {positions["last"], positions["query_label"]}
    real = [i for i, (a, b) in enumerate(offsets) if b > a]
    first_real = real[0]
    roles.update(
        labels=list(lab_pos), objects=list(obj_pos), separators=seps,
        fillers=[i for i in real if i not in named and i < seps[-1]],
        query_words=[i for i in real if i not in named and seps[-1] < i < positions["last"]],
        prefix=[i for i in range(first_real)])
    return roles


def single_token_words(tokenizer, words: Iterable[str], kind: str = "object") -> list[str]:
    """Words that are one token (with their leading space) in the task's own context."""
    keep = []
    for w in dict.fromkeys(words):
        if not w or any(c.isspace() for c in w):
            continue
        probe = f"The {w} is in Box {w}. Box {w} contains the {w}"
        try:
            ids, offs = encode_text(tokenizer, probe)
            spans = [(4, 4 + len(w))]
            i = probe.index(" contains the ") + len(" contains the ")
            spans.append((i, i + len(w)))
            j = probe.index("Box ") + 4
            spans.append((j, j + len(w)))
            toks = {ids[token_at(offs, sp, kind, probe)] for sp in spans}
        except TaskError:
            continue
        # one token, the same in every context, and really the word (not an unknown-word id)
        if len(toks) == 1 and tokenizer.decode(list(toks)).strip() == w:
            keep.append(w)
    return keep


class EntityTrackingTask:
    """Tokenizer-aware generator of entity-tracking prompts and their counterfactuals.

    Objects and labels that are not single tokens for ``tokenizer`` are dropped up front; too few
    left for ``n_boxes`` is an error that names how many survived.
    """

    def __init__(self, tokenizer, config: TaskConfig | None = None, seed: int = 0):
        self.tokenizer = tokenizer
        self.config = config or TaskConfig()
        self.seed = seed
        cfg = self.config
        self.objects = single_token_words(tokenizer, cfg.objects, "object")
        self.labels = single_token_words(tokenizer, cfg.labels, "label")
        if len(self.objects) < max(2 * cfg.n_boxes, cfg.n_boxes + 1):
            raise TaskError(
                f"only {len(self.objects)} of {len(cfg.objects)} objects are single tokens for "
                f"this tokenizer; {2 * cfg.n_boxes} are needed for n_boxes={cfg.n_boxes} "
                f"(counterfactuals need disjoint objects). Pass more objects or fewer boxes.")
        if len(self.labels) < cfg.n_boxes + 1:
            raise TaskError(
                f"only {len(self.labels)} of {len(cfg.labels)} labels are single tokens for this "
                f"tokenizer; n_boxes={cfg.n_boxes} needs {cfg.n_boxes + 1}. Use fewer boxes.")
        self._rng = random.Random(seed)
        self._length: int | None = None

    # -- generation ---------------------------------------------------------------------------
    def _prompt(self, rng: random.Random, objects: list[str] | None = None,
                labels: list[str] | None = None, query_index: int | None = None) -> Prompt:
        n = self.config.n_boxes
        objects = objects or rng.sample(self.objects, n)
        labels = labels or rng.sample(self.labels, n)
        qi = rng.randrange(n) if query_index is None else query_index
        return Prompt(objects, labels, qi, labels[qi], self.config.segment_template,
                      self.config.query_template)

    def sample(self, n: int, seed: int | None = None) -> list[Prompt]:
        """``n`` random prompts (uniform query box). The mean-ablation set is exactly this."""
        rng = random.Random(self.seed if seed is None else seed)
        return [self._prompt(rng) for _ in range(n)]

    def corrupt(self, prompts: Sequence[Prompt], seed: int | None = None) -> list[Prompt]:
        """Path-patching counterfactuals: fresh context, query label replaced by an unused letter.

        The counterfactual has no previous occurrence of its query label; because every prompt
        of the task has the same token layout, its named positions are the clean prompt's.
        """
        rng = random.Random((self.seed if seed is None else seed) + 1)
        out = []
        for _ in prompts:
            p = self._prompt(rng)
            unused = [l for l in self.labels if l not in p.labels]
            p.query_label = rng.choice(unused)
            p.query_index = None
            out.append(p)
        return out

    def dcm_counterfactuals(self, prompts: Sequence[Prompt],
                            seed: int | None = None) -> "DesiderataSet":
        """Counterfactuals whose three DCM targets are three different tokens.

        For base query box i the counterfactual asks about box j != i, its objects are disjoint
        from the base's, and its query label is the base's label of box k (k != i, j). Then
          * object value -> the counterfactual's own answer (its object in box j),
          * position     -> the base object at the counterfactual's query position j,
          * box label    -> the base object in the box carrying the counterfactual's query label (k).
        """
        n = self.config.n_boxes
        if n < 3:
            raise TaskError("DCM desiderata need n_boxes >= 3 so that the three targets differ")
        rng = random.Random((self.seed if seed is None else seed) + 2)
        cfs, value, position, box_label = [], [], [], []
        for p in prompts:
            i = p.query_index
            if i is None:
                raise TaskError("DCM base prompts must have a query that names a box")
            j = rng.choice([x for x in range(n) if x != i])
            k = rng.choice([x for x in range(n) if x not in (i, j)])
            objs = rng.sample([o for o in self.objects if o not in p.objects], n)
            others = [l for l in self.labels if l != p.labels[k]]
            labels = rng.sample(others, n)
            labels[j] = p.labels[k]
            cf = Prompt(objs, labels, j, labels[j], p.segment_template, p.query_template)
            cfs.append(cf)
            value.append(objs[j])
            position.append(p.objects[j])
            box_label.append(p.objects[k])
        return DesiderataSet(list(prompts), cfs,
                             {"object_value": value, "position": position, "box_label": box_label})


def sample_prompts(tokenizer, n: int, n_boxes: int, seed: int) -> list[Prompt]:
    """``n`` task prompts of ``n_boxes`` boxes drawn with ``seed`` for a model with ``tokenizer``:
    the prompts a method measures on when the caller gives none."""
    return EntityTrackingTask(tokenizer, TaskConfig(n_boxes=n_boxes), seed=seed).sample(n)


@dataclass
class TaskSample(Config):
    """The leading settings of a method's config that draws its own prompts when given none:
    ``n_prompts`` prompts of ``n_boxes`` boxes drawn with ``seed`` (:meth:`prompts`). A config
    that subclasses it keeps these three fields first, in this order, as its cache key did."""

    #: prompts drawn
    n_prompts: int = 500
    #: seed of the draw
    seed: int = 0
    #: boxes per prompt
    n_boxes: int = 7

    def prompts(self, tokenizer) -> list[Prompt]:
        """The config's own prompts for a model with ``tokenizer``."""
        return sample_prompts(tokenizer, self.n_prompts, self.n_boxes, self.seed)


@dataclass
class DesiderataSet:
    """Base prompts, their counterfactuals and, per desideratum, the target object word."""

    base: list[Prompt]
    counterfactual: list[Prompt]
    targets: dict[str, list[str]] = field(default_factory=dict)

    def target_ids(self, tokenizer, kind: str) -> list[int]:
        """Token id of each target object, read from where it appears in its own prompt."""
        if kind not in self.targets:
            raise TaskError(f"unknown desideratum {kind!r}; choose from {sorted(self.targets)}")
        out = []
        for b, c, word in zip(self.base, self.counterfactual, self.targets[kind]):
            src = b if word in b.objects else c
            loc = locate(src, tokenizer)
            out.append(loc.object_ids[src.objects.index(word)])
        return out


# -- batches ---------------------------------------------------------------------------------
@dataclass
class Batch:
    """Padded token tensors plus per-sample positions (already shifted for padding)."""

    input_ids: torch.Tensor        # [B, T]
    attention_mask: torch.Tensor   # [B, T]
    position_ids: torch.Tensor     # [B, T]
    positions: dict[str, torch.Tensor]  # role -> [B] (scalar roles) or [B, P] (multi roles)
    answer_ids: torch.Tensor       # [B] (-1 where the prompt has no answer)
    object_ids: torch.Tensor       # [B, n_boxes] (-1 pads prompts with fewer boxes)

    def role_names(self) -> list[str]:
        """The schema roles these prompts define (multi roles covering no token left out)."""
        return [n for n, t in self.positions.items()
                if n not in LEGACY_ALIASES and t.numel() > 0 and bool((t >= 0).any())]

    def role(self, name: str) -> torch.Tensor:
        """Token indices of role ``name`` (offset allowed: ``prev_query_label+1``): ``[B]`` for a
        scalar role, ``[B, P]`` for a multi role (``-1`` pads rows with fewer tokens, and marks a
        scalar role absent from a prompt). Unknown roles and offsets that leave a prompt raise a
        :class:`TaskError` naming the defined roles."""
        base, k = split_role(name)
        if base not in self.positions or base not in self.role_names() and base not in \
                LEGACY_ALIASES:
            if base in self.positions:
                raise TaskError(f"role {name!r} covers no token of these prompts; defined: "
                                f"{', '.join(self.role_names())}")
            check_role(name, self.object_ids.shape[1])  # raises with the role list if unknown
            raise TaskError(f"role {name!r} is not defined for these prompts; defined: "
                            f"{', '.join(self.role_names())}")
        pos = self.positions[base]
        if k == 0:
            return pos
        shifted = pos + k
        present = pos >= 0
        T = self.input_ids.shape[1]
        inside = (shifted >= 0) & (shifted < T)
        rows = torch.arange(len(pos)).view(-1, *([1] * (pos.dim() - 1))).expand_as(pos)
        real = torch.zeros_like(present)
        real[inside] = self.attention_mask[rows[inside], shifted[inside]].bool()
        if bool((present & ~real).any()):
            raise TaskError(f"role {name!r} leaves the prompt: {base} shifted by {k:+d} falls "
                            f"outside some prompts' tokens")
        return torch.where(present, shifted, pos)

    def role_index(self, name: str) -> torch.Tensor:
        """``[B, P]`` token indices of role ``name`` in each prompt (``P = 1`` for a scalar
        role), every entry a real token: the form an intervention's ``at`` takes. A role absent
        from some prompt, or covering fewer tokens in some, raises a :class:`TaskError`."""
        p = self.role(name)
        p = p[:, None] if p.dim() == 1 else p
        if bool((p < 0).any()):
            raise TaskError(f"position {name!r} is absent from some prompts (or covers a "
                            f"different number of tokens in some); use prompts whose query names "
                            f"a box")
        return p

    def model_inputs(self, device=None) -> dict[str, torch.Tensor]:
        """The model's keyword inputs (ids, attention mask, position ids), on ``device``."""
        d = {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
             "position_ids": self.position_ids}
        return d if device is None else {k: v.to(device) for k, v in d.items()}

    def _map(self, fn) -> "Batch":
        return Batch(fn(self.input_ids), fn(self.attention_mask), fn(self.position_ids),
                     {k: fn(v) for k, v in self.positions.items()}, fn(self.answer_ids),
                     fn(self.object_ids))

    def to(self, device) -> "Batch":
        return self._map(lambda t: t.to(device))

    def repeat(self, k: int) -> "Batch":
        """The batch stacked ``k`` times (variant-major: row ``i*B + b`` is copy i, sample b);
        how ablation variants share one forward."""
        return self._map(lambda t: t.repeat(k, *([1] * (t.dim() - 1))))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def make_batch(located: Sequence[Located], pad_id: int, padding_side: str = "left") -> Batch:
    """Pad located prompts into one batch; positions are moved with the padding."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    T = max(len(l.input_ids) for l in located)
    B = len(located)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    shift = torch.zeros(B, dtype=torch.long)
    for b, l in enumerate(located):
        n = len(l.input_ids)
        off = T - n if padding_side == "left" else 0
        ids[b, off:off + n] = torch.tensor(l.input_ids)
        mask[b, off:off + n] = 1
        shift[b] = off
    pos_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    n_box = max(len(l.object_ids) for l in located)

    def padded(rows: list[list[int]], width: int) -> torch.Tensor:
        return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long
                            ).view(len(rows), width)

    positions = {}
    names = list(dict.fromkeys(n for l in located for n in l.roles))
    for name in names:
        rows = [l.roles.get(name, [-1]) for l in located]
        if name in MULTI_ROLES:
            raw = padded(rows, max(len(r) for r in rows))
            positions[name] = torch.where(raw >= 0, raw + shift[:, None], raw)
        else:
            raw = torch.tensor([r[0] for r in rows])
            positions[name] = torch.where(raw >= 0, raw + shift, raw)
    for legacy, name in LEGACY_ALIASES.items():
        positions[legacy] = positions[name]
    answers = torch.tensor([-1 if l.answer_id is None else l.answer_id for l in located])
    objects = padded([l.object_ids for l in located], n_box)
    return Batch(ids, mask, pos_ids, positions, answers, objects)


def pad_token_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad, else eos, else 0 (masked out anyway)."""
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0


def encode(prompts: Sequence[Prompt], tokenizer, padding_side: str = "left") -> Batch:
    """Locate every prompt and pad them into a :class:`Batch`."""
    return make_batch([locate(p, tokenizer) for p in prompts], pad_token_id(tokenizer), padding_side)


def batches(prompts: Sequence[Prompt], tokenizer, batch_size: int) -> list[Batch]:
    """Encode ``prompts`` in left-padded chunks of ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [encode(prompts[i:i + batch_size], tokenizer)
            for i in range(0, len(prompts), batch_size)]


def encode_pair(clean: Sequence[Prompt], counterfactual: Sequence[Prompt], tokenizer,
                padding_side: str = "left") -> tuple[Batch, Batch]:
    """Encode a clean set and its counterfactuals, checking they align token by token.

    The counterfactual batch takes the clean batch's named positions where it lacks the token
    (e.g. no previous occurrence of its query label): all prompts of one task share a layout.
    """
    if len(clean) != len(counterfactual):
        raise TaskError(f"counterfactual set has {len(counterfactual)} prompts but the clean set "
                        f"has {len(clean)}; they must pair one to one")
    lc = [locate(p, tokenizer) for p in clean]
    lx = [locate(p, tokenizer) for p in counterfactual]
    for i, (a, b) in enumerate(zip(lc, lx)):
        if len(a.input_ids) != len(b.input_ids):
            raise TaskError(f"prompt {i}: clean and counterfactual tokenise to different lengths "
                            f"({len(a.input_ids)} vs {len(b.input_ids)}); they must share a layout")
    pad = pad_token_id(tokenizer)
    bc = make_batch(lc, pad, padding_side)
    bx = make_batch(lx, pad, padding_side)
    for name, t in bx.positions.items():
        if name in bc.positions and t.shape == bc.positions[name].shape:
            bx.positions[name] = torch.where(t >= 0, t, bc.positions[name])
    return bc, bx


# -- persistence -----------------------------------------------------------------------------
def save_jsonl(path: str | Path, prompts: Sequence[Prompt],
               extra: dict[str, Sequence] | None = None) -> None:
    """Write prompts (plus optional per-prompt columns) as JSON lines, atomically."""
    rows = []
    for i, p in enumerate(prompts):
        row = p.to_dict()
        for k, col in (extra or {}).items():
            row[k] = col[i]
        rows.append(json.dumps(row) + "\n")
    atomic_write_text(path, "".join(rows))


def load_jsonl(path: str | Path) -> tuple[list[Prompt], dict[str, list]]:
    """Read prompts written by :func:`save_jsonl`; returns prompts and the extra columns."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} does not exist")
    prompts, extra = [], {}
    keys = set(Prompt.__dataclass_fields__)
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompts.append(Prompt.from_dict({k: v for k, v in row.items() if k in keys}))
            except (json.JSONDecodeError, TypeError) as e:
                raise TaskError(f"{path}:{n}: not a circuitdiff prompt ({e})") from None
            for k, v in row.items():
                if k not in keys:
                    extra.setdefault(k, []).append(v)
    return prompts, extra
