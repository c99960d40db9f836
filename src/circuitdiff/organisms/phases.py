"""The base's gated pre-training: phases that end on measured accuracy (their gates)."""

from __future__ import annotations

import torch

from circuitdiff.organisms import data as D
from circuitdiff.organisms.config import EVAL_BOXES, Gate, Phase
from circuitdiff.organisms.losses import answer_cue_ids
from circuitdiff.organisms.models import set_seed
from circuitdiff.organisms.stages import lr_at, train_step


class GateTracker:
    """Counts consecutive probes at or above a gate's threshold; ``passed`` once enough in a row."""

    def __init__(self, gate: Gate):
        self.gate = gate
        self.run = 0

    def update(self, acc: float) -> bool:
        """Record one probe's accuracy; True once the gate has passed."""
        self.run = self.run + 1 if acc >= self.gate.threshold else 0
        return self.passed

    @property
    def passed(self) -> bool:
        return self.run >= self.gate.consecutive


def train_phases(model, tokenizer, phases: tuple[Phase, ...], seed: int, probe,
                 progress: bool = True, desc: str = "base",
                 stop_on_failure: bool = True, step0: int = 0,
                 optimizer_state: dict | None = None, on_probe=None,
                 optimizer_out: list | None = None) -> list[dict]:
    """Pre-train ``model`` through ``phases``; a gated phase ends when its gate passes.

    ``probe(model, boxes) -> float`` measures held-out accuracy on ``boxes``-box prompts. Every
    probe also measures 2- and 7-box accuracy for the progress bar and the log, so a user sees
    binding form. Returns one record per phase run: steps, whether its gate passed (None when
    ungated), the step it passed at, the step it stalled at (its gate's floor check), and the
    probes. Stops after a required gate failed or a phase stalled (later phases build on what it
    was meant to form) unless ``stop_on_failure`` is False.

    To continue a run that stopped after some phases (the bind race hands its winner on this
    way): ``step0`` is the global step to start from (the document stream continues), and
    ``optimizer_state`` the AdamW state to resume (unless the first phase starts a fresh
    optimizer). ``on_probe(record)`` is called after every probe; ``optimizer_out``, when a
    list, receives the optimizer at the end.
    """
    from tqdm.auto import tqdm

    answer_cue = answer_cue_ids(tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = None
    records = []
    set_seed(seed)
    # step0: the global step; each step's documents are a pure function of (seed, global step)
    for phase in phases:
        if opt is None or phase.fresh_optimizer:
            opt = torch.optim.AdamW(params, lr=phase.lr, betas=(0.9, 0.98), weight_decay=0.0)
            if optimizer_state is not None and not phase.fresh_optimizer:
                opt.load_state_dict(optimizer_state)
        tracker = GateTracker(phase.gate) if phase.gate else None
        every = phase.gate.every if phase.gate else max(1, phase.steps // 10)
        record = {"phase": phase.name, "steps": 0,
                  "gate": None if phase.gate is None else phase.gate.to_dict(),
                  "passed": None, "passed_at": None, "stalled_at": None, "probes": []}
        shown: dict[str, str] = {}
        ema = None

        def measure(at: int) -> bool:
            """Probe the gate's accuracy and, when due, the 2- and 7-box accuracy shown to the
            user; True when the phase ends here (gate passed or stalled)."""
            accs = {phase.gate.boxes: probe(model, phase.gate.boxes)} if phase.gate else {}
            entry = {"step": at, "loss": None if ema is None else round(ema, 4)}
            record["probes"].append(entry)  # before the gate decides: its floor check reads it
            done = _gate_decides(at, accs) if phase.gate else False
            if done or at == phase.steps or not phase.show_every or at % phase.show_every == 0:
                accs.update({b: probe(model, b) for b in (2, EVAL_BOXES) if b not in accs})
            model.train()
            entry.update({f"acc{b}": accs[b] for b in sorted(accs)})
            shown.update({f"acc{b}": f"{a:.2f}" for b, a in accs.items() if b in (2, EVAL_BOXES)})
            if on_probe is not None:
                on_probe(record)
            return done

        def _gate_decides(at: int, accs: dict[int, float]) -> bool:
            if tracker is not None and tracker.update(accs[phase.gate.boxes]):
                record["passed"], record["passed_at"] = True, at
                return True
            floor_at = phase.gate.floor_at if phase.gate is not None else 0
            probes = record["probes"]  # steps increase: only the first probe past floor_at counts
            first_at_floor = floor_at and at >= floor_at and (
                len(probes) < 2 or probes[-2]["step"] < floor_at)
            if first_at_floor and accs[phase.gate.boxes] < phase.gate.floor:
                record["stalled_at"] = at
                return True
            return False

        model.train()
        # a phase whose gate already holds has nothing to do (e.g. extend after a grow that
        # already reached the 7-box range)
        skip = phase.gate is not None and phase.gate.check_at_start and measure(0)
        bar = tqdm(range(0 if skip else phase.steps), desc=f"{desc}:{phase.name}",
                   disable=not progress, mininterval=2.0)
        for step in bar:
            docs = D.base_corpus(phase.batch_size, seed * 1_000_003 + step0 + step,
                                 box_weights=phase.box_weights,
                                 aux_wording_frac=phase.aux_wording_frac,
                                 gap_frac=phase.gap_frac)
            loss = train_step(model, tokenizer, opt, params, docs, answer_cue, phase.other_weight,
                              lr_at(step, phase))
            ema = loss if ema is None else 0.98 * ema + 0.02 * loss
            record["steps"] = step + 1
            if ((step + 1) % every == 0 or step + 1 == phase.steps) and measure(step + 1):
                bar.set_postfix(loss=f"{ema:.3f}", **shown)
                break
            bar.set_postfix(loss=f"{ema:.3f}", **shown)
        bar.close()
        step0 += record["steps"]
        if tracker is not None and not tracker.passed:
            record["passed"] = False
        # failed: a required gate that never passed, or a stall (an optional gate that did not
        # pass is a stopping rule only); the recipe retries a failed base
        record["failed"] = record["passed"] is False and (phase.gate.required
                                                          or record["stalled_at"] is not None)
        records.append(record)
        if record["failed"] and stop_on_failure:
            break
    model.eval()
    if optimizer_out is not None:
        optimizer_out.append(opt)
    return records


__all__ = ["GateTracker", "train_phases"]
