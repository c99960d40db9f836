"""Functional patching across models: DCM's selections patched in every model of a pool.

Each found (group, desideratum) selection of a :class:`~.run.DCMResult` is patched from the
desideratum's counterfactual in every model (the same prompts, the same heads, each model's own
activations) and the target accuracy measured on the test split, with random head sets of the
same size — the paper's "functionality remains consistent across models" table. Selections DCM
did not find a function for (``found`` false) are skipped and listed in ``notes``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Sequence

from ...core.circuit import Circuit, Head, format_head, parse_head
from ...core.config import Config
from ...core.model import LoadedModel
from ...core.pool import ModelPool, as_pool, same_tokenizer
from ...core.runs import RunFolder, model_tag, safe_name
from ..base import Result, as_store
from .config import DCMConfig
from .run import DCMPlan, DCMResult, eval_hits, prepare, random_head_sets, random_summary

#: version of a cached functional row (2: rows carry per-prompt hits); part of its file's key
ROW_VERSION = 2


@dataclass
class FunctionalConfig(Config):
    """What functional patching patches. Fields: ``selections`` — the DCM result whose found
    selections are patched; ``dcm`` — the DCM config they were found with (its circuit and
    prompts; default: rebuilt from ``selections``)."""

    selections: DCMResult
    dcm: DCMConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.selections, dict):
            self.selections = DCMResult.from_dict(self.selections)
        if isinstance(self.dcm, dict):
            self.dcm = DCMConfig.from_dict(self.dcm)
        if self.dcm is None:
            self.dcm = DCMConfig.from_dict({**self.selections.config,
                                            "circuit": self.selections.circuit})
        elif self.dcm.circuit is None:
            self.dcm = DCMConfig.from_dict({**self.dcm.to_dict(),
                                            "circuit": self.selections.circuit})


@dataclass
class FunctionalRow(Result):
    """One model, one (group, desideratum): target accuracy with the DCM-selected heads patched
    from the counterfactual, without patching, and with random head sets of the same size."""

    model: str
    group: str
    desideratum: str
    selected: list[str]
    accuracy: float
    no_patch: float
    random_mean: float | None
    random_sd: float | None
    random: list[float]
    n: int
    hits: list[int] = field(default_factory=list, repr=False)  # per test prompt, selected patched


@dataclass
class FunctionalResult(Result):
    """Every (model, found selection) row, and a note per selection skipped."""

    rows: list[FunctionalRow]
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict) -> "FunctionalResult":
        return cls([FunctionalRow.from_dict(r) for r in d["rows"]], d.get("notes", []))


def check_tokenizers(specs: Sequence[str]) -> None:
    """All models must share a tokenizer (the same prompts are the same ids); checked from the
    tokenizers alone, before any model is loaded."""
    from ...core.model import load_tokenizer

    if len(set(specs)) != len(specs):
        raise ValueError(f"a model is listed twice: {list(specs)}")
    toks = [load_tokenizer(s) for s in specs]
    for spec, tok in zip(specs[1:], toks[1:]):
        if not same_tokenizer(toks[0], tok):
            raise ValueError(f"model {spec} has a different tokenizer from {specs[0]}: the same "
                             f"prompts would be different token ids. Patch across models that "
                             f"share one tokenizer")


def run(model_or_pool: "LoadedModel | ModelPool", prompts, config: FunctionalConfig, *,
        store: RunFolder | str | None = None, progress: bool | None = None) -> FunctionalResult:
    """Every found selection of ``config.selections`` patched in every model of the pool.

    Models are handed out one at a time by the pool and must share the tokenizer of the first
    (the prompts are encoded once with it); the test split of the DCM prompts is used
    (``prompts``: DCM's base prompts, None to draw them as DCM did). Each (model, group,
    desideratum) is cached in ``store`` under ``functional/<model>/<group>__<desideratum>.json``.
    """
    store = as_store(store)
    result, cfg = config.selections, config.dcm
    pool = as_pool(model_or_pool)
    picks = [r for r in result.rows if r.selected and r.found]
    notes = [f"{r.group} / {r.desideratum}: {r.reason or 'no function found'}; not patched"
             for r in result.rows if not (r.selected and r.found)]
    rows: list[FunctionalRow] = []
    plan: DCMPlan | None = None
    if not picks:
        return FunctionalResult(rows, notes)
    circuit = Circuit.from_dict(result.circuit)
    for spec, loaded in pool.each():
        circuit.validate(loaded.arch)
        if plan is None:
            plan = prepare(loaded.tokenizer, cfg, prompts)
        elif not same_tokenizer(plan.tokenizer, loaded.tokenizer):
            raise ValueError(f"model {spec} has a different tokenizer from the model DCM ran on "
                             f"({result.model}): the same prompts would be different token ids. "
                             f"Patch across models that share one tokenizer")
        for r in picks:
            group = plan.groups[r.group]
            selected = [parse_head(h) for h in r.selected]
            randoms = random_head_sets(len(selected), loaded.arch.n_layers, loaded.arch.n_heads,
                                       cfg.n_random, cfg.random_seed)
            compute = functools.partial(_functional_row, loaded, plan, r.group, r.desideratum,
                                        selected, randoms)
            if store is None:
                d = compute()
            else:
                settings = {"row_version": ROW_VERSION, "model": loaded.name,
                            "dcm_model": result.model, "group": r.group,
                            "desideratum": r.desideratum, "selected": r.selected,
                            "position": group.position, **cfg.group_key()}
                if plan.prompts_digest is not None:
                    settings["prompts"] = plan.prompts_digest
                d = store.cached(f"functional/{model_tag(loaded.name)}/{safe_name(r.group)}__"
                                 f"{safe_name(r.desideratum)}.json", settings, compute)
            rows.append(FunctionalRow.from_dict(d))
            if progress:
                x = rows[-1]
                print(f"  {x.model}: {x.group} / {x.desideratum} ({len(x.selected)} heads) "
                      f"target acc {x.accuracy:.2f} (random "
                      f"{'-' if x.random_mean is None else f'{x.random_mean:.2f}'}, no patch "
                      f"{x.no_patch:.2f})", flush=True)
    return FunctionalResult(rows, notes)


def _functional_row(loaded: LoadedModel, plan: DCMPlan, group: str, desideratum: str,
                    selected: list[Head], randoms: list[list[Head]]) -> dict:
    """Target accuracy on the test split: unpatched, ``selected`` patched, each random set."""
    hits = eval_hits(loaded, plan, plan.groups[group], desideratum, [[], selected] + randoms,
                     "test")
    accs = hits.float().mean(1).tolist()
    rnd = accs[2:]
    return FunctionalRow(loaded.name, group, desideratum, [format_head(h) for h in selected],
                         accs[1], accs[0], *random_summary(rnd), rnd, plan.config.n_test,
                         hits[1].int().tolist()).to_dict()


__all__ = ["FunctionalConfig", "FunctionalResult", "FunctionalRow", "ROW_VERSION",
           "check_tokenizers", "run"]
