"""CMAP, cross-model activation patching: which parts of a circuit carry a fine-tune's gain.

A *source* model's activations are patched into a *target* model on the same prompts and the
target's accuracy is measured. The paper's direction is fine-tune → base (does the fine-tune's
version of a circuit group make the base as good as the fine-tune?); the reverse, base →
fine-tune, asks whether the base's version of the group removes the fine-tune's gain.

* **Output CMAP** — head outputs (the input of ``o_proj``) of a set of heads at named positions
  are replaced by the source's; the target's own ``o_proj`` (with any LoRA delta) then applies.
  Per circuit group (at the group's position), cumulative in chain order, the whole circuit, and
  a control: random heads of the same per-group sizes at the same positions (seeded draws without
  replacement, :func:`~circuitdiff.methods.faithfulness.random_circuits`).
* **Input CMAP** — the q, k or v projection outputs (and QK, QKV) of a group's heads are the
  source's: q at the group's position, k/v at every key position up to it. Under GQA a k/v head is
  shared by several query heads, so in each patched layer every head output the k/v patch touches
  other than the group's heads at the group's position is restored to the target's clean value:
  the only direct change is the group's outputs at its position.
* **Per-head map** — output CMAP of every single head at a position: ``[layers, heads]``.
* **Metric** — accuracy (argmax over the vocabulary at *last*, :mod:`circuitdiff.core.metrics`)
  and the share of the gap recovered ``(acc_patched − acc_target) / (acc_source − acc_target)``
  with a paired bootstrap interval over prompts; the share is ``None`` ("undefined") when the gap
  is 0 — never a division by zero.

Memory: a LoRA fine-tune is one set of weights — the fine-tune is the model with its adapter
enabled, the base the same model inside ``adapter_disabled()``. For a full fine-tune only one
model is loaded at a time: the source's activations at the needed positions are recorded to the
run folder (``cmap/record/...``), the source is freed, then the target is loaded and patched.
Every recording and every direction's result is cached in the run folder, so a rerun resumes.
All edits are :class:`~circuitdiff.core.interventions.Write` edits with index tensors and
``where`` masks; many output-CMAP variants run in one forward, stacked along the batch.
"""

from __future__ import annotations

import contextlib
import gc
import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from ..core.arch import Architecture, ArchitectureError
from ..core.circuit import Circuit, Head
from ..core.interventions import Read, Write
from ..core.metrics import correct, last_logits
from ..core.model import LoadedModel, ModelSpecError
from ..core.runs import RunFolder, atomic_write_text, model_tag, settings_digest
from ..core.task import Batch, EntityTrackingTask, Prompt, TaskConfig, batches
from .evaluation import same_tokenizer
from .faithfulness import random_circuits
from ..core.stats import interval, resample_indices

#: input-CMAP component sets, in the paper's order
COMPONENTS: tuple[str, ...] = ("q", "k", "v", "qk", "qkv")
#: a position name CMAP accepts besides the task's named positions: every token of the prompt
ALL_POSITIONS = "all"
#: direction names
FORWARD, REVERSE = "finetuned->base", "base->finetuned"

ModelRef = LoadedModel | str


class CMAPError(ValueError):
    """Raised for a (base, fine-tune, circuit) combination CMAP cannot compare."""


# -- configuration ------------------------------------------------------------------------------
@dataclass
class CMAPConfig:
    """Everything that decides CMAP's numbers (``key()`` is the cache key).

    ``n_prompts``/``seed``/``n_boxes`` make the prompts (:func:`cmap_prompts`); ``random_draws``
    random circuits of the circuit's group sizes (seed ``random_seed``) are the control;
    ``bootstrap`` resamples of the prompts (seed ``bootstrap_seed``) give the ``confidence``
    interval. ``per_head`` adds the per-head map at ``per_head_positions`` (default: the positions
    of the circuit's non-empty groups); ``input`` adds input CMAP of every non-empty group;
    ``reverse`` adds the base → fine-tune direction.
    """

    n_prompts: int = 500
    seed: int = 0
    n_boxes: int = 7
    random_draws: int = 10
    random_seed: int = 0
    bootstrap: int = 1000
    bootstrap_seed: int = 0
    confidence: float = 0.95
    per_head: bool = False
    per_head_positions: tuple[str, ...] | None = None
    input: bool = False
    reverse: bool = False
    batch_size: int = 32
    max_rows: int = 256

    def __post_init__(self) -> None:
        for name in ("n_prompts", "batch_size", "max_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("random_draws", "bootstrap"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.per_head_positions is not None:
            self.per_head_positions = tuple(self.per_head_positions)

    def key(self) -> dict:
        d = asdict(self)
        d.pop("batch_size")
        d.pop("max_rows")
        return d


def cmap_prompts(tokenizer, cfg: CMAPConfig) -> list[Prompt]:
    """The evaluation prompts of ``cfg`` (``n_prompts`` from ``seed``, ``n_boxes`` boxes)."""
    return EntityTrackingTask(tokenizer, TaskConfig(n_boxes=cfg.n_boxes), seed=cfg.seed).sample(
        cfg.n_prompts)


# -- what one variant patches ---------------------------------------------------------------------
@dataclass(frozen=True)
class OutputPatch:
    """Head outputs to take from the source: position name -> heads patched there."""

    heads: tuple[tuple[str, tuple[Head, ...]], ...]

    @classmethod
    def of(cls, by_position: dict[str, Sequence[Head]]) -> "OutputPatch":
        merged: dict[str, list[Head]] = {}
        for pos, hs in by_position.items():
            merged.setdefault(pos, [])
            merged[pos] += [tuple(h) for h in hs if tuple(h) not in merged[pos]]
        return cls(tuple((p, tuple(sorted(hs))) for p, hs in sorted(merged.items()) if hs))

    @property
    def n_heads(self) -> int:
        return len({h for _, hs in self.heads for h in hs})


@dataclass(frozen=True)
class InputPatch:
    """q/k/v (``components``, a subset of ``"qkv"``) of ``heads`` read at ``position``."""

    heads: tuple[Head, ...]
    position: str
    components: str

    def __post_init__(self) -> None:
        if not self.components or set(self.components) - set("qkv"):
            raise CMAPError(f"input components must be letters of 'qkv', got {self.components!r}")

    @property
    def layers(self) -> list[int]:
        return sorted({l for l, _ in self.heads})


def _union(circuit: Circuit, names: Sequence[str]) -> OutputPatch:
    by: dict[str, list[Head]] = {}
    for n in names:
        g = circuit.groups[n]
        by.setdefault(g.position, []).extend(g.heads)
    return OutputPatch.of(by)


# -- models: adapter toggling or one model at a time ------------------------------------------------
@dataclass
class Endpoint:
    """One side of the comparison: a model, and for a LoRA model whether its adapter is on."""

    label: str
    ref: ModelRef
    adapter: bool | None = None  # None: plain model; True/False: adapter enabled/disabled

    @property
    def name(self) -> str:
        if self.adapter is None:
            return self.label
        return f"{self.label}[adapter {'on' if self.adapter else 'off'}]"


@dataclass(frozen=True)
class _Shape:
    """What two compared models must share (kept without holding the first model alive)."""

    name: str
    grid: tuple[int, int, int, int]
    tokenizer: object


class _Models:
    """Hands out loaded models, holding at most one loaded-from-spec model at a time; every
    model it hands out is checked against the first (same head grid, same tokenizer)."""

    def __init__(self, load: Callable[[str], LoadedModel]):
        self.load = load
        self.spec: str | None = None
        self.loaded: LoadedModel | None = None
        self.reference: _Shape | None = None

    def get(self, ref: ModelRef) -> LoadedModel:
        if isinstance(ref, LoadedModel):
            self._check(ref)
            return ref
        if ref != self.spec:
            self.free()
            loaded = self.load(ref)
            self._check(loaded)
            self.loaded, self.spec = loaded, ref
        return self.loaded

    def _check(self, loaded: LoadedModel) -> None:
        a = loaded.arch
        shape = _Shape(loaded.name, _grid(a) + (a.head_dim,), loaded.tokenizer)
        if self.reference is None:
            self.reference = shape
            return
        ref = self.reference
        if ref.grid != shape.grid:
            raise ArchitectureError(
                f"{ref.name} and {loaded.name} have different head grids (layers, heads, kv heads, "
                f"head_dim: {ref.grid} vs {shape.grid}): CMAP needs a fine-tune of the same "
                f"architecture as its base")
        if not same_tokenizer(ref.tokenizer, shape.tokenizer):
            raise CMAPError(f"{ref.name} and {loaded.name} have different tokenizers: the same "
                            f"prompts would be different token ids; CMAP needs a fine-tune with "
                            f"its base's tokenizer")

    def free(self) -> None:
        self.loaded, self.spec = None, None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def running(self, ep: Endpoint) -> Iterator[LoadedModel]:
        loaded = self.get(ep.ref)
        if ep.adapter is False:
            with loaded.adapter_disabled():
                yield loaded
        else:
            yield loaded


def has_adapter(loaded: LoadedModel) -> bool:
    """True when ``loaded`` carries an un-merged peft adapter (it can run as its own base)."""
    return getattr(loaded.model, "peft_config", None) is not None and \
        callable(getattr(loaded.model, "disable_adapter", None))


# -- positions ---------------------------------------------------------------------------------
def position_index(batch: Batch, name: str) -> torch.Tensor:
    """``[B, k]`` token indices of ``name`` in each prompt (``all``: every token, ``k = T``)."""
    if name == ALL_POSITIONS:
        B, T = batch.input_ids.shape
        return torch.arange(T).expand(B, T)
    if name not in batch.positions:
        raise CMAPError(f"position {name!r} is not a named position of the task "
                        f"({', '.join(sorted(batch.positions))}, or {ALL_POSITIONS!r})")
    p = batch.positions[name]
    p = p[:, None] if p.dim() == 1 else p
    if bool((p < 0).any()):
        raise CMAPError(f"position {name!r} is absent from some prompts (use prompts whose query "
                        f"names a box)")
    return p


def _slots(batch: Batch, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked token indices ``[B, S]`` of ``names`` and, per slot, the index of its name."""
    idx = [position_index(batch, n) for n in names]
    owner = torch.cat([torch.full((t.shape[1],), i) for i, t in enumerate(idx)])
    return torch.cat(idx, 1), owner


def _key_positions(batch: Batch, name: str) -> torch.Tensor:
    """``[B, P]``: every token index up to the latest ``name`` position of the batch (k/v sites)."""
    upto = int(position_index(batch, name).max())
    return torch.arange(upto + 1).expand(len(batch), upto + 1)


# -- the plan: which activations to record and which variants to run -------------------------------
@dataclass
class _Plan:
    output: list[OutputPatch]
    inputs: list[InputPatch]
    arch: tuple[int, int, int]  # layers, heads, kv heads

    def __post_init__(self) -> None:
        self.slot_names = sorted({p for v in self.output for p, _ in v.heads})
        L, H, _ = self.arch
        masks = torch.zeros(len(self.output), max(1, len(self.slot_names)), L, H, dtype=torch.bool)
        for i, v in enumerate(self.output):
            for pos, hs in v.heads:
                for l, h in hs:
                    masks[i, self.slot_names.index(pos), l, h] = True
        self.masks = masks  # [V, names, L, H]
        self.layers = [l for l in range(L) if bool(masks[:, :, l].any())]
        self.input_layers = sorted({l for ip in self.inputs for l in ip.layers})
        # q/k/v to record, once per (position, component) however many variants share them:
        # every unit of the layer, so any subset of heads can be patched from one recording
        sites: dict[tuple[str, str], set[int]] = {}
        for ip in self.inputs:
            for c in ip.components:
                sites.setdefault((ip.position, c), set()).update(ip.layers)
        self.input_sites = {k: sorted(v) for k, v in sorted(sites.items())}

    def describe(self) -> dict:
        return {"slots": self.slot_names, "layers": self.layers,
                "input_sites": [[p, c, ls] for (p, c), ls in self.input_sites.items()]}


def _kv_mask(arch: Architecture, heads: Sequence[Head], layer: int) -> torch.Tensor:
    m = torch.zeros(arch.n_kv_heads, dtype=torch.bool)
    for l, h in heads:
        if l == layer:
            m[arch.kv_head_of(h)] = True
    return m


def _q_mask(arch: Architecture, heads: Sequence[Head], layer: int) -> torch.Tensor:
    m = torch.zeros(arch.n_heads, dtype=torch.bool)
    for l, h in heads:
        if l == layer:
            m[h] = True
    return m


# -- recording the source ------------------------------------------------------------------------
@torch.no_grad()
def _record_batch(loaded: LoadedModel, batch: Batch, plan: _Plan) -> dict[str, torch.Tensor]:
    """The source's activations a batch needs, its correctness and a logits fingerprint."""
    edits: list = []
    head_read = None
    if plan.layers:
        slots, _ = _slots(batch, plan.slot_names)
        head_read = Read(plan.layers, slots, "head")
        edits.append(head_read)
    input_reads = {}
    for (pos, c), layers in plan.input_sites.items():
        at = position_index(batch, pos) if c == "q" else _key_positions(batch, pos)
        input_reads[pos, c] = Read(layers, at, c)
    edits += input_reads.values()
    logits = last_logits(loaded, batch, edits)
    out = {"hits": correct(logits, batch).to(torch.uint8).cpu(),
           "fingerprint": _fingerprint(logits).cpu()}
    if head_read is not None:
        for l, t in head_read.out.items():
            out[f"head.{l}"] = t.cpu()
    for (pos, c), r in input_reads.items():
        for l, t in r.out.items():
            out[_input_key(pos, c, l)] = t.cpu()
    return out


def _input_key(position: str, component: str, layer: int) -> str:
    return f"input.{position}.{component}.{layer}"


def _fingerprint(logits: torch.Tensor) -> torch.Tensor:
    """A cheap summary of each row's logits (logsumexp and the first 32): equal for equal models."""
    lf = logits.float()
    return torch.cat([lf.logsumexp(-1, keepdim=True), lf[:, :32]], -1)


def _record(models: _Models, ep: Endpoint, batch_list: Sequence[Batch], plan: _Plan,
            folder: RunFolder | None, settings: dict, progress: bool) -> list[dict[str, torch.Tensor]]:
    """Record ``ep``'s activations for every batch, cached in ``folder`` (one safetensors file)."""
    def compute() -> dict[str, torch.Tensor]:
        from tqdm.auto import tqdm

        flat = {}
        with models.running(ep) as loaded:
            for i, b in enumerate(tqdm(batch_list, desc=f"record {ep.name}", disable=not progress,
                                       unit="batch")):
                for k, t in _record_batch(loaded, b, plan).items():
                    flat[f"b{i}.{k}"] = t
        return flat

    if folder is None:
        flat = compute()
    else:
        name = f"cmap/record/{model_tag(ep.name)}-{settings_digest(settings, 10)}.safetensors"
        flat = folder.cached_tensors(name, settings, compute)
    per: list[dict[str, torch.Tensor]] = [{} for _ in batch_list]
    for k, t in flat.items():
        i, rest = k.split(".", 1)
        per[int(i[1:])][rest] = t
    return per


# -- patching the target -------------------------------------------------------------------------
def output_edits(rec: dict[str, torch.Tensor], batch: Batch, plan: _Plan,
                 variants: torch.Tensor) -> list[Write]:
    """Writes patching the recorded head outputs into ``len(variants)`` stacked copies of
    ``batch`` (variant-major rows, as :meth:`Batch.repeat`); ``variants`` indexes ``plan.output``.

    When two named slots are the same token of a sample (``all`` plus ``last``...), their
    ``where`` masks are OR-ed so the scattered values never conflict.
    """
    if not plan.layers:
        return []
    slots, owner = _slots(batch, plan.slot_names)
    k, B = len(variants), len(batch)
    same = (slots[:, :, None] == slots[:, None, :]).float()          # [B, S, S]
    m = plan.masks[variants][:, owner]                                # [k, S, L, H]
    edits = []
    for l in plan.layers:
        ml = m[:, :, l]                                               # [k, S, H]
        if not bool(ml.any()):
            continue
        where = (same[None] @ ml[:, None].float().expand(k, B, *ml.shape[1:])) > 0  # [k,B,S,H]
        vals = rec[f"head.{l}"]
        edits.append(Write(l, vals.repeat(k, *([1] * (vals.dim() - 1))), slots.repeat(k, 1),
                           where.reshape(k * B, *where.shape[2:]), "head"))
    return edits


def input_edits(rec: dict[str, torch.Tensor], clean_heads: dict[int, torch.Tensor], batch: Batch,
                arch: Architecture, ip: InputPatch) -> list[Write]:
    """Writes for one input-CMAP variant: the source's q/k/v of ``ip``'s heads, plus, in layers
    whose k/v is patched, every other head output the patch touches restored to the target's
    clean value (``clean_heads[layer]`` ``[B, T, H, D]``, from an unpatched forward).

    Heads the patch does not touch run live. When a group spans several layers, the restored
    outputs of its later layers are the clean ones, so they do not follow what the earlier
    layers' patch changed upstream (exact when all the group's heads are in one layer)."""
    pos = position_index(batch, ip.position)
    keys = _key_positions(batch, ip.position)
    B, T = batch.input_ids.shape
    edits = []
    for l in ip.layers:
        qm, kvm = _q_mask(arch, ip.heads, l), _kv_mask(arch, ip.heads, l)
        for c in ip.components:
            where, at = (qm, pos) if c == "q" else (kvm, keys)
            edits.append(Write(l, rec[_input_key(ip.position, c, l)], at, where[None, None], c))
        if set(ip.components) & {"k", "v"}:
            touched = kvm[torch.arange(arch.n_heads) // arch.n_groups]            # [H]
            target = torch.zeros(B, T, dtype=torch.bool)
            target[torch.arange(B)[:, None], pos] = True
            keep_patched = target[:, :, None] & qm[None, None]                   # [B, T, H]
            restore = touched[None, None].expand(B, T, -1) & ~keep_patched
            edits.append(Write(l, clean_heads[l], None, restore, "head"))
    return edits


@torch.no_grad()
def _patch(models: _Models, ep: Endpoint, batch_list: Sequence[Batch], plan: _Plan,
           recorded: Sequence[dict[str, torch.Tensor]], max_rows: int, progress: bool
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Run the target ``ep`` clean and with every variant patched in.

    Returns per-prompt correctness of the clean target ``[N]``, of the output variants
    ``[V, N]`` and of the input variants ``[I, N]``, and whether the target's logits equal the
    source's on every prompt (same weights).
    """
    from tqdm.auto import tqdm

    V, I = len(plan.output), len(plan.inputs)
    clean_hits, out_hits, in_hits = [], [], []
    identical = True
    with models.running(ep) as loaded:
        arch = loaded.arch
        for b, rec in tqdm(list(zip(batch_list, recorded)), desc=f"patch {ep.name}",
                           disable=not progress, unit="batch"):
            B = len(b)
            clean_read = Read(plan.input_layers, None, "head") if plan.input_layers else None
            logits = last_logits(loaded, b, [clean_read] if clean_read else [])
            clean_hits.append(correct(logits, b).cpu())
            identical &= bool(torch.allclose(_fingerprint(logits).cpu(), rec["fingerprint"],
                                             rtol=0, atol=1e-6))
            rows = torch.zeros(V, B, dtype=torch.bool)
            per = max(1, max_rows // B)
            for s in range(0, V, per):
                idx = torch.arange(s, min(V, s + per))
                big = b.repeat(len(idx))
                lg = last_logits(loaded, big, output_edits(rec, b, plan, idx))
                rows[idx] = correct(lg, big).cpu().view(len(idx), B)
            out_hits.append(rows)
            rows = torch.zeros(I, B, dtype=torch.bool)
            for i, ip in enumerate(plan.inputs):
                clean = clean_read.out if clean_read else {}
                lg = last_logits(loaded, b, input_edits(rec, clean, b, arch, ip))
                rows[i] = correct(lg, b).cpu()
            in_hits.append(rows)
    return (torch.cat(clean_hits), torch.cat(out_hits, 1), torch.cat(in_hits, 1), identical)


def patched_logits(source: Endpoint, target: Endpoint, prompts: Sequence[Prompt],
                   patch: OutputPatch | InputPatch, load: Callable[[str], LoadedModel] | None = None,
                   batch_size: int = 32) -> torch.Tensor:
    """Logits ``[N, vocab]`` at *last* of ``target`` with ``patch`` taken from ``source`` (no
    caching; the exact computation every CMAP number is made of, exposed for checks)."""
    models = _Models(load or _default_load)
    plan = _Plan([patch] if isinstance(patch, OutputPatch) else [],
                 [patch] if isinstance(patch, InputPatch) else [], _grid(models.get(target.ref).arch))
    tok = models.get(target.ref).tokenizer
    batch_list = batches(list(prompts), tok, batch_size)
    recorded = [_record_batch_with(models, source, b, plan) for b in batch_list]
    out = []
    with torch.no_grad(), models.running(target) as loaded:
        for b, rec in zip(batch_list, recorded):
            if isinstance(patch, OutputPatch):
                edits = output_edits(rec, b, plan, torch.arange(1))
            else:
                read = Read(patch.layers, None, "head")
                last_logits(loaded, b, [read])
                edits = input_edits(rec, read.out, b, loaded.arch, patch)
            out.append(last_logits(loaded, b, edits).cpu())
    return torch.cat(out)


def _record_batch_with(models: _Models, ep: Endpoint, batch: Batch, plan: _Plan):
    with models.running(ep) as loaded:
        return _record_batch(loaded, batch, plan)


def _default_load(spec: str) -> LoadedModel:
    from ..core.model import load_model

    return load_model(spec)


def _grid(arch: Architecture) -> tuple[int, int, int]:
    return arch.n_layers, arch.n_heads, arch.n_kv_heads


# -- metric --------------------------------------------------------------------------------------
def gap_share(patched: float, target: float, source: float) -> float | None:
    """``(patched − target) / (source − target)``; ``None`` (undefined) when source == target."""
    gap = source - target
    return None if gap == 0 else (patched - target) / gap + 0.0  # + 0.0: no "-0.0"


class _Bootstrap:
    """Paired bootstrap over prompts: the same resamples for source, target and every variant."""

    def __init__(self, n: int, resamples: int, seed: int, confidence: float,
                 source_hits: torch.Tensor, target_hits: torch.Tensor):
        self.idx = resample_indices(n, resamples, seed)
        self.confidence = confidence
        if self.idx is not None:
            self.src = source_hits.double()[self.idx].mean(1)
            self.tgt = target_hits.double()[self.idx].mean(1)

    def gap_ci(self) -> list[float] | None:
        """Interval of ``acc_source − acc_target`` itself: a gap whose interval holds 0 makes
        every share a ratio of noise."""
        return None if self.idx is None else interval(self.src - self.tgt, self.confidence)

    def accuracy_ci(self, hits: torch.Tensor) -> list[float] | None:
        if self.idx is None:
            return None
        return interval(hits.double()[self.idx].mean(1), self.confidence)

    def share_ci(self, hits: torch.Tensor) -> tuple[list[float] | None, int]:
        """Interval of the share over resamples where the gap is non-zero, and their count."""
        if self.idx is None:
            return None, 0
        p = hits.double()[self.idx].mean(1)
        gap = self.src - self.tgt
        ok = gap != 0
        return interval((p[ok] - self.tgt[ok]) / gap[ok], self.confidence), int(ok.sum())


# -- results -------------------------------------------------------------------------------------
@dataclass
class CMAPRow:
    """One patched set: a group, a cumulative prefix of groups, the circuit, or an input patch.

    ``share`` is ``None`` when the gap is 0; ``share_ci`` is the bootstrap interval over
    resamples with a non-zero gap (``share_resamples`` of them). ``random_*`` is the control:
    the same groups of each random circuit (empty for input rows). An empty group has
    ``empty=True`` and no numbers.
    """

    kind: str                  # "group" | "cumulative" | "circuit" | "input"
    name: str
    groups: list[str]
    n_heads: int
    accuracy: float | None
    accuracy_ci: list[float] | None = None
    share: float | None = None
    share_ci: list[float] | None = None
    share_resamples: int = 0
    component: str | None = None
    random: list[float] = field(default_factory=list)
    random_mean: float | None = None
    random_sd: float | None = None
    random_share: float | None = None
    empty: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DirectionResult:
    """CMAP from ``source`` into ``target``: clean accuracies, rows, per-head maps."""

    direction: str
    source: str
    target: str
    source_accuracy: float
    target_accuracy: float
    n: int
    rows: list[CMAPRow]
    per_head: dict[str, dict] = field(default_factory=dict)  # position -> accuracy/share maps
    identical: bool = False
    seconds: float = 0.0
    gap_ci: list[float] | None = None

    @property
    def gap(self) -> float:
        return self.source_accuracy - self.target_accuracy

    @property
    def gap_uncertain(self) -> bool:
        """True when the gap's bootstrap interval contains 0 (shares are then unreliable)."""
        return self.gap_ci is not None and self.gap_ci[0] <= 0 <= self.gap_ci[1]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gap"] = self.gap
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DirectionResult":
        d = {k: v for k, v in d.items() if k != "gap"}
        d["rows"] = [CMAPRow(**r) for r in d["rows"]]
        return cls(**d)


@dataclass
class CMAPResult:
    """CMAP of one (base, fine-tune) pair on one circuit: one :class:`DirectionResult` per
    direction (fine-tune → base first), plus any warnings (e.g. identical models)."""

    base: str
    finetuned: str
    circuit: dict
    config: dict
    directions: list[DirectionResult]
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def n(self) -> int:
        return self.directions[0].n if self.directions else 0

    def direction(self, name: str) -> DirectionResult:
        for d in self.directions:
            if d.direction == name:
                return d
        raise KeyError(f"no direction {name!r}; have {[d.direction for d in self.directions]}")

    def to_dict(self) -> dict:
        return {"base": self.base, "finetuned": self.finetuned, "circuit": self.circuit,
                "config": self.config, "n": self.n,
                "directions": [d.to_dict() for d in self.directions],
                "warnings": self.warnings, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict) -> "CMAPResult":
        return cls(d["base"], d["finetuned"], d["circuit"], d["config"],
                   [DirectionResult.from_dict(x) for x in d["directions"]],
                   d.get("warnings", []), d.get("seconds", 0.0))

    def save(self, path: str | Path) -> Path:
        """Write the result as JSON, atomically."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2))


# -- the rows of one direction ----------------------------------------------------------------------
@dataclass
class _RowSpec:
    kind: str
    name: str
    groups: list[str]
    patch: OutputPatch | InputPatch | None
    random: list[OutputPatch] = field(default_factory=list)
    component: str | None = None


def _row_specs(circuit: Circuit, cfg: CMAPConfig) -> list[_RowSpec]:
    draws = random_circuits(circuit, cfg.random_draws, cfg.random_seed)
    nonempty = [n for n, g in circuit.groups.items() if g.heads]
    specs = []

    def output_row(kind: str, name: str, groups: list[str]) -> _RowSpec:
        return _RowSpec(kind, name, groups, _union(circuit, groups),
                        [_union(d, groups) for d in draws])

    for name, g in circuit.groups.items():
        specs.append(output_row("group", name, [name]) if g.heads
                     else _RowSpec("group", name, [name], None))
    for k in range(2, len(nonempty) + 1):  # prefix 1 is the first group's own row
        specs.append(output_row("cumulative", "+".join(nonempty[:k]), nonempty[:k]))
    if nonempty:
        specs.append(output_row("circuit", "circuit", list(circuit.groups)))
    if cfg.input:
        for name in nonempty:
            g = circuit.groups[name]
            for comp in COMPONENTS:
                specs.append(_RowSpec("input", f"{name}:{comp.upper()}", [name],
                                      InputPatch(tuple(g.heads), g.position, comp), [], comp))
    return specs


def _per_head_patches(circuit: Circuit, cfg: CMAPConfig) -> list[tuple[str, Head, OutputPatch]]:
    if not cfg.per_head:
        return []
    positions = cfg.per_head_positions or tuple(
        dict.fromkeys(g.position for g in circuit.groups.values() if g.heads)) or ("last",)
    return [(p, (l, h), OutputPatch.of({p: [(l, h)]})) for p in positions
            for l in range(circuit.n_layers) for h in range(circuit.n_heads)]


def _direction(models: _Models, source: Endpoint, target: Endpoint, direction: str,
               batch_list: Sequence[Batch], circuit: Circuit, cfg: CMAPConfig,
               arch: tuple[int, int, int], folder: RunFolder | None, settings: dict,
               progress: bool) -> DirectionResult:
    t0 = time.perf_counter()
    specs = _row_specs(circuit, cfg)
    heads_map = _per_head_patches(circuit, cfg)
    outputs: list[OutputPatch] = []
    for s in specs:
        if isinstance(s.patch, OutputPatch):
            outputs += [s.patch] + s.random
    outputs += [p for _, _, p in heads_map]
    outputs = list(dict.fromkeys(outputs))  # one run per distinct patch
    inputs = [s.patch for s in specs if isinstance(s.patch, InputPatch)]
    row_of = {p: i for i, p in enumerate(outputs)}
    plan = _Plan(outputs, inputs, arch)
    rec_settings = {**settings, "model": source.name, "plan": plan.describe()}
    recorded = _record(models, source, batch_list, plan, folder, rec_settings, progress)
    src_hits = torch.cat([r["hits"] for r in recorded]).bool()
    tgt_hits, out_hits, in_hits, identical = _patch(models, target, batch_list, plan, recorded,
                                                    cfg.max_rows, progress)
    n = len(src_hits)
    src_acc, tgt_acc = src_hits.double().mean().item(), tgt_hits.double().mean().item()
    boot = _Bootstrap(n, cfg.bootstrap, cfg.bootstrap_seed, cfg.confidence, src_hits, tgt_hits)
    acc_of = lambda hits: hits.double().mean().item()  # noqa: E731
    rows = []
    for s in specs:
        if s.patch is None:
            rows.append(CMAPRow(s.kind, s.name, s.groups, 0, None, empty=True))
            continue
        hits = (out_hits[row_of[s.patch]] if isinstance(s.patch, OutputPatch)
                else in_hits[inputs.index(s.patch)])
        acc = acc_of(hits)
        share_ci, defined = boot.share_ci(hits)
        rnd = [acc_of(out_hits[row_of[p]]) for p in s.random]
        rmean = sum(rnd) / len(rnd) if rnd else None
        rsd = (torch.tensor(rnd, dtype=torch.float64).std().item() if len(rnd) > 1
               else (0.0 if rnd else None))
        n_heads = s.patch.n_heads if isinstance(s.patch, OutputPatch) else len(s.patch.heads)
        rows.append(CMAPRow(s.kind, s.name, s.groups, n_heads, acc, boot.accuracy_ci(hits),
                            gap_share(acc, tgt_acc, src_acc), share_ci, defined, s.component,
                            rnd, rmean, rsd,
                            None if rmean is None else gap_share(rmean, tgt_acc, src_acc)))
    per_head: dict[str, dict] = {}
    for pos, (l, h), p in heads_map:
        m = per_head.setdefault(pos, {"accuracy": [[None] * arch[1] for _ in range(arch[0])],
                                      "share": [[None] * arch[1] for _ in range(arch[0])]})
        acc = acc_of(out_hits[row_of[p]])
        m["accuracy"][l][h] = acc
        m["share"][l][h] = gap_share(acc, tgt_acc, src_acc)
    return DirectionResult(direction, source.name, target.name, src_acc, tgt_acc, n, rows,
                           per_head, identical, time.perf_counter() - t0, boot.gap_ci())


# -- checks before any weights are loaded ------------------------------------------------------------
def _spec_folder(spec: str) -> Path | None:
    """The local folder a spec names (an organism's folder included), or ``None``."""
    if spec.startswith("organism:"):
        from ..organisms import organism_path

        try:
            return organism_path(spec.split(":", 1)[1]).resolve()
        except (ValueError, FileNotFoundError) as e:
            raise ModelSpecError(str(e)) from None
    p = Path(spec).expanduser()
    return p.resolve() if p.is_dir() else None


def _identity(spec: str) -> str:
    folder = _spec_folder(spec)
    return str(folder) if folder is not None else spec


def _as_spec(path: str) -> str:
    """``organism:NAME`` for a shipped organism's folder, else ``path`` unchanged."""
    from ..organisms import ORGANISMS, WEIGHTS_DIR

    for name in ORGANISMS:
        if path == str((WEIGHTS_DIR / name).resolve()):
            return f"organism:{name}"
    return path


def adapter_base_of(spec: str) -> str | None:
    """For a spec naming a LoRA adapter folder, the base it was trained on (resolved path or
    hub id, as its ``adapter_config.json`` says); ``None`` for any other spec."""
    from ..core.model import adapter_base

    folder = _spec_folder(spec)
    if folder is None or not (folder / "adapter_config.json").is_file() or \
            (folder / "config.json").is_file():
        return None
    return _identity(adapter_base(folder))


def _config_grid(spec: str) -> tuple[int, int, int, int] | None:
    """(layers, heads, kv heads, head_dim) from a local model's config.json; ``None`` when the
    spec is not a local folder (a hub id or a GGUF file is checked once it is loaded)."""
    folder = _spec_folder(spec)
    if folder is None:
        return None
    base = adapter_base_of(spec)
    if base is not None:
        folder = _spec_folder(base)
        if folder is None:
            return None
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        return None
    d = json.loads(cfg_file.read_text())
    d = d.get("text_config", d)
    try:
        heads = int(d["num_attention_heads"])
        head_dim = int(d.get("head_dim") or int(d["hidden_size"]) // heads)
        return (int(d["num_hidden_layers"]), heads, int(d.get("num_key_value_heads") or heads),
                head_dim)
    except (KeyError, TypeError, ValueError):
        return None


@dataclass
class PairCheck:
    """What :func:`check_pair` found: whether to take the LoRA path, and warnings to show."""

    lora: bool
    warnings: list[str] = field(default_factory=list)


def check_pair(base: str, finetuned: str, circuit: Circuit | None = None) -> PairCheck:
    """Check a (base, fine-tune) pair of specs before any weights are loaded.

    Errors (one line, naming the fix): a LoRA adapter trained on another base; different head
    grids (from the configs); different tokenizers; a circuit found on another head grid.
    Warns when both specs name the same model (the gap will be 0). Checks that need the weights
    (hub ids, GGUF files) are repeated when the models load.
    """
    from ..core.model import load_tokenizer

    warn = []
    if _identity(base) == _identity(finetuned):
        warn.append(f"--finetuned {finetuned} is the same model as --base {base}: the gap is 0 "
                    f"and the share recovered is undefined")
    ft_base = adapter_base_of(finetuned)
    lora = ft_base is not None and ft_base == _identity(base)
    if ft_base is not None and not lora:
        raise ModelSpecError(f"the LoRA adapter {finetuned} was trained on {ft_base}, not on the "
                             f"given base {base}: pass --base {_as_spec(ft_base)}")
    gb, gf = _config_grid(base), _config_grid(finetuned)
    if gb is not None and gf is not None and gb != gf:
        raise ArchitectureError(
            f"base {base} and fine-tune {finetuned} have different head grids (layers, heads, "
            f"kv heads, head_dim: {gb} vs {gf}): CMAP needs a fine-tune of the base's architecture")
    if circuit is not None:
        grid = gb or gf
        if grid is not None and (circuit.n_layers, circuit.n_heads) != grid[:2]:
            raise ArchitectureError(
                f"the circuit was found on a {circuit.n_layers}x{circuit.n_heads} head grid but "
                f"{base} has {grid[0]}x{grid[1]}: use a circuit found on this base")
    try:
        tb, tf = load_tokenizer(base), load_tokenizer(finetuned)
    except (ModelSpecError, OSError, ValueError):
        tb = tf = None  # not loadable alone: checked when the models load
    if tb is not None and not same_tokenizer(tb, tf):
        raise CMAPError(f"base {base} and fine-tune {finetuned} have different tokenizers: the "
                        f"same prompts would be different token ids; CMAP needs a fine-tune that "
                        f"kept its base's tokenizer")
    return PairCheck(lora, warn)


# -- the API -------------------------------------------------------------------------------------
def cmap(base: ModelRef | None, finetuned: ModelRef, prompts: Sequence[Prompt] | None,
         circuit: Circuit, config: CMAPConfig | None = None, *, lora: bool | None = None,
         load: Callable[[str], LoadedModel] | None = None, folder: RunFolder | None = None,
         progress: bool = False) -> CMAPResult:
    """CMAP of ``circuit`` between a base and a fine-tune (fine-tune → base; with
    ``config.reverse`` also base → fine-tune).

    ``base`` and ``finetuned`` are loaded models or specs (loaded with ``load``, one at a time,
    and freed after use). LoRA path (``lora=True``, or ``base`` is ``None`` / the same object as
    ``finetuned``): ``finetuned`` must carry an un-merged adapter; it is the fine-tune with the
    adapter on and the base with it off — one copy of the weights. ``prompts`` default to
    :func:`cmap_prompts`. With ``folder`` every recording and direction is cached there.
    """
    cfg = config or CMAPConfig()
    circuit_dict = circuit.to_dict()
    t0 = time.perf_counter()
    models = _Models(load or _default_load)
    if lora is None:
        lora = base is None or (
            base is finetuned and isinstance(finetuned, LoadedModel) and has_adapter(finetuned)
        ) or (
            isinstance(base, str) and isinstance(finetuned, str)
            and check_pair(base, finetuned, circuit).lora)
    ft_label = finetuned.name if isinstance(finetuned, LoadedModel) else finetuned
    if lora:
        ft_loaded = models.get(finetuned)
        if not has_adapter(ft_loaded):
            raise CMAPError(f"{ft_label} carries no LoRA adapter, so it cannot serve as its own "
                            f"base; pass the base model too")
        base_label = base.name if isinstance(base, LoadedModel) else (base or ft_label)
        ft_ep = Endpoint(ft_label, finetuned, True)
        base_ep = Endpoint(ft_label, finetuned, False)
        arch = ft_loaded.arch
        tokenizer = ft_loaded.tokenizer
    else:
        if base is None:
            raise CMAPError("pass the base model (or lora=True for an adapter fine-tune)")
        base_label = base.name if isinstance(base, LoadedModel) else base
        ft_ep, base_ep = Endpoint(ft_label, finetuned), Endpoint(base_label, base)
        if isinstance(base, LoadedModel):
            models.get(base)  # checked against the fine-tune when that is loaded
        ft_loaded = models.get(finetuned)
        arch, tokenizer = ft_loaded.arch, ft_loaded.tokenizer
    circuit.validate(arch)
    prompts = list(prompts) if prompts is not None else cmap_prompts(tokenizer, cfg)
    if not prompts:
        raise CMAPError("no prompts to patch")
    batch_list = batches(prompts, tokenizer, cfg.batch_size)
    grid = _grid(arch)
    settings = {"cmap": cfg.key(), "circuit": circuit_dict,
                "prompts": settings_digest([p.to_dict() for p in prompts]),
                "dtype": str(next(ft_loaded.model.parameters()).dtype)}
    del ft_loaded

    pairs = [(ft_ep, base_ep, FORWARD)] + ([(base_ep, ft_ep, REVERSE)] if cfg.reverse else [])
    results = []
    for src, tgt, name in pairs:
        dsettings = {**settings, "source": src.name, "target": tgt.name}

        def compute(src=src, tgt=tgt, name=name, dsettings=dsettings) -> dict:
            return _direction(models, src, tgt, name, batch_list, circuit, cfg, grid, folder,
                              dsettings, progress).to_dict()

        if folder is None:
            d = compute()
        else:
            cache_name = (f"cmap/{model_tag(src.name)}__{model_tag(tgt.name)}-"
                          f"{settings_digest(dsettings, 10)}.json")
            d = folder.cached(cache_name, dsettings, compute)
        results.append(DirectionResult.from_dict(d))
    models.free()
    warn = []
    if any(d.identical for d in results):
        warn.append(f"{ft_label} computes the same logits as {base_label} on every prompt (the "
                    f"same weights?): the gap is 0 and the share recovered is undefined")
        warnings.warn(warn[-1], stacklevel=2)
    return CMAPResult(base_label, ft_label, circuit_dict, cfg.key(), results, warn,
                      time.perf_counter() - t0)
