"""Position scan: where does the computation happen, before any head is named?

For every layer ``L`` and every role ``R`` of the position schema, the accuracy of the model when
*all* heads of layer ``L`` are mean-ablated at the tokens of ``R`` (every other head, position and
MLP untouched). A big drop at ``(L, R)`` says that layer's attention output at that role carries
something the answer needs; the automatic discovery chain (:mod:`.discovery`) uses it to choose
the roles whose keys and values it traces.

All ``L x R`` variants run stacked along the batch dimension (:func:`.ablation.stacked_runs`), so
the exact scan costs ``L * R`` forwards of the ``N`` prompts (about ``L * R * N / max_rows``
stacked forwards). Means are the mean-ablation means per token index
(:func:`.ablation.cached_means`).

That is cheap on a 4-layer model and hours on a real one (24 layers x 7 roles x 100 prompts of a
0.5B model on a small CPU), so the scan has three methods (:data:`SCAN_METHODS`):

* ``exact`` — every cell measured as above;
* ``attribution`` — one forward and one backward per batch estimate every cell at once: the
  first-order change of the answer's log-probability when layer ``L``'s head outputs at ``R`` are
  replaced by their means, ``sum_t (mean_t - z_t) . d log p / d z_t`` (:func:`attribution_scan`);
  no accuracy is measured;
* ``hybrid`` — attribution for every cell, then the ``n_exact`` cells it ranks most damaging
  measured exactly (the others stay unmeasured, NaN, and never count as relevant), and each
  role ablated at every layer at once (``cumulative``: on a 24-layer model a role's work is
  spread over layers, so one layer's ablation hardly shows it; measured on Qwen-0.5B, no single
  layer at the labels cost more than 0.06 of 0.59).

``auto`` picks ``exact`` when the model has at most :data:`AUTO_EXACT_MAX_HEADS` heads and
``hybrid`` above (:func:`resolve_scan_method` says which and why).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..core.config import Config, execution
from ..core.metrics import correct
from ..core.model import LoadedModel
from ..core.runs import RunFolder, settings_digest
from ..core.task import (PARTITION_ROLES, EntityTrackingTask, Prompt, TaskConfig, TaskError,
                         check_role, encode)
from .ablation import HeadMeans, cached_means, role_mask, stacked_runs
from .accuracy import evaluate_accuracy
from .base import Result, as_store

#: the scan's default rows besides the partition roles: the paper's two context positions
PAPER_CONTEXT_ROLES: tuple[str, ...] = ("prev_query_label", "correct_object")
SCAN_METHODS = ("auto", "exact", "attribution", "hybrid")
#: ``auto`` measures every cell exactly up to this many heads (the organisms' 32, a 12 x 12 GPT-2
#: small's 144), above it attribution pre-filters: a 24 x 14 Qwen-0.5B has 336
AUTO_EXACT_MAX_HEADS = 160


def resolve_scan_method(method: str, n_layers: int, n_heads: int, n_roles: int,
                        n_exact: int) -> tuple[str, str]:
    """``(method, rule)``: ``auto`` resolved by model size, and the sentence saying why."""
    heads = n_layers * n_heads
    if method != "auto":
        return method, f"scan method {method} (as asked)"
    if heads <= AUTO_EXACT_MAX_HEADS:
        return "exact", (f"scan method auto -> exact: {heads} heads <= {AUTO_EXACT_MAX_HEADS}, "
                         f"all {n_layers * n_roles} (layer, role) cells measured")
    return "hybrid", (f"scan method auto -> hybrid: {heads} heads > {AUTO_EXACT_MAX_HEADS}, so "
                      f"attribution estimates all {n_layers * n_roles} (layer, role) cells in one "
                      f"forward+backward per batch and the {min(n_exact, n_layers * n_roles)} it "
                      f"ranks most damaging are measured exactly")


class ScanError(ValueError):
    """Raised for a scan that cannot run (unknown role, empty prompt set...)."""


@dataclass
class ScanConfig(Config):
    """What a scan measures on.

    ``n_prompts`` task prompts of seed ``seed`` with ``n_boxes`` boxes (when the caller gives no
    prompts); the mean-ablation set: ``n_mean`` prompts of seed ``mean_seed`` (default
    ``seed + 1``; never the scan's own seed); ``roles`` scanned (default: every token-covering
    role of the prompts plus the paper's context positions). Execution only: ``batch_size``
    prompts per forward, ``max_rows`` rows per stacked forward."""

    n_prompts: int = 200
    seed: int = 0
    n_mean: int = 200
    mean_seed: int | None = None
    n_boxes: int = 7
    roles: tuple[str, ...] | None = None
    #: exact, attribution, hybrid or auto (by model size, see :func:`resolve_scan_method`)
    method: str = "auto"
    #: cells measured exactly by the hybrid method (the most damaging by attribution)
    n_exact: int = 16
    batch_size: int = execution(32)
    max_rows: int = execution(512)

    def __post_init__(self) -> None:
        if self.method not in SCAN_METHODS:
            raise ScanError(f"scan method must be one of {', '.join(SCAN_METHODS)}, got "
                            f"{self.method!r}")
        if self.mean_seed is None:
            self.mean_seed = self.seed + 1
        if self.mean_seed == self.seed:
            raise ScanError("the mean-ablation set must use another seed than the scan prompts")
        if self.roles is not None:
            self.roles = tuple(check_role(r, self.n_boxes) for r in self.roles)
        self.check_at_least(("n_prompts", "n_mean", "batch_size", "max_rows", "n_exact"),
                            error=ScanError)


@dataclass
class ScanResult(Result):
    """``accuracy[l][r]``: accuracy with every head of layer ``l`` mean-ablated at ``roles[r]``
    (NaN where the cell was not measured); ``estimate[l][r]`` (attribution and hybrid scans):
    the first-order change of the mean answer log-probability for the same ablation; ``method``
    the scan method that ran and ``rule`` why."""

    model: str
    roles: list[str]
    accuracy: list[list[float]]
    baseline: float
    n: int
    settings: dict = field(default_factory=dict)
    estimate: list[list[float]] | None = None
    method: str = "exact"
    rule: str = ""
    #: hybrid scans: accuracy with every layer's heads ablated at each role (on a big model a
    #: role's work is spread over many layers, so no single layer's ablation shows it)
    cumulative: list[float] | None = None

    @property
    def n_layers(self) -> int:
        return len(self.accuracy)

    def drop(self) -> torch.Tensor:
        """``[layers, roles]`` accuracy lost by each ablation (positive = the role matters)."""
        return self.baseline - torch.tensor(self.accuracy, dtype=torch.float64)

    def relevant_roles(self, below_layer: int, min_drop: float) -> list[str]:
        """Roles where ablating some layer ``< below_layer`` costs at least ``min_drop``
        accuracy, most damaging first."""
        if below_layer <= 0:
            return []
        d = self.drop()[:below_layer].nan_to_num(nan=float("-inf")).max(0).values
        if self.cumulative is not None:  # a role whose layers matter together counts too
            together = self.baseline - torch.tensor(self.cumulative, dtype=torch.float64)
            d = torch.maximum(d, together.nan_to_num(nan=float("-inf")))
        order = torch.argsort(d, descending=True, stable=True).tolist()
        return [self.roles[i] for i in order if float(d[i]) >= min_drop]


def default_scan_roles(prompts: Sequence[Prompt], tokenizer) -> list[str]:
    """The partition roles these prompts define (all tokens covered, ``prefix`` only when the
    tokenizer adds one) plus the paper's context positions."""
    defined = set(encode(prompts[:1], tokenizer).role_names())
    return [r for r in PARTITION_ROLES + PAPER_CONTEXT_ROLES if r in defined]


def _checked_roles(loaded: LoadedModel, prompts: Sequence[Prompt],
                   roles: Sequence[str] | None) -> list[str]:
    if not prompts:
        raise ScanError("no prompts to scan")
    roles = list(roles) if roles is not None else default_scan_roles(prompts, loaded.tokenizer)
    probe = encode(prompts[:1], loaded.tokenizer)
    for r in roles:
        try:
            probe.role(r)
        except TaskError as e:
            raise ScanError(str(e)) from None
    return roles


def attribution_scan(loaded: LoadedModel, prompts: Sequence[Prompt], means: HeadMeans,
                     roles: Sequence[str] | None = None, batch_size: int = 32,
                     progress: bool = False) -> torch.Tensor:
    """``[L, R]`` first-order estimate of the change in mean ``log p(answer)`` when every head of
    layer ``l`` is mean-ablated at the tokens of ``roles[r]``:
    ``mean_b sum_{t in r} (mean_l[t] - z_l[b, t]) . d log p_b / d z_l[b, t]``, with ``z_l`` the
    head outputs (the ``o_proj`` input) and the gradient taken through everything downstream
    (a zero offset added to each ``z_l`` is the leaf, so no path is cut). One forward and one
    backward per batch for all cells. Under ``torchrun`` the batches are dealt to the ranks and
    their sums added in batch order (bit-identical to one process)."""
    from tqdm.auto import tqdm

    from ..core import distributed
    from ..core.interventions import Hook
    from ..core.metrics import answer_prob, logits_at_last
    from ..core.task import batches

    roles = _checked_roles(loaded, prompts, roles)
    means.check(loaded)
    L, dev = loaded.arch.n_layers, loaded.device
    chunks = list(batches(prompts, loaded.tokenizer, batch_size))
    mine = distributed.dealt(len(chunks))
    parts = torch.zeros(len(mine), L, len(roles), dtype=torch.float64)
    for j, b in enumerate(tqdm(mine, desc=f"scan attribution {loaded.name}",
                               disable=not progress, unit="batch")):
        batch = chunks[b]
        zs: dict[int, torch.Tensor] = {}
        offsets: dict[int, torch.Tensor] = {}

        def leaf(layer: int):
            def fn(x4: torch.Tensor) -> torch.Tensor:
                zs[layer] = x4.detach()
                offsets[layer] = torch.zeros_like(x4, requires_grad=True)
                return x4 + offsets[layer]
            return fn
        with torch.enable_grad():
            logits = logits_at_last(loaded.model, batch.model_inputs(dev),
                                    batch.positions["last"].to(dev),
                                    [Hook(l, leaf(l)) for l in range(L)], loaded.arch)
            obj = answer_prob(logits, batch.answer_ids.to(dev)).log().sum()
            grads = torch.autograd.grad(obj, [offsets[l] for l in range(L)])
        at = torch.stack([role_mask(batch, r) for r in roles]).to(dev).double()  # [R, B, T]
        for l, g in enumerate(grads):
            delta = means.means[l].to(dev, g.dtype)[None] - zs[l]            # [B, T, H, D]
            per_token = (delta * g).sum((-1, -2)).double()                  # [B, T]
            parts[j, l] = (at * per_token[None]).sum((1, 2)).cpu()
    total = torch.zeros(L, len(roles), dtype=torch.float64)
    for part in distributed.gather_dealt(parts, len(chunks)):
        total += part
    return (total / len(prompts)).float()


@torch.no_grad()
def position_scan(loaded: LoadedModel, prompts: Sequence[Prompt], means: HeadMeans,
                  roles: Sequence[str] | None = None, batch_size: int = 32, max_rows: int = 512,
                  progress: bool = False, baseline: float | None = None,
                  cells: Sequence[tuple[int, int]] | None = None) -> ScanResult:
    """Accuracy with all heads of layer ``L`` mean-ablated at role ``R``, for every ``(L, R)``
    (or only the ``(layer, role index)`` ``cells`` given; the others are NaN; a cell of layer
    ``-1`` ablates the role at every layer and lands in the result's ``cumulative``).

    Variants are stacked along the batch dimension, role-major (by default variant ``v`` is role
    ``v // n_layers``, layer ``v % n_layers``); ``baseline`` may pass an already measured
    full-model accuracy on the same prompts. Under ``torchrun`` (every rank calling with the same
    arguments) each rank runs its contiguous share of the cells and the per-prompt hits are
    gathered, so every rank returns the whole scan.
    """
    from ..core import distributed

    roles = _checked_roles(loaded, prompts, roles)
    L, H = loaded.arch.n_layers, loaded.arch.n_heads
    if cells is None:
        cells = [(l, r) for r in range(len(roles)) for l in range(L)]
    cells = sorted(set(cells), key=lambda c: (c[1], c[0]))
    V = len(cells)
    variant_layer = torch.tensor([l for l, _ in cells], dtype=torch.long)
    variant_role = torch.tensor([r for _, r in cells], dtype=torch.long)
    layers = torch.arange(L)

    def where_for(big, s: int, k: int) -> torch.Tensor:
        B = len(big) // k
        at = torch.stack([role_mask(big, r) for r in roles])           # [R, kB, T]
        row_role = variant_role[s:s + k].repeat_interleave(B)          # [kB]
        row_layer = variant_layer[s:s + k].repeat_interleave(B)        # [kB]
        at_row = at[row_role, torch.arange(len(big))]                  # [kB, T]
        hit = (layers[:, None] == row_layer[None, :]) | (row_layer[None, :] < 0)  # [L, kB]
        return (hit[:, :, None] & at_row[None])[..., None].expand(L, len(big), at_row.shape[1], H)

    hits = torch.zeros(V, len(prompts), dtype=torch.bool)
    for i, s, k, big, logits in stacked_runs(loaded, prompts, means, V, where_for, batch_size,
                                             max_rows, progress, desc="scan",
                                             only=distributed.share(V)):
        B = len(big) // k
        hits[s:s + k, i * batch_size:i * batch_size + B] = correct(logits, big).cpu().view(k, B)
    hits = distributed.gather_shares(hits)
    per_cell = hits.double().mean(1)
    acc = torch.full((L, len(roles)), float("nan"), dtype=torch.float64)
    single = variant_layer >= 0
    acc[variant_layer[single], variant_role[single]] = per_cell[single]
    acc = acc.tolist()
    cumulative = None
    if bool((~single).any()):
        cum = torch.full((len(roles),), float("nan"), dtype=torch.float64)
        cum[variant_role[~single]] = per_cell[~single]
        cumulative = cum.tolist()
    if baseline is None:
        baseline = evaluate_accuracy(loaded, prompts, batch_size).accuracy
    return ScanResult(loaded.name, roles, acc, baseline, len(prompts), cumulative=cumulative)


def scan_method_key(key: dict, method: str, n_exact: int, arch) -> dict:
    """``key`` (a config's cache key) with its ``method``/``n_exact`` fields replaced by what
    ``method`` resolves to on this model: an exact scan's key has neither (as before the
    methods existed), ``n_exact`` appears only where a hybrid scan uses it."""
    resolved, _ = resolve_scan_method(method, arch.n_layers, arch.n_heads, 1, n_exact)
    key = {k: v for k, v in key.items() if k not in ("method", "n_exact")}
    if resolved != "exact":
        key["method"] = resolved
    if resolved == "hybrid":
        key["n_exact"] = n_exact
        key["cumulative"] = True  # hybrid scans also ablate each role at every layer
    return key


def scan_by_method(loaded: LoadedModel, prompts: Sequence[Prompt], means: HeadMeans,
                   roles: Sequence[str] | None = None, method: str = "auto", n_exact: int = 16,
                   batch_size: int = 32, max_rows: int = 512, progress: bool = False,
                   baseline: float | None = None) -> ScanResult:
    """The position scan by ``method`` (see the module docstring; ``auto`` by model size): every
    cell exact, every cell estimated, or estimated then the ``n_exact`` most damaging measured.
    The rule that chose the method is in the result's ``rule`` (and printed with ``progress``)."""
    import sys

    roles = _checked_roles(loaded, prompts, roles)
    L, H = loaded.arch.n_layers, loaded.arch.n_heads
    method, rule = resolve_scan_method(method, L, H, len(roles), n_exact)
    if progress:
        print(f"[scan] {rule}", file=sys.stderr)
    estimate = None
    cells = None
    if method in ("attribution", "hybrid"):
        est = attribution_scan(loaded, prompts, means, roles, batch_size, progress)
        estimate = est.tolist()
        order = torch.argsort(est.flatten(), stable=True)[:n_exact if method == "hybrid" else 0]
        cells = [(int(i) // len(roles), int(i) % len(roles)) for i in order]
        if method == "hybrid":  # and every role at all layers at once
            cells += [(-1, r) for r in range(len(roles))]
    if cells == []:
        if baseline is None:
            baseline = evaluate_accuracy(loaded, prompts, batch_size).accuracy
        nan = [[float("nan")] * len(roles) for _ in range(L)]
        res = ScanResult(loaded.name, roles, nan, baseline, len(prompts))
    else:
        res = position_scan(loaded, prompts, means, roles, batch_size, max_rows, progress,
                            baseline, cells)
    res.estimate, res.method, res.rule = estimate, method, rule
    return res


def run(loaded: LoadedModel, prompts: Sequence[Prompt] | None = None,
        config: ScanConfig | None = None, *, store: "RunFolder | str | Path | None" = None,
        progress: bool | None = None) -> ScanResult:
    """:func:`position_scan` on ``prompts`` (None: the config's task prompts), cached as
    ``scan.json`` in ``store`` (means cached under ``means/``); a rerun with the same settings
    loads it. Without a store it computes and saves nothing."""
    cfg = config or ScanConfig()
    folder = as_store(store)
    task = EntityTrackingTask(loaded.tokenizer, TaskConfig(n_boxes=cfg.n_boxes), seed=cfg.seed)
    settings = {"model": loaded.name, "adapter": loaded.adapter,
                **scan_method_key(cfg.cache_key(), cfg.method, cfg.n_exact, loaded.arch)}
    if prompts is None:
        prompts = task.sample(cfg.n_prompts)
    else:  # the given prompts decide the result, not the config's task sample
        prompts = list(prompts)
        settings.update(n_prompts=len(prompts),
                        prompts=settings_digest([p.to_dict() for p in prompts]))

    def compute() -> dict:
        means = cached_means(folder, loaded, task.sample(cfg.n_mean, seed=cfg.mean_seed),
                             {"n_mean": cfg.n_mean, "mean_seed": cfg.mean_seed,
                              "n_boxes": cfg.n_boxes}, cfg.batch_size, bool(progress))
        res = scan_by_method(loaded, prompts, means, cfg.roles, cfg.method, cfg.n_exact,
                             cfg.batch_size, cfg.max_rows, bool(progress))
        res.settings = settings
        return res.to_dict()
    if folder is None:
        return ScanResult.from_dict(compute())
    return ScanResult.from_dict(folder.cached("scan.json", settings, compute))


__all__ = ["AUTO_EXACT_MAX_HEADS", "PAPER_CONTEXT_ROLES", "SCAN_METHODS", "ScanConfig",
           "ScanError", "ScanResult", "attribution_scan", "default_scan_roles", "position_scan",
           "resolve_scan_method", "run", "scan_by_method", "scan_method_key"]
