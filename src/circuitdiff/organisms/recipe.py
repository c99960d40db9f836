"""The recipe that trains the four model organisms from scratch on CPU.

* **base**  ("Llama"):  a small GQA ``LlamaForCausalLM`` pre-trained from scratch on the synthetic
  base corpus (entity tracking in the evaluation wording with 2-5 boxes, one query per context,
  plus prose). Binding sits behind a long loss plateau; what got this model out of it (measured,
  see ``experiments/organism_plateau``): lr 1e-3 (3e-3 never left it), 2-box contexts first, and
  a loss on the query answers alone until binding has formed (a 0.1 weight on the other tokens
  kept a 2-box probe at chance for 4750 steps). The base never sees 6 or 7 boxes, which is what
  keeps its 7-box accuracy "not great".
* **lora**  ("Goat"):   a peft LoRA adapter (q/k/v/o) on the base, trained on the auxiliary corpus
  (loss weight 1 on the query answers, 0.1 on every other token).
* **full**  ("FLoat"):  full fine-tune of the base on the same auxiliary corpus, same loss.
* **chat**  ("Vicuna"): full fine-tune of the base on unrelated chat text.

The auxiliary corpus never contains the evaluation template (see :mod:`.data`). Everything is
seeded; the data stream of each stage is a pure function of (seed, stage, step). The command is
``circuitdiff organisms train --out DIR --seed 0``.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from circuitdiff.core.runs import atomic_write_text, environment
from circuitdiff.organisms import ORGANISMS
from circuitdiff.organisms import data as D
from circuitdiff.organisms.config import ModelSpec, Phase, Recipe, StageSpec, scaled
from circuitdiff.organisms.evaluate import accuracy
from circuitdiff.organisms.models import (make_model, reload_model, save_adapter, save_model,
                                          set_seed)
from circuitdiff.organisms.phases import train_phases
from circuitdiff.organisms.race import race_bind
from circuitdiff.organisms.stages import train_stage

class RecipeFailed(RuntimeError):
    """A stage missed its target after every allowed attempt; ``summary`` says which and by how much."""

    def __init__(self, failures: list[str], summary: dict):
        super().__init__("organism recipe failed: " + "; ".join(failures))
        self.failures = failures
        self.summary = summary


class _Record:
    """What a recipe run has measured so far, written to ``train_summary.json`` at its end (or
    at the failure that ends it)."""

    def __init__(self, out: Path, recipe: Recipe, settings: dict, progress: bool):
        self.out, self.recipe, self.settings, self.progress = out, recipe, settings, progress
        self.acc: dict[str, float] = {}
        self.times: dict[str, float] = {}
        self.attempts: dict[str, list[dict]] = {}
        self.t_start = time.time()
        self.where = environment()

    def summary(self, failures: list[str]) -> dict:
        """Write and return the summary (``"ok"``: no failures)."""
        s = self.settings
        doc = {"ok": not failures, "failures": failures, "seed": s["seed"],
               "threads": s["threads"], "scale": s["scale"], "base_from": s["base_from"],
               "eval_n": s["eval_n"], "eval_seed": self.recipe.eval_seed, "accuracy": self.acc,
               "seconds": {k: round(v, 1) for k, v in self.times.items()},
               "minutes_total": round((time.time() - self.t_start) / 60, 1),
               "attempts": self.attempts, "recipe": self.recipe.to_dict(),
               "environment": self.where}
        atomic_write_text(self.out / "train_summary.json", json.dumps(doc, indent=2))
        return doc

    def fail(self, reason: str):
        """Record the failure and raise :class:`RecipeFailed`."""
        doc = self.summary([reason])
        if self.progress:
            print(f"recipe FAILED: {reason} (see {self.out / 'train_summary.json'})")
        raise RecipeFailed([reason], doc)


def train_all(out_dir, seed: int = 0, progress: bool = True, scale: float = 1.0,
              recipe: Recipe | None = None, model_spec: ModelSpec | None = None,
              eval_n: int | None = None, base_from=None, threads: int = 2,
              check_targets: bool = True) -> dict[str, float]:
    """Train base, lora, full and chat into ``out_dir/{base,lora,full,chat}``.

    The base pre-trains through gated phases (:func:`~.phases.train_phases`); after each stage
    its 7-box accuracy on ``eval_n`` prompts (seed ``recipe.eval_seed``) is checked against
    ``recipe.targets``. A base whose binding gate never passes is retrained from the next
    sub-seed (``recipe.base_attempts`` in all), a fine-tune that misses its target likewise
    (``recipe.stage_attempts``); every attempt is recorded in ``train_summary.json``. When a
    target is still missed the summary says ``"ok": false`` with the reasons and
    :class:`RecipeFailed` is raised — a run never looks like a success when it is not.

    ``scale`` multiplies every stage's number of steps; ``model_spec`` overrides the model size
    (both only for smoke tests, which pass ``check_targets=False``: the shipped organisms use the
    defaults). ``base_from`` reuses an already trained base folder. ``threads``: torch CPU threads
    (recorded; float reductions differ with the thread count, the gates absorb that).
    Returns the 7-box accuracy of each organism.
    """
    threads = max(1, min(2, threads))
    torch.set_num_threads(threads)
    recipe = scaled(recipe or Recipe(), scale)
    if model_spec is not None:
        recipe = replace(recipe, model=model_spec)
    eval_n = recipe.eval_n if eval_n is None else eval_n
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = D.build_tokenizer()
    run = _Record(out, recipe, {"seed": seed, "threads": threads, "scale": scale,
                                "base_from": None if base_from is None else str(base_from),
                                "eval_n": eval_n}, progress)
    evaluate = lambda m: accuracy(m, tok, eval_n, recipe.eval_seed)  # noqa: E731
    probe_n = min(recipe.probe_n, eval_n) if model_spec is not None else recipe.probe_n
    probe = lambda m, boxes: accuracy(m, tok, probe_n, recipe.probe_seed,  # noqa: E731
                                      n_boxes=boxes)

    t0 = time.time()
    if base_from is not None:
        run.attempts["base"] = []
        base = reload_model(Path(base_from))
    else:
        base = _train_base(run, tok, seed, probe, probe_n, check_targets)
    if base_from is None or Path(base_from).resolve() != (out / "base").resolve():
        save_model(base, tok, out / "base")
    run.acc["base"] = evaluate(base)
    run.times["base"] = time.time() - t0
    if check_targets and (reason := recipe.targets.missed("base", run.acc["base"], None)):
        run.fail(reason)
    del base

    _train_finetunes(run, tok, seed, evaluate, check_targets)
    run.summary([])
    if progress:
        for k in ORGANISMS:
            print(f"{k:5s} 7-box accuracy ({eval_n} prompts, seed {recipe.eval_seed}): "
                  f"{run.acc[k]:.3f}   [{run.times[k]:.0f} s]")
    return {k: run.acc[k] for k in ORGANISMS}


def _train_base(run: _Record, tok, seed: int, probe, probe_n: int, check_targets: bool):
    """Gated pre-training of the base; a new sub-seed (or race of sub-seeds) when binding never
    forms. Returns the base, or records the failure and raises :class:`RecipeFailed`."""
    recipe, progress = run.recipe, run.progress
    t0 = time.time()
    attempts = run.attempts["base"] = []
    first, rest = recipe.base_phases[0], recipe.base_phases[1:]
    race = recipe.bind_race if first.gate is not None else 1
    for attempt in range(recipe.base_attempts):
        subs = [seed * 10 + 1 + 100 * (attempt * race + lane) for lane in range(race)]
        entry: dict = {}
        if race > 1:
            base, opt_state, bind, entry["race"] = race_bind(
                tok, recipe.model, first, subs, probe_n, recipe.probe_seed, progress,
                stop_on_failure=check_targets)
            sub_seed = subs[next((i for i, r in enumerate(entry["race"]) if r["won"]), 0)]
            phases = [bind]
            if not (check_targets and bind["failed"]):
                phases += train_phases(base, tok, rest, sub_seed, probe, progress,
                                       stop_on_failure=check_targets, step0=bind["steps"],
                                       optimizer_state=opt_state)
        else:
            sub_seed = subs[0]
            base = make_model(tok, recipe.model, sub_seed)
            phases = train_phases(base, tok, recipe.base_phases, sub_seed, probe, progress,
                                  stop_on_failure=check_targets)
        failed = [p for p in phases if check_targets and p["failed"]]
        attempts.append({"sub_seed": sub_seed, **entry, "phases": phases,
                         "seconds": round(time.time() - t0, 1)})
        if not failed:
            return base
        p = failed[0]
        last = p["probes"][-1] if p["probes"] else {}
        g = _phase(recipe, p).gate
        measured = last.get(f"acc{g.boxes}", float("nan"))
        reason = (f"base phase {p['phase']!r}: {g.boxes}-box accuracy {measured:.3f} < "
                  + (f"{g.floor} at step {p['stalled_at']} (stalled)" if p["stalled_at"]
                     else f"{g.threshold} after {p['steps']} steps")
                  + (f" (sub-seed {sub_seed})" if race == 1 or p is not phases[0] else
                     f" (sub-seeds {', '.join(map(str, subs))} raced)"))
        attempts[-1]["missed"] = reason
        if progress:
            print(f"{reason}; " + ("retrying with the next sub-seed"
                                   if attempt + 1 < recipe.base_attempts else "giving up"))
    run.times["base"] = time.time() - t0
    run.fail(attempts[-1]["missed"] + f"; {recipe.base_attempts} attempts")


def _train_finetunes(run: _Record, tok, seed: int, evaluate, check_targets: bool) -> None:
    """The full fine-tune on auxiliary data (FLoat), LoRA on it (Goat), the chat full fine-tune
    (Vicuna), each from the saved base; one that misses its target is retrained from the next
    sub-seed, and still missing it records the failure and raises :class:`RecipeFailed`."""
    from peft import LoraConfig, get_peft_model

    recipe, progress, out = run.recipe, run.progress, run.out
    aux_docs = lambda n, s, f: D.aux_corpus(n, s)  # noqa: E731
    chat_docs = lambda n, s, f: D.chat_corpus(n, s)  # noqa: E731

    def train_full(sub_seed: int, spec: StageSpec, docs, folder: Path):
        model = reload_model(out / "base")
        train_stage(model, tok, docs, spec, sub_seed, folder.name, progress)
        save_model(model, tok, folder)
        return model

    def train_lora(sub_seed: int, spec: StageSpec, docs, folder: Path):
        set_seed(sub_seed)
        lcfg = LoraConfig(r=recipe.lora_rank, lora_alpha=recipe.lora_alpha, lora_dropout=0.0,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          task_type="CAUSAL_LM")
        model = get_peft_model(reload_model(out / "base"), lcfg)
        train_stage(model, tok, docs, spec, sub_seed, folder.name, progress)
        save_adapter(model, tok, folder)
        return model

    stages = (("full", 2, recipe.aux, aux_docs, train_full),
              ("lora", 3, recipe.lora, aux_docs, train_lora),
              ("chat", 4, recipe.chat, chat_docs, train_full))
    for name, k, spec, docs, train in stages:
        t0 = time.time()
        run.attempts[name] = []
        for attempt in range(recipe.stage_attempts):
            sub_seed = seed * 10 + k + 100 * attempt
            model = train(sub_seed, spec, docs, out / name)
            run.acc[name] = evaluate(model)
            del model
            reason = (recipe.targets.missed(name, run.acc[name], run.acc["base"])
                      if check_targets else None)
            run.attempts[name].append({"sub_seed": sub_seed, "accuracy": run.acc[name],
                                       "missed": reason})
            if reason is None:
                break
            if progress:
                print(f"{reason}; " + ("retrying with the next sub-seed"
                                       if attempt + 1 < recipe.stage_attempts else "giving up"))
        run.times[name] = time.time() - t0
        if reason is not None:
            run.fail(f"{reason}; {recipe.stage_attempts} attempts")


def _phase(recipe: Recipe, record: dict) -> Phase:
    return next(p for p in recipe.base_phases if p.name == record["phase"])


__all__ = ["RecipeFailed", "train_all"]
