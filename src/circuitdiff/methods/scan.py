"""Position scan: where does the computation happen, before any head is named?

For every layer ``L`` and every role ``R`` of the position schema, the accuracy of the model when
*all* heads of layer ``L`` are mean-ablated at the tokens of ``R`` (every other head, position and
MLP untouched). A big drop at ``(L, R)`` says that layer's attention output at that role carries
something the answer needs; the automatic discovery chain (:mod:`.discovery`) uses it to choose
the roles whose keys and values it traces.

All ``L x R`` variants run stacked along the batch dimension (:func:`.ablation.stacked_runs`), so
the scan costs about ``L * R * N / max_rows`` forwards. Means are the mean-ablation means per
token index (:func:`.ablation.cached_means`).
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
    batch_size: int = execution(32)
    max_rows: int = execution(512)

    def __post_init__(self) -> None:
        if self.mean_seed is None:
            self.mean_seed = self.seed + 1
        if self.mean_seed == self.seed:
            raise ScanError("the mean-ablation set must use another seed than the scan prompts")
        if self.roles is not None:
            self.roles = tuple(check_role(r, self.n_boxes) for r in self.roles)
        self.check_at_least(("n_prompts", "n_mean", "batch_size", "max_rows"), error=ScanError)


@dataclass
class ScanResult(Result):
    """``accuracy[l][r]``: accuracy with every head of layer ``l`` mean-ablated at ``roles[r]``."""

    model: str
    roles: list[str]
    accuracy: list[list[float]]
    baseline: float
    n: int
    settings: dict = field(default_factory=dict)

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
        d = self.drop()[:below_layer].max(0).values
        order = torch.argsort(d, descending=True, stable=True).tolist()
        return [self.roles[i] for i in order if float(d[i]) >= min_drop]


def default_scan_roles(prompts: Sequence[Prompt], tokenizer) -> list[str]:
    """The partition roles these prompts define (all tokens covered, ``prefix`` only when the
    tokenizer adds one) plus the paper's context positions."""
    defined = set(encode(prompts[:1], tokenizer).role_names())
    return [r for r in PARTITION_ROLES + PAPER_CONTEXT_ROLES if r in defined]


@torch.no_grad()
def position_scan(loaded: LoadedModel, prompts: Sequence[Prompt], means: HeadMeans,
                  roles: Sequence[str] | None = None, batch_size: int = 32, max_rows: int = 512,
                  progress: bool = False, baseline: float | None = None) -> ScanResult:
    """Accuracy with all heads of layer ``L`` mean-ablated at role ``R``, for every ``(L, R)``.

    Variants are stacked along the batch dimension, role-major (variant ``v`` is role
    ``v // n_layers``, layer ``v % n_layers``); ``baseline`` may pass an already measured
    full-model accuracy on the same prompts. Under ``torchrun`` (every rank calling with the same
    arguments) each rank runs its contiguous share of the ``(layer, role)`` cells and the
    per-prompt hits are gathered, so every rank returns the whole scan.
    """
    from ..core import distributed

    if not prompts:
        raise ScanError("no prompts to scan")
    roles = list(roles) if roles is not None else default_scan_roles(prompts, loaded.tokenizer)
    probe = encode(prompts[:1], loaded.tokenizer)
    for r in roles:
        try:
            probe.role(r)
        except TaskError as e:
            raise ScanError(str(e)) from None
    L, H = loaded.arch.n_layers, loaded.arch.n_heads
    V = L * len(roles)
    variant_role = torch.arange(V) // L
    variant_layer = torch.arange(V) % L
    layers = torch.arange(L)

    def where_for(big, s: int, k: int) -> torch.Tensor:
        B = len(big) // k
        at = torch.stack([role_mask(big, r) for r in roles])           # [R, kB, T]
        row_role = variant_role[s:s + k].repeat_interleave(B)          # [kB]
        row_layer = variant_layer[s:s + k].repeat_interleave(B)        # [kB]
        at_row = at[row_role, torch.arange(len(big))]                  # [kB, T]
        hit = layers[:, None] == row_layer[None, :]                    # [L, kB]
        return (hit[:, :, None] & at_row[None])[..., None].expand(L, len(big), at_row.shape[1], H)

    hits = torch.zeros(V, len(prompts), dtype=torch.bool)
    for i, s, k, big, logits in stacked_runs(loaded, prompts, means, V, where_for, batch_size,
                                             max_rows, progress, desc="scan",
                                             only=distributed.share(V)):
        B = len(big) // k
        hits[s:s + k, i * batch_size:i * batch_size + B] = correct(logits, big).cpu().view(k, B)
    hits = distributed.gather_shares(hits)
    acc = hits.double().mean(1).view(len(roles), L).T.tolist()
    if baseline is None:
        baseline = evaluate_accuracy(loaded, prompts, batch_size).accuracy
    return ScanResult(loaded.name, roles, acc, baseline, len(prompts))


def run(loaded: LoadedModel, prompts: Sequence[Prompt] | None = None,
        config: ScanConfig | None = None, *, store: "RunFolder | str | Path | None" = None,
        progress: bool | None = None) -> ScanResult:
    """:func:`position_scan` on ``prompts`` (None: the config's task prompts), cached as
    ``scan.json`` in ``store`` (means cached under ``means/``); a rerun with the same settings
    loads it. Without a store it computes and saves nothing."""
    cfg = config or ScanConfig()
    folder = as_store(store)
    task = EntityTrackingTask(loaded.tokenizer, TaskConfig(n_boxes=cfg.n_boxes), seed=cfg.seed)
    settings = {"model": loaded.name, "adapter": loaded.adapter, **cfg.cache_key()}
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
        res = position_scan(loaded, prompts, means, cfg.roles, cfg.batch_size, cfg.max_rows,
                            bool(progress))
        res.settings = settings
        return res.to_dict()
    if folder is None:
        return ScanResult.from_dict(compute())
    return ScanResult.from_dict(folder.cached("scan.json", settings, compute))


__all__ = ["PAPER_CONTEXT_ROLES", "ScanConfig", "ScanError", "ScanResult", "default_scan_roles",
           "position_scan", "run"]
