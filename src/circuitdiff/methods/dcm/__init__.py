"""DCM (desiderata-based component masking) on a circuit's groups, and functional patching of
the selected heads across models.

For each non-empty group of a :class:`~circuitdiff.core.circuit.Circuit` and each desideratum
(:mod:`.desiderata`), one mask value per head of the group is learned: at the group's position the
head output becomes ``m * base + (1 - m) * counterfactual``; the loss is
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
best accuracy) — the test split only reports. Every selection is compared on the test split with
the unpatched model, the whole group patched, and random head sets of the same size drawn from the
whole head grid without replacement (seeded, as :func:`~circuitdiff.methods.faithfulness.
random_circuits`).

:func:`functional_patching` patches each group's selected heads from the desideratum's
counterfactual in every model (the same prompts, the same heads, each model's own activations)
and measures the target accuracy, with the same random head sets — the paper's "functionality
remains consistent across models" table.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from ...core.circuit import Circuit, CircuitGroup, Head, format_head, parse_head
from ...core.model import LoadedModel
from ...core.runs import RunFolder, model_tag, safe_name
from ...core.task import POSITION_NAMES, EntityTrackingTask, TaskConfig
from ..evaluation import same_tokenizer
from ..faithfulness import random_circuits
from .desiderata import (DESIDERATA, PAPER_DESIDERATA, ROBUSTNESS_DESIDERATA, DesiderataError,
                         Example, TextPrompt, build_examples, check_applicable, check_position,
                         desideratum, encode_examples, resolve_names)
from .masks import (DCMError, counterfactual_values, patched_last_logits, take, target_accuracy,
                    target_hits, train_masks)

__all__ = ["DCMConfig", "DCMError", "DCMResult", "DesideratumResult", "DesiderataError",
           "DESIDERATA", "Example", "FunctionalRow", "PAPER_DESIDERATA", "ROBUSTNESS_DESIDERATA",
           "TextPrompt", "dcm", "desideratum", "functional_patching", "patched_last_logits",
           "prepare", "check_tokenizers"]

#: the paper's values, for reference (the defaults below are scaled for CPU organisms)
PAPER_SPLITS = (1000, 500, 500)
PAPER_LAMBDA = 0.01
DEFAULT_LAMBDAS = (0.001, 0.003, 0.01, 0.03, 0.1)


@dataclass
class DCMConfig:
    """Everything that decides DCM's numbers (also the cache key, minus batch size)."""

    desiderata: tuple[str, ...] = PAPER_DESIDERATA
    n_train: int = 200
    n_val: int = 100
    n_test: int = 100
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    tolerance: float = 0.02
    lr: float = 0.1
    epochs: int = 2
    seed: int = 0
    n_boxes: int = 7
    n_random: int = 10
    random_seed: int = 0
    batch_size: int = 32
    prefix_cache: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.desiderata, str):  # "paper" or "object_value,position"
            self.desiderata = tuple(x.strip() for x in self.desiderata.split(",") if x.strip())
        self.desiderata = tuple(resolve_names(self.desiderata))
        self.lambdas = tuple(float(x) for x in self.lambdas)
        if not self.lambdas:
            raise ValueError("give at least one λ (--lambdas)")
        bad = [x for x in self.lambdas if not x > 0]
        if bad:
            raise ValueError(f"λ must be > 0 (the sparsity penalty λ·Σ(1-m) is what selects "
                             f"heads), got {bad}; pass e.g. --lambdas 0.001,0.01,0.1")
        for name in ("n_train", "n_val", "n_test", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.n_random < 0 or self.tolerance < 0:
            raise ValueError("n_random and tolerance must be >= 0")

    def key(self) -> dict:
        d = asdict(self)
        d.pop("batch_size")
        d.pop("prefix_cache")
        return d


@dataclass
class DesideratumResult:
    """DCM of one group for one desideratum: the λ curve and the chosen selection on test."""

    group: str
    desideratum: str
    position: str
    group_heads: list[str]
    curve: list[dict]                # per λ: n_selected, fraction, val/test accuracy, mask
    chosen_lambda: float
    selected: list[str]
    test_accuracy: float             # selected heads patched
    no_patch: float                  # the model itself (how often it already says the target)
    whole_group: float               # every head of the group patched
    random_mean: float | None
    random_sd: float | None
    random: list[float] = field(default_factory=list)
    n_train: int = 0
    n_val: int = 0
    n_test: int = 0

    @property
    def fraction(self) -> float:
        return len(self.selected) / len(self.group_heads)

    def to_dict(self) -> dict:
        return {**asdict(self), "fraction": self.fraction}

    @classmethod
    def from_dict(cls, d: dict) -> "DesideratumResult":
        return cls(**{k: v for k, v in d.items() if k != "fraction"})


@dataclass
class DCMResult:
    """DCM of every group of a circuit on one model."""

    model: str
    circuit: dict
    config: dict
    rows: list[DesideratumResult]
    empty_groups: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)   # wall time per group (small
                                                              # when loaded from the run folder)

    def selection(self, group: str, desideratum: str) -> DesideratumResult:
        for r in self.rows:
            if (r.group, r.desideratum) == (group, desideratum):
                return r
        raise KeyError(f"no DCM result for group {group!r}, desideratum {desideratum!r}")

    def to_dict(self) -> dict:
        return {"model": self.model, "circuit": self.circuit, "config": self.config,
                "rows": [r.to_dict() for r in self.rows], "empty_groups": self.empty_groups,
                "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict) -> "DCMResult":
        return cls(d["model"], d["circuit"], d["config"],
                   [DesideratumResult.from_dict(r) for r in d["rows"]], d["empty_groups"],
                   d.get("seconds", {}))

    def save(self, folder: RunFolder, name: str = "dcm.json"):
        return folder.save_json(name, self.to_dict())


# -- preparation (tokenizer only: every input error before a model is loaded) ------------------
@dataclass
class DCMPlan:
    """The prompts of every desideratum, encoded, plus the groups DCM will run on."""

    config: DCMConfig
    groups: dict[str, CircuitGroup]         # non-empty groups
    empty_groups: list[str]
    data: dict[str, object]                 # desideratum -> EncodedExamples (train+val+test)
    tokenizer: object = None                # the tokenizer the prompts were encoded with

    def split(self, which: str) -> slice:
        c = self.config
        return {"train": slice(0, c.n_train),
                "val": slice(c.n_train, c.n_train + c.n_val),
                "test": slice(c.n_train + c.n_val, c.n_train + c.n_val + c.n_test)}[which]


def check_groups(circuit: Circuit) -> tuple[dict[str, CircuitGroup], list[str]]:
    """Non-empty groups (DCM-able) and the names of empty ones; a one-head group is an error."""
    groups, empty = {}, []
    for name, g in circuit.groups.items():
        if not g.heads:
            empty.append(name)
            continue
        if len(g.heads) == 1:
            raise ValueError(f"group {name!r} has one head ({format_head(g.heads[0])}): a mask "
                             f"over one head has nothing to select between; patch it directly, "
                             f"or merge it into another group at {g.position}")
        if g.position not in POSITION_NAMES:
            raise ValueError(f"group {name!r} is read at {g.position!r}; DCM patches one "
                             f"per-prompt position ({', '.join(POSITION_NAMES)})")
        groups[name] = g
    if not groups:
        raise ValueError("every group of the circuit is empty: nothing to mask")
    return groups, empty


def dcm_view(circuit: Circuit) -> tuple[Circuit, list[str]]:
    """The part of ``circuit`` DCM can train on, and a note for everything it changed.

    DCM patches heads at one per-prompt position and needs at least two heads to select
    between. Groups read at several positions per prompt (``labels``, ``separators`` …) are left
    out; a one-head group is merged into the largest other group at its position (DCM then says
    which of the merged heads carries what), or left out when it is alone there.
    """
    groups: dict[str, CircuitGroup] = {}
    notes: list[str] = []
    for name, g in circuit.groups.items():
        if not g.heads:
            continue
        if g.position not in POSITION_NAMES:
            notes.append(f"{name} is read at {g.position} (several positions per prompt): not "
                         f"trained")
            continue
        groups[name] = g
    for name, g in list(groups.items()):
        if len(g.heads) != 1 or name not in groups:
            continue
        mates = [n for n, o in groups.items() if n != name and o.position == g.position]
        if not mates:
            notes.append(f"{name} is one head ({format_head(g.heads[0])}) alone at "
                         f"{g.position}: not trained")
            del groups[name]
            continue
        into = max(mates, key=lambda n: len(groups[n].heads))
        host = groups.pop(into)
        del groups[name]
        merged = f"{into}+{name}"
        groups[merged] = CircuitGroup(host.heads + g.heads, g.position,
                                      f"{host.function or into} + {g.function or name}")
        notes.append(f"{name} (one head, {format_head(g.heads[0])}) merged into {into} as "
                     f"{merged}")
    view = Circuit(groups, circuit.n_layers, circuit.n_heads, circuit.model,
                   {**circuit.settings, "dcm_view": notes}, [])
    return view, notes


def prepare(tokenizer, circuit: Circuit, config: DCMConfig) -> DCMPlan:
    """Check the circuit and desiderata against the task and encode all examples."""
    groups, empty = check_groups(circuit)
    task = EntityTrackingTask(tokenizer, TaskConfig(n_boxes=config.n_boxes), seed=config.seed)
    check_applicable(config.desiderata, task)
    n = config.n_train + config.n_val + config.n_test
    base = task.sample(n, seed=config.seed)
    data = {}
    for name in config.desiderata:
        enc = encode_examples(name, build_examples(task, name, base, config.seed), tokenizer)
        for g in groups.values():
            check_position(enc, g.position)
        data[name] = enc
    return DCMPlan(config, groups, empty, data, tokenizer)


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


# -- DCM --------------------------------------------------------------------------------------
def _families(plan: DCMPlan) -> list[list[str]]:
    """Desiderata whose base prompts are identical train together (one forward, mask rows)."""
    fams: list[list[str]] = []
    for name in plan.config.desiderata:
        b = plan.data[name].base
        for fam in fams:
            ref = plan.data[fam[0]].base
            if ref.input_ids.shape == b.input_ids.shape and torch.equal(ref.input_ids, b.input_ids):
                fam.append(name)
                break
        else:
            fams.append([name])
    return fams


def choose_lambda(lambdas: Sequence[float], val_accuracy: Sequence[float],
                  tolerance: float) -> int:
    """Index of the largest λ whose validation accuracy is within ``tolerance`` of the best."""
    best = max(val_accuracy)
    ok = [i for i, a in enumerate(val_accuracy) if a >= best - tolerance]
    return max(ok, key=lambda i: lambdas[i])


def random_head_sets(size: int, n_layers: int, n_heads: int, n_draws: int,
                     seed: int) -> list[list[Head]]:
    """``n_draws`` sets of ``size`` distinct heads from the whole grid, seeded and without
    replacement — the sampler of :func:`~circuitdiff.methods.faithfulness.random_circuits`."""
    if size == 0 or n_draws == 0:
        return []
    grid = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    shape = Circuit({"heads": CircuitGroup(grid[:size], "last")}, n_layers, n_heads)
    return [c.groups["heads"].heads for c in random_circuits(shape, n_draws, seed)]


def _heads_rows(union: list[Head], sets: Sequence[Sequence[Head]]) -> torch.Tensor:
    """Mask rows over ``union``: 0 on the heads of each set (patched), 1 elsewhere."""
    slot = {h: i for i, h in enumerate(union)}
    rows = torch.ones(len(sets), len(union))
    for r, s in enumerate(sets):
        rows[r, [slot[h] for h in s]] = 0.0
    return rows


def _eval_hits(loaded: LoadedModel, plan: DCMPlan, group: CircuitGroup, name: str,
               sets: Sequence[Sequence[Head]], split: str) -> torch.Tensor:
    """Per-prompt target hits ``[len(sets), N]`` of ``desideratum`` on ``split`` with each head
    set patched."""
    union = list(dict.fromkeys(h for s in sets for h in s)) or list(group.heads[:1])
    enc = plan.data[name]
    sl = plan.split(split)
    vals = counterfactual_values(loaded, take(enc.counterfactual, sl), group.position, union,
                                 plan.config.batch_size)
    return target_hits(loaded, take(enc.base, sl), group.position, union, vals[None],
                       enc.targets[sl][None], _heads_rows(union, sets),
                       torch.zeros(len(sets), dtype=torch.long), plan.config.batch_size,
                       plan.config.prefix_cache)


def _eval_sets(loaded: LoadedModel, plan: DCMPlan, group: CircuitGroup, name: str,
               sets: Sequence[Sequence[Head]], split: str) -> list[float]:
    """Target accuracy of ``desideratum`` on ``split`` with each head set patched."""
    return _eval_hits(loaded, plan, group, name, sets, split).float().mean(1).tolist()


def _shared_reads(loaded: LoadedModel, counterfactuals: Sequence, position: str,
                  heads: Sequence[Head], batch_size: int) -> list[torch.Tensor]:
    """:func:`counterfactual_values` of each batch, read once per distinct batch (the paper's
    three desiderata share their counterfactual prompts)."""
    out: list[torch.Tensor] = []
    for i, cf in enumerate(counterfactuals):
        same = next((j for j in range(i) if counterfactuals[j].input_ids.shape == cf.input_ids.shape
                     and torch.equal(counterfactuals[j].input_ids, cf.input_ids)
                     and torch.equal(counterfactuals[j].positions[position],
                                     cf.positions[position])), None)
        out.append(out[same] if same is not None else
                   counterfactual_values(loaded, cf, position, heads, batch_size))
    return out


def _dcm_group(loaded: LoadedModel, plan: DCMPlan, name: str, group: CircuitGroup,
               progress: bool = False) -> list[DesideratumResult]:
    cfg = plan.config
    heads = list(group.heads)
    arch = loaded.arch
    out: list[DesideratumResult] = []
    for fam in _families(plan):
        encs = [plan.data[d] for d in fam]
        tr = plan.split("train")
        base_train = take(encs[0].base, tr)
        vals = {s: torch.stack(_shared_reads(loaded, [take(e.counterfactual, plan.split(s))
                                                      for e in encs], group.position, heads,
                                             cfg.batch_size)) for s in ("train", "val", "test")}
        tgts = {s: torch.stack([e.targets[plan.split(s)] for e in encs])
                for s in ("train", "val", "test")}
        masks = train_masks(loaded, base_train, group.position, heads, vals["train"],
                            tgts["train"], cfg.lambdas, cfg.lr, cfg.epochs, cfg.batch_size,
                            cfg.seed, cfg.prefix_cache, label=f"group {name} ({', '.join(fam)})")
        D = len(fam)
        flat = (masks >= 0.5).float().view(-1, len(heads))          # 1 = kept, 0 = selected
        kinds = torch.arange(flat.shape[0]) % D
        acc = {s: target_accuracy(loaded, take(encs[0].base, plan.split(s)), group.position,
                                  heads, vals[s], tgts[s], flat, kinds, cfg.batch_size,
                                  cfg.prefix_cache).view(len(cfg.lambdas), D)
               for s in ("val", "test")}
        for d, dname in enumerate(fam):
            curve = []
            for i, lam in enumerate(cfg.lambdas):
                sel = [format_head(h) for h, keep in zip(heads, flat.view(-1, D, len(heads))[i, d])
                       if keep == 0]
                curve.append({"lambda": lam, "n_selected": len(sel),
                              "fraction": len(sel) / len(heads), "selected": sel,
                              "val_accuracy": float(acc["val"][i, d]),
                              "test_accuracy": float(acc["test"][i, d]),
                              "mask": [round(float(x), 4) for x in masks[i, d]]})
            pick = choose_lambda(cfg.lambdas, [c["val_accuracy"] for c in curve], cfg.tolerance)
            selected = [parse_head(h) for h in curve[pick]["selected"]]
            randoms = random_head_sets(len(selected), arch.n_layers, arch.n_heads, cfg.n_random,
                                       cfg.random_seed)
            test = _eval_sets(loaded, plan, group, dname, [[], heads] + randoms, "test")
            rnd = test[2:]
            out.append(DesideratumResult(
                name, dname, group.position, [format_head(h) for h in heads], curve,
                cfg.lambdas[pick], [format_head(h) for h in selected],
                curve[pick]["test_accuracy"], test[0], test[1],
                statistics.fmean(rnd) if rnd else None,
                statistics.stdev(rnd) if len(rnd) > 1 else (0.0 if rnd else None), rnd,
                cfg.n_train, cfg.n_val, cfg.n_test))
            if progress:
                r = out[-1]
                print(f"  {name} / {dname}: λ={r.chosen_lambda:g} selects {len(r.selected)}/"
                      f"{len(heads)}, target acc {r.test_accuracy:.2f} (random "
                      f"{'-' if r.random_mean is None else f'{r.random_mean:.2f}'}, whole group "
                      f"{r.whole_group:.2f}, no patch {r.no_patch:.2f})", flush=True)
    return out


@contextlib.contextmanager
def frozen_weights(model: torch.nn.Module):
    """Every parameter with ``requires_grad=False`` for the block (restored after): gradients
    flow only into the masks."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def dcm(loaded: LoadedModel, circuit: Circuit, config: DCMConfig | None = None,
        folder: RunFolder | None = None, plan: DCMPlan | None = None,
        progress: bool = False) -> DCMResult:
    """DCM of every non-empty group of ``circuit`` on ``loaded`` (one result row per group and
    desideratum). With ``folder``, each group is cached under ``dcm/<model>/<group>.json`` keyed
    by the model, the group and the config, so a rerun resumes. ``plan`` may pass the prompts
    already prepared (:func:`prepare`) from the tokenizer."""
    if plan is not None and config is not None and plan.config.key() != config.key():
        raise ValueError("the prepared plan was made with another DCM config than the one given")
    config = plan.config if plan is not None else (config or DCMConfig())
    circuit.validate(loaded.arch)
    plan = plan or prepare(loaded.tokenizer, circuit, config)
    rows: list[DesideratumResult] = []
    seconds: dict[str, float] = {}
    dtype = str(next(loaded.model.parameters()).dtype)
    with frozen_weights(loaded.model):
        for name, group in plan.groups.items():
            t0 = time.perf_counter()
            compute = lambda: [r.to_dict() for r in _dcm_group(  # noqa: E731
                loaded, plan, name, group, progress)]
            if folder is None:
                got = compute()
            else:
                settings = {"model": loaded.name, "dtype": dtype, "group": name,
                            "position": group.position,
                            "heads": [format_head(h) for h in group.heads], **config.key()}
                got = folder.cached(f"dcm/{model_tag(loaded.name)}/{safe_name(name)}.json",
                                    settings, compute)
            seconds[name] = round(time.perf_counter() - t0, 2)
            rows += [DesideratumResult.from_dict(d) for d in got]
    return DCMResult(loaded.name, circuit.to_dict(), config.key(), rows, plan.empty_groups,
                     seconds)


# -- functional patching across models --------------------------------------------------------
@dataclass
class FunctionalRow:
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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FunctionalRow":
        return cls(**d)


def functional_patching(result: DCMResult, plan: DCMPlan, models: Sequence[str],
                        load: Callable[[str], LoadedModel], folder: RunFolder | None = None,
                        progress: bool = False) -> list[FunctionalRow]:
    """Every (group, desideratum) selection of ``result`` patched in every model of ``models``.

    Models are loaded one at a time (and must share the tokenizer of ``plan``'s prompts); the
    test split of the plan is used, each model reading its own counterfactual activations.
    Each (model, group, desideratum) is cached in ``folder`` under ``functional/<model>/``.
    """
    cfg = plan.config
    rows: list[FunctionalRow] = []
    picks = [r for r in result.rows if r.selected]
    for spec in models:
        loaded = load(spec)
        Circuit.from_dict(result.circuit).validate(loaded.arch)
        if plan.tokenizer is not None and not same_tokenizer(plan.tokenizer, loaded.tokenizer):
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
            if folder is None:
                d = compute()
            else:
                settings = {"row_version": 2,  # 2: rows carry per-prompt hits
                            "model": loaded.name, "dcm_model": result.model, "group": r.group,
                            "desideratum": r.desideratum, "selected": r.selected,
                            "position": group.position, **cfg.key()}
                d = folder.cached(f"functional/{model_tag(loaded.name)}/{safe_name(r.group)}__"
                                  f"{safe_name(r.desideratum)}.json", settings, compute)
            rows.append(FunctionalRow.from_dict(d))
            if progress:
                x = rows[-1]
                print(f"  {x.model}: {x.group} / {x.desideratum} ({len(x.selected)} heads) "
                      f"target acc {x.accuracy:.2f} (random "
                      f"{'-' if x.random_mean is None else f'{x.random_mean:.2f}'}, no patch "
                      f"{x.no_patch:.2f})", flush=True)
        del loaded
        gc.collect()
    return rows


def _functional_row(loaded: LoadedModel, plan: DCMPlan, group: str, desideratum: str,
                    selected: list[Head], randoms: list[list[Head]]) -> dict:
    """Target accuracy on the test split: unpatched, ``selected`` patched, each random set."""
    hits = _eval_hits(loaded, plan, plan.groups[group], desideratum, [[], selected] + randoms,
                      "test")
    accs = hits.float().mean(1).tolist()
    rnd = accs[2:]
    return FunctionalRow(loaded.name, group, desideratum, [format_head(h) for h in selected],
                         accs[1], accs[0], statistics.fmean(rnd) if rnd else None,
                         statistics.stdev(rnd) if len(rnd) > 1 else (0.0 if rnd else None), rnd,
                         plan.config.n_test, hits[1].int().tolist()).to_dict()
