"""DCM of a circuit's groups on one model: :func:`run`.

For each group DCM can train on (:func:`dcm_view`) and each desideratum, one mask per head is
trained for every λ of the sweep (:mod:`.masks`); the λ is chosen on validation, and the
selection is compared on test with the unpatched model, the whole group and random head sets of
its size. A selection *counts* (``found``) only if its validation target accuracy beats both no
patching and the random head sets with a bootstrap interval over the validation prompts;
otherwise its row says "no function found" and functional patching skips it.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from ...core.circuit import Circuit, CircuitGroup, Head, format_head, parse_head
from ...core.model import LoadedModel
from ...core.runs import RunFolder, model_tag, safe_name, settings_digest, split_pieces
from ...core.stats import difference_interval, format_interval, sub_seed
from ...core.task import POSITION_NAMES, EntityTrackingTask, Prompt, TaskConfig
from ..base import Result, as_store
from ..faithfulness import random_circuits
from .config import DCMConfig
from .desiderata import build_examples, check_applicable, check_position, encode_examples
from .masks import counterfactual_values, take, target_accuracy, target_hits, train_masks

NO_FUNCTION = "no function found"


@dataclass
class DesideratumResult(Result):
    """DCM of one group for one desideratum: the λ curve, the chosen selection on test, and
    whether it counts (``found``; ``reason`` says why not)."""

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
    found: bool = False              # beats no patch and random heads on validation (intervals)
    reason: str = ""                 # why not found ("" when found)
    val_vs_no_patch: list[float] | None = None   # interval of val acc(selected) - acc(no patch)
    val_vs_random: list[float] | None = None     # interval of val acc(selected) - acc(random)
    #: calibration of the found rule: how many of the ``random_draws`` random head sets of the
    #: selection's size it would accept, each judged against the others (None: not measured)
    random_found: int | None = None
    random_draws: int = 0

    @property
    def fraction(self) -> float:
        return len(self.selected) / len(self.group_heads)

    def to_dict(self) -> dict:
        return {**asdict(self), "fraction": self.fraction}


@dataclass
class DCMResult(Result):
    """DCM of every trainable group of a circuit on one model; ``notes`` says what
    :func:`dcm_view` changed (merged or left-out groups)."""

    model: str
    circuit: dict
    config: dict
    rows: list[DesideratumResult]
    empty_groups: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)   # wall time per group (small
                                                              # when loaded from the run folder)
    notes: list[str] = field(default_factory=list)

    def selection(self, group: str, desideratum: str) -> DesideratumResult:
        for r in self.rows:
            if (r.group, r.desideratum) == (group, desideratum):
                return r
        raise KeyError(f"no DCM result for group {group!r}, desideratum {desideratum!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "DCMResult":
        return cls(d["model"], d["circuit"], d["config"],
                   [DesideratumResult.from_dict(r) for r in d["rows"]], d.get("empty_groups", []),
                   d.get("seconds", {}), d.get("notes", []))


# -- which groups DCM trains on ----------------------------------------------------------------
def dcm_view(circuit: Circuit) -> tuple[Circuit, list[str]]:
    """The part of ``circuit`` DCM can train on, and a note for everything it changed.

    DCM patches heads at one per-prompt position and needs at least two heads to select
    between. Groups read at several positions per prompt (``labels``, ``separators`` …) are left
    out; a one-head group is merged into the largest other group at its position (DCM then says
    which of the merged heads carries what), or left out when it is alone there. The one rule
    set: :func:`run` applies it, so the CLI and the study accept the same circuits.
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


# -- preparation (tokenizer only: every input error before a model is loaded) ------------------
@dataclass
class DCMPlan:
    """The prompts of every desideratum, encoded, plus the groups DCM will run on."""

    config: DCMConfig
    groups: dict[str, CircuitGroup]         # trainable groups (after dcm_view)
    empty_groups: list[str]
    data: dict[str, object]                 # desideratum -> EncodedExamples (train+val+test)
    tokenizer: object = None                # the tokenizer the prompts were encoded with
    notes: list[str] = field(default_factory=list)
    prompts_digest: str | None = None       # digest of explicit base prompts (None: drawn)

    def split(self, which: str) -> slice:
        c = self.config
        return {"train": slice(0, c.n_train),
                "val": slice(c.n_train, c.n_train + c.n_val),
                "test": slice(c.n_train + c.n_val, c.n_train + c.n_val + c.n_test)}[which]


def _circuit(config: DCMConfig) -> Circuit:
    if config.circuit is None:
        raise ValueError("DCMConfig.circuit is not set: give the circuit whose groups DCM "
                         "trains on (DCMConfig(circuit=Circuit.load(path)))")
    return config.circuit


def prepare(tokenizer, config: DCMConfig, prompts: Sequence[Prompt] | None = None) -> DCMPlan:
    """Check the circuit (:func:`dcm_view`; nothing trainable is an error) and the desiderata
    against the task, and encode all examples. ``prompts``: the base prompts (at least
    ``n_train + n_val + n_test``; default drawn from the task with ``config.seed``)."""
    circuit = _circuit(config)
    view, notes = dcm_view(circuit)
    if not view.groups:
        raise ValueError("nothing in the circuit DCM can train on: " + ("; ".join(notes) or
                         "every group is empty"))
    task = EntityTrackingTask(tokenizer, TaskConfig(n_boxes=config.n_boxes), seed=config.seed)
    check_applicable(config.desiderata, task)
    n = config.n_train + config.n_val + config.n_test
    digest = None
    if prompts is None:
        base = task.sample(n, seed=config.seed)
    else:
        if len(prompts) < n:
            raise ValueError(f"DCM needs n_train + n_val + n_test = {n} base prompts, got "
                             f"{len(prompts)}")
        base = list(prompts)[:n]
        digest = settings_digest([p.to_dict() for p in base])
    data = {}
    for name in config.desiderata:
        enc = encode_examples(name, build_examples(task, name, base, config.seed), tokenizer)
        for g in view.groups.values():
            check_position(enc, g.position)
        data[name] = enc
    empty = [name for name, g in circuit.groups.items() if not g.heads]
    return DCMPlan(config, dict(view.groups), empty, data, tokenizer, notes, digest)


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


def eval_hits(loaded: LoadedModel, plan: DCMPlan, group: CircuitGroup, name: str,
              sets: Sequence[Sequence[Head]], split: str) -> torch.Tensor:
    """Per-prompt target hits ``[len(sets), N]`` of desideratum ``name`` on ``split`` with each
    head set patched (from each prompt's counterfactual, at the group's position)."""
    union = list(dict.fromkeys(h for s in sets for h in s)) or list(group.heads[:1])
    enc = plan.data[name]
    sl = plan.split(split)
    vals = counterfactual_values(loaded, take(enc.counterfactual, sl), group.position, union,
                                 plan.config.batch_size)
    return target_hits(loaded, take(enc.base, sl), group.position, union, vals[None],
                       enc.targets[sl][None], _heads_rows(union, sets),
                       torch.zeros(len(sets), dtype=torch.long), plan.config.batch_size,
                       plan.config.prefix_cache)


def random_summary(accuracies: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample sd of the random head sets' accuracies (sd 0 for one, None for none)."""
    rnd = list(accuracies)
    return (statistics.fmean(rnd) if rnd else None,
            statistics.stdev(rnd) if len(rnd) > 1 else (0.0 if rnd else None))


def found_gate(val_hits: torch.Tensor, config: DCMConfig, label: str
               ) -> tuple[bool, str, list[float] | None, list[float] | None]:
    """Does a selection count? ``val_hits`` ``[2 + R, n_val]``: no patch, the selection, then
    the R random head sets, on validation. Found when the bootstrap intervals (over validation
    prompts, paired) of acc(selected) − acc(no patch) and acc(selected) − acc(random, the mean
    over the sets per prompt) both lie above 0. Returns (found, reason, both intervals)."""
    none, sel = val_hits[0].float(), val_hits[1].float()
    seed = sub_seed(config.seed, f"dcm-found:{label}")
    vs_none = difference_interval(sel.tolist(), none.tolist(), config.bootstrap, seed,
                                  config.confidence)
    vs_rnd = None
    if val_hits.shape[0] > 2:
        rnd = val_hits[2:].float().mean(0)
        vs_rnd = difference_interval(sel.tolist(), rnd.tolist(), config.bootstrap, seed,
                                     config.confidence)
    pct = f"{config.confidence:.0%}"
    fails = []
    if not (vs_none and vs_none[0] > 0):
        fails.append(f"not above no patching ({sel.mean():.2f} vs {none.mean():.2f}, Δ {pct} "
                     f"{format_interval(vs_none, '-')})")
    if vs_rnd is None:
        fails.append("no random head sets to compare with (n_random 0)")
    elif not vs_rnd[0] > 0:
        fails.append(f"not above random heads of its size ({sel.mean():.2f} vs "
                     f"{float(val_hits[2:].float().mean()):.2f}, Δ {pct} "
                     f"{format_interval(vs_rnd, '-')})")
    reason = "" if not fails else f"{NO_FUNCTION}: on validation, " + "; ".join(fails)
    return not fails, reason, vs_none, vs_rnd


def random_gate_calibration(val_hits: torch.Tensor, config: DCMConfig, label: str
                            ) -> tuple[int | None, int]:
    """The found rule's false-positive count: each random head set of ``val_hits`` (rows
    ``2 …``, as :func:`found_gate` takes them) plays the selection, the other random sets its
    random null. Returns (how many would count as a function, how many were judged); (None, 0)
    with fewer than two random sets (a lone set has no random null)."""
    rows = val_hits.shape[0] - 2
    if rows < 2:
        return None, 0
    found = 0
    for j in range(rows):
        others = [2 + i for i in range(rows) if i != j]
        found += found_gate(val_hits[[0, 2 + j] + others], config, f"{label}/random{j}")[0]
    return found, rows


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
            test = eval_hits(loaded, plan, group, dname, [[], heads] + randoms,
                             "test").float().mean(1).tolist()
            rnd = test[2:]
            if selected:  # validation hits: the found gate and its calibration
                val = eval_hits(loaded, plan, group, dname, [[], selected] + randoms, "val")
                gate = found_gate(val, cfg, f"{name}/{dname}")
                calibration = random_gate_calibration(val, cfg, f"{name}/{dname}")
            else:
                gate = (False, f"{NO_FUNCTION}: no head selected", None, None)
                calibration = (None, 0)
            out.append(DesideratumResult(
                name, dname, group.position, [format_head(h) for h in heads], curve,
                cfg.lambdas[pick], [format_head(h) for h in selected],
                curve[pick]["test_accuracy"], test[0], test[1], *random_summary(rnd), rnd,
                cfg.n_train, cfg.n_val, cfg.n_test, *gate, *calibration))
            if progress:
                r = out[-1]
                print(f"  {name} / {dname}: λ={r.chosen_lambda:g} selects {len(r.selected)}/"
                      f"{len(heads)}, target acc {r.test_accuracy:.2f} (random "
                      f"{'-' if r.random_mean is None else f'{r.random_mean:.2f}'}, whole group "
                      f"{r.whole_group:.2f}, no patch {r.no_patch:.2f})"
                      + ("" if r.found else f"; {r.reason}"), flush=True)
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


def run(loaded: LoadedModel, prompts: Sequence[Prompt] | None, config: DCMConfig, *,
        store: RunFolder | str | None = None, progress: bool | None = None) -> DCMResult:
    """DCM of every trainable group of ``config.circuit`` on ``loaded`` (one row per group and
    desideratum).

    :func:`dcm_view` decides the groups (one-head groups merged, multi-position groups left
    out; its notes are on the result, and a circuit with nothing trainable gives no rows).
    ``prompts``: the base prompts, or None to draw them from the task (``config.seed``). With
    ``store``, each group is cached under ``dcm/<model>/<group>.json`` keyed by the model, the
    group's heads and position, and :meth:`DCMConfig.group_key`, so a rerun resumes.
    """
    store = as_store(store)
    circuit = _circuit(config)
    circuit.validate(loaded.arch)
    view, notes = dcm_view(circuit)
    empty = [name for name, g in circuit.groups.items() if not g.heads]
    if not view.groups:
        return DCMResult(loaded.name, circuit.to_dict(), config.cache_key(), [], empty, {}, notes)
    plan = prepare(loaded.tokenizer, config, prompts)
    dtype = str(next(loaded.model.parameters()).dtype)
    groups = list(plan.groups.items())
    folder = f"dcm/{model_tag(loaded.name)}/"

    def one_group(i: int, store: RunFolder | None) -> tuple[list[dict], float]:
        name, group = groups[i]
        t0 = time.perf_counter()
        compute = lambda: [r.to_dict() for r in _dcm_group(  # noqa: E731
            loaded, plan, name, group, bool(progress))]
        if store is None:
            got = compute()
        else:
            settings = {"model": loaded.name, "dtype": dtype, "group": name,
                        "position": group.position,
                        "heads": [format_head(h) for h in group.heads], **config.group_key()}
            if plan.prompts_digest is not None:
                settings["prompts"] = plan.prompts_digest
            got = store.cached(f"{folder}{safe_name(name)}.json", settings, compute)
        return got, round(time.perf_counter() - t0, 2)

    with frozen_weights(loaded.model):
        # under torchrun each rank trains its share of the groups; rows come back in group order
        done = split_pieces(store, len(groups), one_group, cached_under=[folder])
    rows = [DesideratumResult.from_dict(d) for got, _ in done for d in got]
    seconds = {name: s for (name, _), (_, s) in zip(groups, done)}
    return DCMResult(loaded.name, circuit.to_dict(), config.cache_key(), rows, plan.empty_groups,
                     seconds, notes)


__all__ = ["DCMPlan", "DCMResult", "DesideratumResult", "NO_FUNCTION", "choose_lambda",
           "dcm_view", "eval_hits", "found_gate", "frozen_weights", "prepare",
           "random_gate_calibration", "random_head_sets",
           "random_summary", "run"]
