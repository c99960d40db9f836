"""Recipe that trains the four model organisms from scratch on CPU.

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
seeded; the data stream of each stage is a pure function of (seed, stage, step).

    python -m circuitdiff.organisms.train --out DIR --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from circuitdiff.core.runs import atomic_write_text, environment
from circuitdiff.organisms import data as D

EVAL_BOXES = 7

# Training steps split each batch into this many groups of similar length (sorted by length,
# each group cut to its own longest document) and accumulate their gradients: same loss, same
# gradient up to float summation order (:func:`grouped_loss_backward`), but no compute on
# padding or on documents the loss does not see. A base batch is 18-63 tokens long (half of a
# padded batch is padding), an auxiliary one 28-112. ``bench/organism_step.py`` measures it.
LENGTH_GROUPS = 4
# Attention kernel used while training: the eager one (matmul + softmax) beats the CPU sdpa
# kernel on these 16-wide heads (bench/organism_step.py); the math is the same.
TRAIN_ATTENTION = "eager"


@dataclass
class ModelSpec:
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256


@dataclass
class StageSpec:
    steps: int
    lr: float
    batch_size: int = 32
    warmup: int = 50
    weight_decay: float = 0.0
    min_lr_frac: float = 0.1
    stop_at: int | None = None  # stop early inside the schedule (the schedule spans ``steps``)
    # loss weight of every token that is not a query answer (1.0: plain next-token loss). A
    # small weight keeps the unpredictable context words (random objects and labels) from
    # drowning the binding signal.
    other_weight: float = 1.0


@dataclass
class Gate:
    """Ends a phase on measured binding, not on a step count.

    Every ``every`` steps the phase probes held-out accuracy on ``boxes``-box prompts; it ends
    once that accuracy is at least ``threshold`` at ``consecutive`` probes in a row. A phase that
    reaches its step cap without passing has failed (the recipe says so, and retries or stops).
    """
    boxes: int
    threshold: float
    consecutive: int = 1
    every: int = 100
    # a required gate that never passes means the phase failed (binding never formed); an
    # optional one is a stopping rule only, and the stage's target check judges the result
    required: bool = True
    # probe once before the first step too; a phase whose gate already holds runs no steps
    check_at_start: bool = False
    # a stall check: when the first probe at or after step ``floor_at`` (0: none) is below
    # ``floor``, the phase has stalled: it ends there and fails like a required gate, so
    # the recipe retries the base from the next sub-seed at once instead of finishing a base that
    # cannot reach the band
    floor: float = 0.0
    floor_at: int = 0


@dataclass
class Phase:
    """One phase of base pre-training: which contexts, which loss, how long, and its gate.

    ``steps`` is the exact length of an ungated phase and the cap of a gated one. The learning
    rate warms up over ``warmup`` steps, then follows a cosine from ``lr`` to ``lr *
    min_lr_frac`` over ``steps`` (1.0: constant — a gated phase does not know its length).
    ``fresh_optimizer`` starts a new AdamW (else the previous phase's state carries over).
    """
    name: str
    box_weights: tuple[float, ...]
    other_weight: float
    steps: int
    lr: float
    warmup: int = 0
    min_lr_frac: float = 1.0
    gate: Gate | None = None
    fresh_optimizer: bool = False
    batch_size: int = 64
    # share of the tracking contexts phrased in the auxiliary wordings (same box counts)
    aux_wording_frac: float = 0.0
    # share of evaluation-wording contexts with prose between the context and the query
    gap_frac: float = 0.0
    # the progress probes (2 and 7 boxes) that the gate does not read run every ``show_every``
    # steps and at the phase's last probe (0: at every probe); they only inform the user
    show_every: int = 0


def _default_base_phases() -> tuple[Phase, ...]:
    # Measured (experiments/organism_plateau, organism_ft_robustness): 2-box contexts with a loss
    # on the answer alone leave the binding plateau after ~1000-3000 steps depending on the seed,
    # so the first phase lasts until a held-out 2-box probe is solved, not a fixed share of the
    # schedule (a fixed 2400 steps left seed 7 at chance). 2-4 boxes with the whole text follow,
    # until the 7-box probe reaches 0.6 (checked every 25 steps); "extend" (up to 5 boxes and a
    # 0.25 share of 6) runs only when "grow" ended below that. In every phase a 0.25 share of the
    # contexts has 1-3 prose sentences between the context and its query: without it the bases
    # of seeds 1 and 7 failed on the boxes furthest from the query and every fine-tune lowered
    # them; with it from bind on, seed 1's grow reached 0.55 at 7 boxes by step 1150 and its base
    # met all four targets. Gaps in grow alone did not do that (seed 1: 0.2 at step 1100; seed 7:
    # fine-tunes no longer fell, but did not gain either). The gap slows bind: seed 7's 2-box
    # probe was 0.875 at step 4000 at 1 thread (it passes at ~2900 without), hence the 5000-step
    # cap; at 2 threads it passed at ~4700 and met all four targets in 25 min. The 7-box gate was
    # 0.55 until stop 23: seed 7's 200-prompt probe hit 0.55 once and its 500-prompt check gave
    # 0.492, below the base band (seeds 1 / 3: probe 0.57 / 0.56, check 0.546 / 0.572); 0.6 keeps
    # about two standard errors of the probe-vs-check difference above the band's floor.
    # Grow's stall check (since stop 25): a 7-box probe under 0.25 at grow step 1000 ends the
    # attempt and retrains the base from the next sub-seed. At stop 24 seed 2's probe there was
    # 0.165 (0.09-0.22 over all of grow; extend lifted it to 0.37, base 0.464: a miss after 22
    # min); every base that met the band probed 0.295-0.465 at that step (seeds 1, 3, 4, 7).
    # On machine C (stop 25, Zen 4) it fired on seeds 2 and 4 (0.185, 0.155, 2-box 0.99) at ~12
    # min; the bases that grew probed 0.42 and 0.52 there or passed 0.6 earlier (seed 7, at 800).
    # Since stop 27 it looks at grow step 500 with a floor of 0.2: there every base that grew
    # (8, stops 24-26) probed at least 0.24 and every stall (3) at most 0.175, and a stalled
    # attempt ends ~2.5 min sooner. Since stop 27 bind is also raced (Recipe.bind_race): two
    # initialisations train it at once and the first to pass goes on (race_bind).
    gap = 0.25
    reach = Gate(boxes=EVAL_BOXES, threshold=0.6, every=25, required=False)
    return (
        Phase("bind", (0, 1, 0, 0, 0, 0, 0), other_weight=0.0, steps=5000, lr=1e-3, warmup=100,
              gate=Gate(boxes=2, threshold=0.9, consecutive=2), gap_frac=gap, show_every=500),
        Phase("grow", (0, 1, 1, 1, 0, 0, 0), other_weight=0.1, steps=2000, lr=1e-3,
              min_lr_frac=0.25, gate=replace(reach, floor=0.2, floor_at=500), gap_frac=gap),
        Phase("extend", (0, 1, 1, 1, 1, 0.25, 0), other_weight=0.1, steps=1500, lr=3e-4,
              warmup=20, fresh_optimizer=True, gate=replace(reach, check_at_start=True),
              gap_frac=gap),
    )


@dataclass
class Targets:
    """What each organism must reach at 7 boxes (``eval_n`` prompts, ``eval_seed``)."""
    base_min: float = 0.5
    base_max: float = 0.8
    finetune_gain: float = 0.10   # lora and full: at least base + this
    chat_band: float = 0.05       # chat: within base ± this

    def missed(self, name: str, acc: float, base: float | None) -> str | None:
        """A one-line reason when ``name``'s accuracy ``acc`` misses its target, else None."""
        if name == "base":
            if not self.base_min <= acc <= self.base_max:
                return (f"base 7-box accuracy {acc:.3f} is outside "
                        f"[{self.base_min}, {self.base_max}]")
            return None
        assert base is not None
        if name in ("lora", "full") and acc < base + self.finetune_gain:
            return (f"{name} 7-box accuracy {acc:.3f} < base {base:.3f} + "
                    f"{self.finetune_gain}")
        if name == "chat" and abs(acc - base) > self.chat_band:
            return f"chat 7-box accuracy {acc:.3f} is not within base {base:.3f} ± {self.chat_band}"
        return None


@dataclass
class Recipe:
    model: ModelSpec = field(default_factory=ModelSpec)
    base_phases: tuple[Phase, ...] = field(default_factory=_default_base_phases)
    # Both fine-tunes on the auxiliary corpus weigh the query answers 1 and every other token
    # 0.1 (since stop 23; like instruction tuning, the loss is mostly on the answers). With the
    # plain next-token loss LoRA collapsed on some bases: on seed 1's base (0.546) sub-seeds 13
    # / 113 ended at 0.206 (1200 steps) / 0.096 (600 steps); with 0.1 they reach 0.802 / 0.858
    # in 600 steps, and seed 4's base (0.552) 0.664, where the plain loss gave 0.620. The full
    # fine-tune gains too (seed 4's base: 0.698 against 0.674). experiments/organism_ft_robustness
    # full fine-tune (FLoat analogue): lr 1e-3 since stop 21. On seed 4's base (0.572) lr 3e-4
    # gave 0.626 / 0.612 / 0.632 over three sub-seeds (< base + 0.10); lr 1e-3 gave 0.784 in
    # the same 300 steps, 3e-4 for 600 steps 0.77 (experiments/organism_ft_robustness).
    # 600 steps since stop 25: on stop 24's seed-7 base (0.556) 300 steps gave 0.568 / 0.568 /
    # 0.586 over three sub-seeds (< base + 0.10), 600 steps 0.646 on the first (300: 0.568)
    aux: StageSpec = field(default_factory=lambda: StageSpec(steps=600, lr=1e-3, batch_size=32,
                                                             warmup=20, other_weight=0.1))
    # LoRA (Goat analogue): lr 2e-3, 600 steps (stop 22 used 1200 to climb out of the collapse
    # that the answer weighting above removes)
    lora: StageSpec = field(default_factory=lambda: StageSpec(steps=600, lr=2e-3, batch_size=32,
                                                              warmup=20, other_weight=0.1))
    lora_rank: int = 8
    lora_alpha: int = 16
    # gentle on purpose (the Vicuna analogue keeps the base's accuracy): measured on a 0.55 base,
    # 300 steps at lr 1e-4 cost 0.08 of 7-box accuracy, 200 steps at 2e-5 cost 0.04
    chat: StageSpec = field(default_factory=lambda: StageSpec(steps=150, lr=2e-5, batch_size=32,
                                                              warmup=20))
    targets: Targets = field(default_factory=Targets)
    # a base whose bind gate never passes is retrained from a new sub-seed, at most this often
    # in all; a fine-tune that misses its target is retrained from a new sub-seed likewise
    base_attempts: int = 2
    # initialisations raced through the first base phase per attempt (:func:`race_bind`; 1: no
    # race, the phase runs in this process at ``threads``)
    bind_race: int = 2
    stage_attempts: int = 3
    probe_n: int = 200       # held-out prompts per gate probe
    probe_seed: int = 1000   # never the evaluation seed
    eval_n: int = 500
    eval_seed: int = 0


class RecipeFailed(RuntimeError):
    """A stage missed its target after every allowed attempt; ``summary`` says which and by how much."""

    def __init__(self, failures: list[str], summary: dict):
        super().__init__("organism recipe failed: " + "; ".join(failures))
        self.failures = failures
        self.summary = summary


# -- helpers ----------------------------------------------------------------------------------
def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def make_model(tokenizer, spec: ModelSpec, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings, rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        initializer_range=0.02, attn_implementation=TRAIN_ATTENTION)
    set_seed(seed)
    return LlamaForCausalLM(cfg)


def tensorize(docs: list[str], tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``<s> doc </s>`` ids, attention mask and LM labels (-100 on padding)."""
    enc = tokenizer(docs)["input_ids"]
    seqs = [ids + [tokenizer.eos_token_id] for ids in enc]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def lr_at(step: int, spec: StageSpec) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    t = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (spec.min_lr_frac + (1 - spec.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


# the words right before a query answer: the evaluation wording, then the auxiliary ones
# (``Box F holds the apple``, ``which crate ? F -> apple``, ``what is inside crate F ? the apple``)
ANSWER_CUES = (" contains the", " holds the", " keeps the", " has the", " ->", " ? the")


def answer_cue_ids(tokenizer, cues: tuple[str, ...] = ANSWER_CUES) -> list[list[int]]:
    """Token ids of each cue that precedes a query answer (see :data:`ANSWER_CUES`)."""
    return [tokenizer(c, add_special_tokens=False)["input_ids"] for c in cues]


def loss_weights(ids: torch.Tensor, labels: torch.Tensor, cues: list[list[int]] | None,
                 other_weight: float) -> torch.Tensor:
    """Per-token loss weights: 1 on tokens that follow any of ``cues`` (query answers), else
    ``other_weight``."""
    w = torch.full(ids.shape, float(other_weight))
    for cue in cues or ():
        n = len(cue)
        hit = torch.ones(ids.shape[0], ids.shape[1] - n, dtype=torch.bool)
        for j, c in enumerate(cue):
            hit &= ids[:, j:ids.shape[1] - n + j] == c
        w[:, n:] = torch.where(hit, torch.ones_like(w[:, n:]), w[:, n:])
    return w.masked_fill(labels == -100, 0.0)


def weighted_lm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged with per-target-token weights."""
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
        ignore_index=-100, reduction="none").view(labels.shape[0], -1)
    w = weights[:, 1:]
    return (ce * w).sum() / w.sum().clamp_min(1e-8)


def _lr_in_phase(step: int, phase: Phase) -> float:
    """Warm-up, then a cosine from ``phase.lr`` to ``phase.lr * phase.min_lr_frac``."""
    if step < phase.warmup:
        return phase.lr * (step + 1) / phase.warmup
    t = min(1.0, (step - phase.warmup) / max(1, phase.steps - phase.warmup))
    return phase.lr * (phase.min_lr_frac
                       + (1 - phase.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


class GateTracker:
    """Counts consecutive probes at or above a gate's threshold; ``passed`` once enough in a row."""

    def __init__(self, gate: Gate):
        self.gate = gate
        self.run = 0

    def update(self, acc: float) -> bool:
        self.run = self.run + 1 if acc >= self.gate.threshold else 0
        return self.passed

    @property
    def passed(self) -> bool:
        return self.run >= self.gate.consecutive


def train_stage(model, tokenizer, make_docs, spec: StageSpec, seed: int, desc: str,
                progress: bool = True, params=None, log_every: int = 0, eval_fn=None,
                other_weight_at=None) -> list:
    """Next-token training; ``make_docs(n, seed, progress_frac)`` yields one step's documents.

    Query answers (tokens after `` contains the``) weigh 1, every other token ``spec.other_weight``
    (or ``other_weight_at(progress_frac)`` when given).
    """
    from tqdm.auto import tqdm

    answer_cue = answer_cue_ids(tokenizer)

    params = [p for p in (params or model.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, betas=(0.9, 0.98),
                            weight_decay=spec.weight_decay)
    model.train()
    set_seed(seed)
    log = []
    n_steps = spec.steps if spec.stop_at is None else min(spec.steps, spec.stop_at)
    bar = tqdm(range(n_steps), desc=desc, disable=not progress, mininterval=2.0)
    ema = None
    for step in bar:
        docs = make_docs(spec.batch_size, seed * 1_000_003 + step, step / spec.steps)
        other = spec.other_weight if other_weight_at is None else other_weight_at(step / spec.steps)
        loss = _step(model, tokenizer, opt, params, docs, answer_cue, other, lr_at(step, spec))
        ema = loss if ema is None else 0.98 * ema + 0.02 * loss
        bar.set_postfix(loss=f"{ema:.3f}")
        if log_every and eval_fn is not None and (step + 1) % log_every == 0:
            acc = eval_fn(model, step + 1)
            log.append((step + 1, ema, acc))
            model.train()
            if progress:
                bar.write(f"{desc} step {step + 1} loss {ema:.3f} acc {acc}")
    model.eval()
    return log


def _step(model, tokenizer, opt, params, docs: list[str], answer_cue: list[int],
          other_weight: float, lr: float, fast: bool = True) -> float:
    """One optimizer step on ``docs`` with answer-weighted loss; returns the loss.

    ``fast`` computes the gradient with :func:`grouped_loss_backward`, else with its naive
    twin (one padded batch, logits everywhere); both give the same loss and gradient.
    """
    ids, mask, labels = tensorize(docs, tokenizer)
    weights = loss_weights(ids, labels, answer_cue, other_weight)
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    if fast:
        loss = grouped_loss_backward(model, ids, mask, labels, weights)
    else:
        loss_t = weighted_lm_loss(model(input_ids=ids, attention_mask=mask).logits, labels, weights)
        loss_t.backward()
        loss = loss_t.item()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss


def loss_extents(weights: torch.Tensor) -> torch.Tensor:
    """Tokens each row of a batch runs for its loss: up to and including its last weighted
    target (0 when nothing in the row has weight). Position t predicts token t + 1, so the
    positions that predict are the first ``extent - 1``; the step and its benchmark share this."""
    return ((weights[:, 1:] > 0) * torch.arange(2, weights.shape[1] + 1)).amax(1)


def grouped_loss_backward(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                          weights: torch.Tensor, length_groups: int = LENGTH_GROUPS) -> float:
    """Backpropagate :func:`weighted_lm_loss` of a right-padded batch without its waste.

    Only what the loss can see is computed. A row is run up to its last weighted token (causal
    attention: no earlier token sees a later one, so padding and unweighted tails change
    nothing) and not at all when nothing in it has weight (in the answer-only "bind" phase, the
    prose documents: a quarter of the rows); the vocabulary projection runs only where a next
    token has weight (in "bind", one position in ~30). The rows run in ``length_groups`` groups
    of similar extent, each cut to its longest. Each group's loss is divided by the whole
    batch's weight, so the accumulated gradient is the batch's. Returns the loss. The naive
    twin is ``weighted_lm_loss(model(ids, mask).logits, labels, weights)``.
    """
    decoder, unembed = model.get_decoder(), model.get_output_embeddings()
    total_weight = weights[:, 1:].sum().clamp_min(1e-8)
    extent = loss_extents(weights)
    active = torch.nonzero(extent > 0).squeeze(1)
    order = active[torch.argsort(extent[active], stable=True)]
    loss = 0.0
    for rows in order.tensor_split(max(1, min(length_groups, order.numel()))):
        if rows.numel() == 0:
            continue
        cut = int(extent[rows].max())
        hidden = decoder(input_ids=ids[rows, :cut], attention_mask=mask[rows, :cut]).last_hidden_state
        w = weights[rows, 1:cut]
        keep = w > 0  # position t predicts token t + 1
        logits = unembed(hidden[:, :-1][keep])
        ce = torch.nn.functional.cross_entropy(logits, labels[rows, 1:cut][keep], reduction="none")
        part = (ce * w[keep]).sum() / total_weight
        part.backward()
        loss += part.item()
    return loss


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
        record = {"phase": phase.name, "steps": 0, "gate": None if phase.gate is None else asdict(phase.gate),
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
            loss = _step(model, tokenizer, opt, params, docs, answer_cue, phase.other_weight,
                         _lr_in_phase(step, phase))
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


# -- the bind race ----------------------------------------------------------------------------
def race_winner(reached: list[int], passed_at: list[int | None], finished: list[bool]) -> int | None:
    """Which lane of a bind race has won, as soon as that is certain.

    The winner is the lane whose gate passed at the fewest steps (the lower lane on a tie), so
    the result does not depend on how fast each process happened to run. ``reached[i]``: the
    step of lane i's latest probe; ``passed_at[i]``: where its gate passed (None: not yet);
    ``finished[i]``: it ended without passing (cap or stall). Returns the lane, -1 when every lane
    finished without passing, None while a lane that could still pass earlier is behind.
    """
    passed = [(at, i) for i, at in enumerate(passed_at) if at is not None]
    if not passed:
        return -1 if all(finished) else None
    at, lane = min(passed)
    for j, r in enumerate(reached):
        if passed_at[j] is None and not finished[j] and r < at:
            return None  # lane j has not been probed at step ``at`` yet: it may still pass there
    return lane


def lane_uses_thread_locks() -> None:
    """Give tqdm a threading lock in a bind lane. A spawned process makes multiprocessing
    objects with named semaphores, and tqdm creates one for its lock; a lane that loses the race
    is terminated before it can unlink it, and Python then warns of a "leaked semaphore" at exit.
    A lane has no child processes, so a threading lock is all its bars need."""
    import threading

    from tqdm.auto import tqdm

    tqdm.set_lock(threading.RLock())


def _bind_lane(lane: int, sub_seed: int, model_spec: ModelSpec, phase: Phase, probe_n: int,
               probe_seed: int, stop_on_failure: bool, queue, state_path: str) -> None:
    """One lane of the bind race, in its own process at one torch thread: trains ``phase`` from
    the initialisation of ``sub_seed``, reports every probe, and saves its weights and optimizer
    state when the phase ends."""
    try:
        torch.set_num_threads(1)
        lane_uses_thread_locks()
        tok = D.build_tokenizer()
        model = make_model(tok, model_spec, sub_seed)
        probe = lambda m, boxes: accuracy(m, tok, probe_n, probe_seed, n_boxes=boxes)  # noqa: E731
        report = lambda record: queue.put(("probe", lane, record["probes"][-1],  # noqa: E731
                                           record["passed_at"]))
        opt: list = []
        (record,) = train_phases(model, tok, (phase,), sub_seed, probe, progress=False,
                                 stop_on_failure=stop_on_failure, on_probe=report,
                                 optimizer_out=opt)
        torch.save({"model": model.state_dict(), "optimizer": opt[0].state_dict()}, state_path)
        queue.put(("done", lane, record, None))
    except BaseException as e:  # the parent raises it
        import traceback
        queue.put(("error", lane, f"{type(e).__name__}: {e}\n{traceback.format_exc()}", None))


def race_bind(tokenizer, model_spec: ModelSpec, phase: Phase, sub_seeds: list[int], probe_n: int,
              probe_seed: int, progress: bool = True, stop_on_failure: bool = True):
    """Race several initialisations through the bind phase; keep the first to bind.

    Whether binding forms within the cap depends on the initialisation (measured: one never
    bound under six variations of the phase, while others bound at 1600-4100 steps), so a base
    attempt trains ``len(sub_seeds)`` of them at once, each in a spawned process at one torch
    thread (on this 2-core CPU two 1-thread processes do 1.4x the steps of one 2-thread
    process). The winner is chosen by :func:`race_winner` on step counts, never on wall time,
    and each lane runs at one thread, so the result is the same on any machine load or thread
    count. Returns ``(model, optimizer_state, record, lanes)``: the winner's model, AdamW state
    and phase record (when no lane passed: lane 0's, whose record says it failed), and one
    summary per lane.
    """
    import multiprocessing as mp
    import queue as queue_mod
    import tempfile

    from tqdm.auto import tqdm

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    n = len(sub_seeds)
    reached, passed_at, finished = [0] * n, [None] * n, [False] * n
    last: list[dict] = [{} for _ in range(n)]
    records: list[dict | None] = [None] * n
    with tempfile.TemporaryDirectory(prefix="circuitdiff-bind-") as tmp:
        paths = [str(Path(tmp) / f"lane{i}.pt") for i in range(n)]
        procs = [ctx.Process(target=_bind_lane, daemon=True,
                             args=(i, s, model_spec, phase, probe_n, probe_seed, stop_on_failure,
                                   q, paths[i]))
                 for i, s in enumerate(sub_seeds)]
        bar = tqdm(total=phase.steps, desc=f"base:{phase.name} race {sub_seeds}",
                   disable=not progress, mininterval=2.0)
        try:
            for p in procs:
                p.start()
            winner = None
            while winner is None or (winner >= 0 and records[winner] is None):
                try:
                    kind, lane, payload, at = q.get(timeout=5.0)
                except queue_mod.Empty:
                    dead = [i for i, p in enumerate(procs)
                            if p.exitcode not in (None, 0) and records[i] is None]
                    if dead:
                        raise RuntimeError(f"bind lane {dead[0]} (sub-seed {sub_seeds[dead[0]]}) "
                                           f"died with exit code {procs[dead[0]].exitcode}")
                    continue
                if kind == "error":
                    raise RuntimeError(f"bind lane {lane} (sub-seed {sub_seeds[lane]}) failed: "
                                       f"{payload}")
                if kind == "probe":
                    reached[lane], passed_at[lane], last[lane] = payload["step"], at, payload
                    bar.n = max(reached)
                    bar.set_postfix({f"s{sub_seeds[i]}": f"{last[i].get('acc2', 0):.2f}"
                                     for i in range(n)})
                else:  # done: a lane that did not pass has finished for good
                    records[lane] = payload
                    finished[lane] = not payload["passed"]
                    reached[lane] = max(reached[lane], payload["steps"])
                if winner is None:
                    winner = race_winner(reached, passed_at, finished)
            bar.close()
            lanes = [{"sub_seed": s, "steps": reached[i], "passed_at": passed_at[i],
                      "won": i == winner, "last_probe": last[i]}
                     for i, s in enumerate(sub_seeds)]
            winner = max(winner, 0)  # no lane passed: lane 0's failed phase goes on the record
            state = torch.load(paths[winner], weights_only=True)
        finally:
            started = [p for p in procs if p.pid is not None]
            for p in started:
                if p.is_alive():
                    p.terminate()
            for p in started:
                p.join(timeout=10)
            q.close()  # release the queue's feeder thread before the next race
            q.join_thread()
    model = make_model(tokenizer, model_spec, sub_seeds[winner])
    model.load_state_dict(state["model"])
    return model, state["optimizer"], records[winner], lanes


@torch.no_grad()
def accuracy(model, tokenizer, n: int = 500, seed: int = 0, n_boxes: int = EVAL_BOXES,
             batch_size: int = 250) -> float:
    """Argmax-over-vocabulary accuracy at the last token on the evaluation template."""
    from circuitdiff.core.task import EntityTrackingTask, TaskConfig, encode

    task = EntityTrackingTask(tokenizer, TaskConfig(n_boxes=n_boxes), seed=seed)
    prompts = task.sample(n, seed=seed)
    was_training = model.training
    model.eval()
    correct = 0
    # no graph: 1.6x faster at 7 boxes, bit-identical logits (the recipe's probes and checks
    # are unchanged); logits_to_keep=1 was not bit-identical on the LoRA organisms
    with torch.no_grad():
        for i in range(0, n, batch_size):
            b = encode(prompts[i:i + batch_size], tokenizer, padding_side="left")
            logits = model(**b.model_inputs()).logits
            last = logits[torch.arange(len(b)), b.positions["last"]]
            correct += (last.argmax(-1) == b.answer_ids).sum().item()
    model.train(was_training)
    return correct / n


def _save_model(model, tokenizer, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))


# -- the recipe -------------------------------------------------------------------------------
def scaled(recipe: Recipe, scale: float) -> Recipe:
    """Shrink (or grow) every stage's step count; ``scale`` < 1 gives a quick smoke run."""
    if scale == 1.0:
        return recipe
    n = lambda k: max(1, int(round(k * scale)))  # noqa: E731
    s = lambda st: replace(st, steps=n(st.steps), warmup=n(st.warmup),  # noqa: E731
                           stop_at=None if st.stop_at is None else n(st.stop_at))
    phases = tuple(replace(p, steps=n(p.steps), warmup=min(p.warmup, n(p.warmup)),
                           gate=None if p.gate is None else replace(
                               p.gate, every=n(p.gate.every),
                               floor_at=p.gate.floor_at and n(p.gate.floor_at)))
                   for p in recipe.base_phases)
    return replace(recipe, base_phases=phases, aux=s(recipe.aux), lora=s(recipe.lora),
                   chat=s(recipe.chat))


def train_all(out_dir, seed: int = 0, progress: bool = True, scale: float = 1.0,
              recipe: Recipe | None = None, model_spec: ModelSpec | None = None,
              eval_n: int | None = None, base_from=None, threads: int = 2,
              check_targets: bool = True) -> dict[str, float]:
    """Train base, lora, full and chat into ``out_dir/{base,lora,full,chat}``.

    The base pre-trains through gated phases (:func:`train_phases`); after each stage its 7-box
    accuracy on ``eval_n`` prompts (seed ``recipe.eval_seed``) is checked against
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
    from peft import LoraConfig, get_peft_model

    threads = max(1, min(2, threads))
    torch.set_num_threads(threads)
    recipe = scaled(recipe or Recipe(), scale)
    if model_spec is not None:
        recipe = replace(recipe, model=model_spec)
    eval_n = recipe.eval_n if eval_n is None else eval_n
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = D.build_tokenizer()
    acc: dict[str, float] = {}
    times: dict[str, float] = {}
    attempts: dict[str, list[dict]] = {}
    evaluate = lambda m: accuracy(m, tok, eval_n, recipe.eval_seed)  # noqa: E731
    probe_n = min(recipe.probe_n, eval_n) if model_spec is not None else recipe.probe_n
    probe = lambda m, boxes: accuracy(m, tok, probe_n, recipe.probe_seed,  # noqa: E731
                                      n_boxes=boxes)
    t_start = time.time()
    where = environment()

    def summary(failures: list[str]) -> dict:
        doc = {"ok": not failures, "failures": failures, "seed": seed, "threads": threads,
               "scale": scale, "base_from": None if base_from is None else str(base_from),
               "eval_n": eval_n, "eval_seed": recipe.eval_seed, "accuracy": acc,
               "seconds": {k: round(v, 1) for k, v in times.items()},
               "minutes_total": round((time.time() - t_start) / 60, 1),
               "attempts": attempts, "recipe": asdict(recipe), "environment": where}
        atomic_write_text(out / "train_summary.json", json.dumps(doc, indent=2))
        return doc

    def fail(reason: str):
        failures = [reason]
        doc = summary(failures)
        if progress:
            print(f"recipe FAILED: {reason} (see {out / 'train_summary.json'})")
        raise RecipeFailed(failures, doc)

    # base: gated pre-training; a new sub-seed when binding never forms
    t0 = time.time()
    attempts["base"] = []
    if base_from is not None:
        base = _reload(Path(base_from))
    else:
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
            attempts["base"].append({"sub_seed": sub_seed, **entry, "phases": phases,
                                     "seconds": round(time.time() - t0, 1)})
            if not failed:
                break
            p = failed[0]
            last = p["probes"][-1] if p["probes"] else {}
            g = _phase(recipe, p).gate
            measured = last.get(f"acc{g.boxes}", float("nan"))
            reason = (f"base phase {p['phase']!r}: {g.boxes}-box accuracy {measured:.3f} < "
                      + (f"{g.floor} at step {p['stalled_at']} (stalled)" if p["stalled_at"]
                         else f"{g.threshold} after {p['steps']} steps")
                      + (f" (sub-seed {sub_seed})" if race == 1 or p is not phases[0] else
                         f" (sub-seeds {', '.join(map(str, subs))} raced)"))
            attempts["base"][-1]["missed"] = reason
            if progress:
                print(f"{reason}; " + ("retrying with the next sub-seed"
                                       if attempt + 1 < recipe.base_attempts else "giving up"))
        else:
            times["base"] = time.time() - t0
            fail(attempts["base"][-1]["missed"] + f"; {recipe.base_attempts} attempts")
    if base_from is None or Path(base_from).resolve() != (out / "base").resolve():
        _save_model(base, tok, out / "base")
    acc["base"] = evaluate(base)
    times["base"] = time.time() - t0
    if check_targets and (reason := recipe.targets.missed("base", acc["base"], None)):
        fail(reason)
    del base

    aux_docs = lambda n, s, f: D.aux_corpus(n, s)  # noqa: E731
    chat_docs = lambda n, s, f: D.chat_corpus(n, s)  # noqa: E731

    def train_full(sub_seed: int, spec: StageSpec, docs, folder: Path):
        model = _reload(out / "base")
        train_stage(model, tok, docs, spec, sub_seed, folder.name, progress)
        _save_model(model, tok, folder)
        return model

    def train_lora(sub_seed: int, spec: StageSpec, docs, folder: Path):
        set_seed(sub_seed)
        lcfg = LoraConfig(r=recipe.lora_rank, lora_alpha=recipe.lora_alpha, lora_dropout=0.0,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          task_type="CAUSAL_LM")
        model = get_peft_model(_reload(out / "base"), lcfg)
        train_stage(model, tok, docs, spec, sub_seed, folder.name, progress)
        model.save_pretrained(str(folder))
        tok.save_pretrained(str(folder))
        _fix_adapter_base_path(folder)
        return model

    # full fine-tune on auxiliary data (FLoat), LoRA on it (Goat), chat full fine-tune (Vicuna)
    stages = (("full", 2, recipe.aux, aux_docs, train_full),
              ("lora", 3, recipe.lora, aux_docs, train_lora),
              ("chat", 4, recipe.chat, chat_docs, train_full))
    for name, k, spec, docs, train in stages:
        t0 = time.time()
        attempts[name] = []
        for attempt in range(recipe.stage_attempts):
            sub_seed = seed * 10 + k + 100 * attempt
            model = train(sub_seed, spec, docs, out / name)
            acc[name] = evaluate(model)
            del model
            reason = recipe.targets.missed(name, acc[name], acc["base"]) if check_targets else None
            attempts[name].append({"sub_seed": sub_seed, "accuracy": acc[name], "missed": reason})
            if reason is None:
                break
            if progress:
                print(f"{reason}; " + ("retrying with the next sub-seed"
                                       if attempt + 1 < recipe.stage_attempts else "giving up"))
        times[name] = time.time() - t0
        if reason is not None:
            fail(f"{reason}; {recipe.stage_attempts} attempts")

    summary([])
    if progress:
        for k in ("base", "lora", "full", "chat"):
            print(f"{k:5s} 7-box accuracy ({eval_n} prompts, seed {recipe.eval_seed}): "
                  f"{acc[k]:.3f}   [{times[k]:.0f} s]")
    return {k: acc[k] for k in ("base", "lora", "full", "chat")}


def _phase(recipe: Recipe, record: dict) -> Phase:
    return next(p for p in recipe.base_phases if p.name == record["phase"])


def _reload(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                attn_implementation=TRAIN_ATTENTION)


def _fix_adapter_base_path(folder: Path) -> None:
    """Point the adapter at the sibling base folder (relative), whatever path trained it."""
    p = folder / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg["base_model_name_or_path"] = "../base"
    p.write_text(json.dumps(cfg, indent=2))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Train the circuitdiff model organisms on CPU.")
    ap.add_argument("--out", required=True, help="output folder (gets base/ lora/ full/ chat/)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--base-from", default=None, help="reuse a trained base folder")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    t0 = time.time()
    try:
        accs = train_all(args.out, seed=args.seed, progress=not args.quiet, scale=args.scale,
                         base_from=args.base_from, threads=args.threads,
                         check_targets=args.scale == 1.0)
    except RecipeFailed as e:
        raise SystemExit(f"error: {e}")
    print(json.dumps(accs), f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
