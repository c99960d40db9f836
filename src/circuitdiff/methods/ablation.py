"""Mean ablation and circuit accuracy.

A circuit is evaluated by running the model with every head that is *not* in the circuit
replaced by its mean output:

* at each position of a circuit group (``last``, ``query_label``, ...), heads outside the
  groups read there take their mean;
* at every other position, every head takes its mean — unless ``keep_other_positions`` is set,
  in which case those positions run untouched.

MLPs are never touched. Means are taken over a *mean-ablation set* (``task.sample`` with another
seed: random prompts with random query labels) **per token index**: every prompt of one task has
the same token layout, so index ``t`` is the same role (same word slot) in every prompt and the
mean of head ``(l, h)`` at ``t`` is a meaningful "average" activation there. They are stored as
one ``[layers, T, heads, head_dim]`` tensor — the whole sequence, but head outputs only (for a
7-box prompt of ~50 tokens on a 32x32x128 7B model that is ~26 MB in float32), computed once
per model and cached in the run folder.

Interventions are :class:`~circuitdiff.core.interventions.Write` edits, one per layer, whose ``where``
mask ``[B, T, H]`` is built with tensor ops (no loops over batch, heads or positions): each sample
gets its circuit membership scattered at its own group positions. The mask is per *row*, so many
ablation variants (minimality, completeness) run in one forward by stacking them along the batch
dimension (:func:`variant_accuracies`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch

from ..core.circuit import Circuit, CircuitGroup, Head
from ..core.interventions import Hook, StopAfter, Write, run_with_edits
from ..core.metrics import METRICS, correct, last_logits
from ..core.model import LoadedModel
from ..core.runs import RunFolder, model_tag, settings_digest
from ..core.task import Batch, Prompt, TaskError, batches
from .accuracy import AccuracyResult, evaluate_accuracy

#: a keep mask per position name: ``bool [L, H]`` (shared by all rows) or ``[N, L, H]`` (per row)
KeepMasks = Mapping[str, torch.Tensor]


class AblationError(ValueError):
    """Raised for an ablation that cannot apply (prompt layout differs from the means...)."""


@dataclass
class HeadMeans:
    """Mean head output per token index: ``means[l, t, h]`` over the mean-ablation set."""

    means: torch.Tensor  # [L, T, H, D]
    settings: dict = field(default_factory=dict)

    @property
    def seq_len(self) -> int:
        return self.means.shape[1]

    def check(self, loaded: LoadedModel) -> None:
        a = loaded.arch
        want = (a.n_layers, a.n_heads, a.head_dim)
        got = (self.means.shape[0], self.means.shape[2], self.means.shape[3])
        if want != got:
            raise AblationError(f"means have shape layers x heads x head_dim = {got} but the model "
                                f"{loaded.name} has {want}: they were computed on another model")


def _check_layout(batch: Batch, what: str, seq_len: int | None = None) -> None:
    """All prompts must share one token layout (no padding) so index t means the same slot."""
    if not bool(batch.attention_mask.bool().all()):
        raise AblationError(
            f"{what}: prompts tokenise to different lengths, so per-position means are undefined; "
            f"mean ablation needs every prompt of the task to share one token layout")
    if seq_len is not None and batch.input_ids.shape[1] != seq_len:
        raise AblationError(
            f"{what}: prompts are {batch.input_ids.shape[1]} tokens but the means were computed on "
            f"{seq_len}-token prompts (different n_boxes or tokenizer?); recompute the means")


@torch.no_grad()
def compute_means(loaded: LoadedModel, prompts: Sequence[Prompt], batch_size: int = 32,
                  progress: bool = False) -> HeadMeans:
    """Mean output of every head at every token index over ``prompts``."""
    if not prompts:
        raise AblationError("the mean-ablation set is empty")
    from tqdm.auto import tqdm

    arch = loaded.arch
    sums: dict[int, torch.Tensor] = {}
    n, T = 0, None

    def accumulate(layer: int):
        def fn(x4: torch.Tensor) -> torch.Tensor:  # sum over the batch, nothing else kept
            s = x4.detach().double().sum(0)
            sums[layer] = s if layer not in sums else sums[layer] + s
            return x4
        return fn

    hooks = [Hook(l, accumulate(l)) for l in range(arch.n_layers)]
    for batch in tqdm(batches(prompts, loaded.tokenizer, batch_size), desc=f"means {loaded.name}",
                      disable=not progress, unit="batch"):
        _check_layout(batch, "mean-ablation set", T)
        T = batch.input_ids.shape[1]
        run_with_edits(loaded.model, batch.model_inputs(loaded.device),
                       hooks + [StopAfter(arch.n_layers - 1)], arch)
        n += len(batch)
    total = torch.stack([sums[l].cpu() for l in range(arch.n_layers)])  # [L, T, H, D]
    return HeadMeans((total / n).float())


def cached_means(folder: RunFolder | None, loaded: LoadedModel, prompts: Sequence[Prompt],
                 settings: dict, batch_size: int = 32, progress: bool = False) -> HeadMeans:
    """:func:`compute_means`, cached in ``folder`` under the model name + ``settings``.

    ``settings`` must identify the mean-ablation set (size, seed, n_boxes...); the model name
    and dtype are added here.
    """
    settings = {"model": loaded.name, "dtype": str(next(loaded.model.parameters()).dtype),
                **settings}
    if folder is None:
        return HeadMeans(compute_means(loaded, prompts, batch_size, progress).means, settings)
    name = f"means/{model_tag(loaded.name)}-{settings_digest(settings, 10)}.safetensors"
    t = folder.cached_tensors(name, settings, lambda: {
        "means": compute_means(loaded, prompts, batch_size, progress).means})
    return HeadMeans(t["means"], settings)


# -- keep masks ------------------------------------------------------------------------------
def circuit_keep(circuit: Circuit) -> dict[str, torch.Tensor]:
    """Circuit membership per position name: ``{position: bool [L, H]}``."""
    return {p: circuit.mask(p) for p in circuit.positions()}


def without(circuit: Circuit, removed: Mapping[str, Sequence[Head]]) -> Circuit:
    """A copy of ``circuit`` with ``removed[group]`` heads dropped from each named group.

    A head dropped from one group stays in the circuit at that position if another group read
    at the same position also lists it.
    """
    for g in removed:
        if g not in circuit.groups:
            raise AblationError(f"no group {g!r} in the circuit (groups: {list(circuit.groups)})")
    groups = {}
    for name, g in circuit.groups.items():
        drop = set(map(tuple, removed.get(name, ())))
        groups[name] = CircuitGroup([h for h in g.heads if h not in drop], g.position, g.function)
    return Circuit(groups, circuit.n_layers, circuit.n_heads, circuit.model, dict(circuit.settings),
                   list(circuit.edges))


def role_mask(batch: Batch, role: str, error: type[Exception] = AblationError,
              what: str = "circuit evaluation") -> torch.Tensor:
    """Bool ``[B, T]``: the tokens of ``role`` (scalar or multi-position, offset allowed) in each
    sample. Padding entries (``-1``) of a multi role are skipped; a scalar role absent from a
    prompt is an ``error`` (``what`` — circuit evaluation, knockout — needs prompts whose query
    names a box). The one role scatter of ablation, the scan, discovery and knockout."""
    try:
        pos = batch.role(role)
    except TaskError as e:
        raise error(f"{what}: position: {e}") from None
    B, T = batch.input_ids.shape
    pos = pos[:, None] if pos.dim() == 1 else pos
    if bool((pos < 0).all(1).any()):
        raise error(f"position {role!r} is absent from some prompts; {what} needs prompts whose "
                    f"query names a box")
    at = torch.zeros(B, T + 1, dtype=torch.bool)
    at.scatter_(1, torch.where(pos >= 0, pos, T), True)  # padding lands in the spare column
    return at[:, :T]


def ablate_where(batch: Batch, keep: KeepMasks, n_layers: int, n_heads: int,
                 keep_other_positions: bool = False) -> torch.Tensor:
    """Bool ``[L, B, T, H]``: True where a head output is replaced by its mean.

    ``keep[role]`` (``[L, H]`` or per row ``[B, L, H]``) lists the heads kept at each token of
    ``role`` in each sample (a multi-position role such as ``labels`` keeps them at every token it
    covers); every other position is fully ablated, or fully kept with ``keep_other_positions``.
    Roles covering the same token OR their masks.
    """
    B, T = batch.input_ids.shape
    member = torch.zeros(B, T, n_layers, n_heads, dtype=torch.bool)
    is_group = torch.zeros(B, T, dtype=torch.bool)
    for name, m in keep.items():  # a handful of roles; no loop over samples, heads or positions
        at = role_mask(batch, name)
        m = m.to(torch.bool).cpu()
        if m.shape[-2:] != (n_layers, n_heads):
            raise AblationError(f"keep mask for {name!r} has shape {tuple(m.shape)}, expected "
                                f"[..., {n_layers}, {n_heads}]")
        member |= at[:, :, None, None] & m.expand(B, n_layers, n_heads)[:, None]
        is_group |= at
    keep_all = torch.where(is_group[..., None, None], member,
                           torch.tensor(bool(keep_other_positions)))
    return (~keep_all).permute(2, 0, 1, 3)  # [L, B, T, H]


def where_edits(means: HeadMeans, where: torch.Tensor, device=None) -> list[Write]:
    """One :class:`Write` per layer of ``where`` (bool ``[L, B, T, H]``, True = take the mean)
    that has anything to ablate."""
    edits = []
    for l in range(where.shape[0]):
        if bool(where[l].any()):
            edits.append(Write(l, means.means[l][None], where=where[l] if device is None
                               else where[l].to(device)))
    return edits


def ablation_edits(means: HeadMeans, batch: Batch, keep: KeepMasks,
                   keep_other_positions: bool = False, device=None) -> list[Write]:
    """The mean-ablation edits of one circuit (``keep`` masks per role) on ``batch``."""
    _check_layout(batch, "evaluation prompts", means.seq_len)
    L, _, H, _ = means.means.shape
    return where_edits(means, ablate_where(batch, keep, L, H, keep_other_positions), device)


# -- accuracy under ablation ----------------------------------------------------------------
def circuit_accuracy(loaded: LoadedModel, prompts: Sequence[Prompt], means: HeadMeans,
                     circuit: Circuit | KeepMasks, keep_other_positions: bool = False,
                     batch_size: int = 32, progress: bool = False) -> AccuracyResult:
    """Accuracy of ``loaded`` with everything outside ``circuit`` mean-ablated."""
    means.check(loaded)
    if isinstance(circuit, Circuit):
        circuit.validate(loaded.arch)
        keep = circuit_keep(circuit)
    else:
        keep = circuit
    return evaluate_accuracy(loaded, prompts, batch_size, progress, edits_for=lambda b: ablation_edits(
        means, b, keep, keep_other_positions, loaded.device))


def variant_chunks(batch: Batch, n_variants: int, max_rows: int = 256, first: int = 0
                   ) -> Iterator[tuple[int, int, Batch]]:
    """``(first_variant, k, big_batch)``: copies of ``batch`` for variants ``first ..
    n_variants - 1`` stacked variant-major along the batch dimension, ``k`` at a time so a
    forward holds at most ``max_rows`` rows (at least one variant). The one chunking loop behind
    every stacked-variant forward (ablation variants, the position scan, attention knockout,
    CMAP)."""
    per = max(1, max_rows // len(batch))
    for s in range(first, n_variants, per):
        k = min(per, n_variants - s)
        yield s, k, batch.repeat(k)


#: ``where_for(big_batch, first_variant, k)`` → bool ``[L, k*B, T, H]`` for variants
#: ``first_variant .. first_variant + k - 1`` stacked variant-major in ``big_batch``
WhereFor = Callable[[Batch, int, int], torch.Tensor]


def stacked_runs(loaded: LoadedModel, prompts: Sequence[Prompt], means: HeadMeans,
                 n_variants: int, where_for: WhereFor, batch_size: int = 32, max_rows: int = 256,
                 progress: bool = False, desc: str = "variants", only: range | None = None):
    """Yield ``(batch_index, first_variant, k, big_batch, last_logits [k*B, V])`` per forward:
    ``n_variants`` mean-ablation variants stacked along the batch dimension, up to ``max_rows``
    rows per forward. The one batching loop behind circuit variants and the position scan.

    ``only`` (a contiguous range of variants, e.g. this rank's
    :func:`~circuitdiff.core.distributed.share`) runs those variants alone: under ``torchrun``
    every rank runs its share and the callers gather the rows
    (:func:`~circuitdiff.core.distributed.gather_shares`)."""
    means.check(loaded)
    from tqdm.auto import tqdm

    chunks = batches(prompts, loaded.tokenizer, batch_size)
    lo, hi = (only.start, only.stop) if only is not None else (0, n_variants)
    # the bar counts stacked forwards (with their ETA), not prompt batches: on a big model one
    # batch of many variants is minutes of work
    n_forwards = sum(len(range(lo, hi, max(1, max_rows // len(b)))) for b in chunks)
    with tqdm(total=n_forwards, desc=f"{desc} {loaded.name}", disable=not progress,
              unit="forward") as bar:
        for i, batch in enumerate(chunks):
            if bool((batch.answer_ids < 0).any()):
                raise AblationError("circuit evaluation needs prompts whose query names a box")
            _check_layout(batch, "evaluation prompts", means.seq_len)
            for s, k, big in variant_chunks(batch, hi, max_rows, lo):
                logits = last_logits(loaded, big, where_edits(means, where_for(big, s, k),
                                                               loaded.device))
                bar.update(1)
                yield i, s, k, big, logits


def _keep_variant_runs(loaded: LoadedModel, prompts: Sequence[Prompt], means: HeadMeans,
                    variants: Sequence[KeepMasks], keep_other_positions: bool, batch_size: int,
                    max_rows: int, progress: bool, only: range | None = None):
    """:func:`stacked_runs` of circuit variants given as keep masks per role (``only``: those
    variants alone)."""
    names = list(variants[0])
    for v in variants:
        if list(v) != names:
            raise AblationError("all variants must give keep masks for the same positions")
    L, H = loaded.arch.n_layers, loaded.arch.n_heads
    stacked = {n: torch.stack([v[n].to(torch.bool).cpu().expand(L, H) for v in variants])
               for n in names}

    def where_for(big: Batch, s: int, k: int) -> torch.Tensor:
        B = len(big) // k
        keep = {n: m[s:s + k].repeat_interleave(B, 0) for n, m in stacked.items()}
        return ablate_where(big, keep, L, H, keep_other_positions)

    yield from stacked_runs(loaded, prompts, means, len(variants), where_for, batch_size,
                            max_rows, progress, only=only)


@torch.no_grad()
def variant_logits(loaded: LoadedModel, prompts: Sequence[Prompt], means: HeadMeans,
                   variants: Sequence[KeepMasks], keep_other_positions: bool = False,
                   batch_size: int = 32, max_rows: int = 256) -> torch.Tensor:
    """Last-position logits ``[V, N, vocab]`` of every variant (for inspection and tests; the
    accuracy functions below never hold more than one forward's logits)."""
    V, N = len(variants), len(prompts)
    out = None
    for i, s, k, big, logits in _keep_variant_runs(loaded, prompts, means, variants,
                                                keep_other_positions, batch_size, max_rows, False):
        if out is None:
            out = torch.empty(V, N, logits.shape[-1], dtype=logits.dtype)
        B = len(big) // k
        start = i * batch_size
        out[s:s + k, start:start + B] = logits.cpu().view(k, B, -1)
    return out


@torch.no_grad()
def variant_correct(loaded: LoadedModel, prompts: Sequence[Prompt], means: HeadMeans,
                    variants: Sequence[KeepMasks], keep_other_positions: bool = False,
                    batch_size: int = 32, max_rows: int = 256, progress: bool = False,
                    metric: str = "accuracy") -> torch.Tensor:
    """Bool ``[V, N]``: is prompt n answered correctly under ablation variant v.

    Variants are stacked along the batch dimension — up to ``max_rows`` rows per forward — so V
    variants cost about ``V * N / max_rows`` forwards instead of ``V * N / batch_size``. Every
    variant must name the same positions (the masks are stacked). Under ``torchrun`` (every rank
    calling with the same arguments) each rank runs its contiguous share of the variants and the
    rows are gathered, so every rank returns the whole ``[V, N]``.
    """
    from ..core import distributed

    if metric not in METRICS:
        raise AblationError(f"metric must be one of {METRICS}, got {metric!r}")
    V, N = len(variants), len(prompts)
    out = torch.zeros(V, N, dtype=torch.bool)
    if not variants:
        return out
    for i, s, k, big, logits in _keep_variant_runs(loaded, prompts, means, variants,
                                                keep_other_positions, batch_size, max_rows,
                                                progress, distributed.share(V)):
        B = len(big) // k
        start = i * batch_size
        out[s:s + k, start:start + B] = correct(logits, big, metric).cpu().view(k, B)
    return distributed.gather_shares(out)


def variant_accuracies(loaded: LoadedModel, prompts: Sequence[Prompt], means: HeadMeans,
                       variants: Sequence[KeepMasks], keep_other_positions: bool = False,
                       batch_size: int = 32, max_rows: int = 256, progress: bool = False,
                       metric: str = "accuracy") -> list[float]:
    """Accuracy of each ablation variant (see :func:`variant_correct`)."""
    c = variant_correct(loaded, prompts, means, variants, keep_other_positions, batch_size,
                        max_rows, progress, metric)
    return c.double().mean(1).tolist()
