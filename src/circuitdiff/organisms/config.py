"""The recipe's settings: model size, fine-tune stages, base phases and their gates, targets.

Every field says what it does; the comments record why a value is what it is (measured, see
``experiments/organism_plateau`` and ``experiments/organism_ft_robustness``). :func:`scaled`
shrinks a recipe for smoke runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from circuitdiff.core.config import Config, check_finite

#: box count of the evaluation prompts (the organisms' headline accuracy is at 7 boxes)
EVAL_BOXES = 7


@dataclass
class ModelSpec(Config):
    """Size of the from-scratch GQA ``LlamaForCausalLM`` base."""

    #: width of the residual stream
    hidden_size: int = 128
    #: width of each MLP
    intermediate_size: int = 384
    #: decoder layers
    num_hidden_layers: int = 4
    #: query heads per layer
    num_attention_heads: int = 8
    #: key-value heads per layer (grouped-query attention)
    num_key_value_heads: int = 2
    #: longest sequence the rotary embedding is set up for
    max_position_embeddings: int = 256


class Schedule:
    """Mix-in of :class:`StageSpec` and :class:`Phase`, a training schedule: ``steps`` optimizer
    steps of ``batch_size`` documents at peak learning rate ``lr``, tokens other than the query
    answers weighted ``other_weight``. Its ``__post_init__`` is the one check of those fields."""

    def owner(self) -> str:
        """What an error names: the class (a phase adds its name)."""
        return type(self).__name__

    def __post_init__(self) -> None:
        check_finite(self.owner(), lr=self.lr, other_weight=self.other_weight)
        self.check_at_least(("steps", "batch_size"), prefix=f"{self.owner()}: ")


@dataclass
class StageSpec(Schedule, Config):
    """One fine-tune stage (full, lora, chat): a warm-up then a cosine learning rate."""

    #: length of the schedule in optimizer steps
    steps: int
    #: peak learning rate
    lr: float
    #: documents per step
    batch_size: int = 32
    #: steps of linear warm-up
    warmup: int = 50
    #: AdamW weight decay
    weight_decay: float = 0.0
    #: the cosine ends at ``lr * min_lr_frac``
    min_lr_frac: float = 0.1
    #: stop early inside the schedule (the schedule spans ``steps``); None: run all of it
    stop_at: int | None = None
    #: loss weight of every token that is not a query answer (1.0: plain next-token loss). A
    #: small weight keeps the unpredictable context words (random objects and labels) from
    #: drowning the binding signal.
    other_weight: float = 1.0


@dataclass
class Gate(Config):
    """Ends a phase on measured binding, not on a step count.

    Every ``every`` steps the phase probes held-out accuracy on ``boxes``-box prompts; it ends
    once that accuracy is at least ``threshold`` at ``consecutive`` probes in a row. A phase that
    reaches its step cap without passing has failed (the recipe says so, and retries or stops).
    """

    #: box count of the probe prompts the gate reads
    boxes: int
    #: accuracy the probe must reach
    threshold: float
    #: probes in a row at or above ``threshold`` that pass the gate
    consecutive: int = 1
    #: steps between probes
    every: int = 100
    #: a required gate that never passes means the phase failed (binding never formed); an
    #: optional one is a stopping rule only, and the stage's target check judges the result
    required: bool = True
    #: probe once before the first step too; a phase whose gate already holds runs no steps
    check_at_start: bool = False
    #: a stall check: when the first probe at or after step ``floor_at`` (0: none) is below
    #: ``floor``, the phase has stalled: it ends there and fails like a required gate, so the
    #: recipe retries the base from the next sub-seed at once instead of finishing a base that
    #: cannot reach the band
    floor: float = 0.0
    #: the step of the stall check (0: no check)
    floor_at: int = 0

    def __post_init__(self) -> None:
        check_finite("Gate", threshold=self.threshold, floor=self.floor)
        self.check_at_least(("every", "consecutive"), prefix="Gate: ")


@dataclass
class Phase(Schedule, Config):
    """One phase of base pre-training: which contexts, which loss, how long, and its gate.

    ``steps`` is the exact length of an ungated phase and the cap of a gated one. The learning
    rate warms up over ``warmup`` steps, then follows a cosine from ``lr`` to ``lr *
    min_lr_frac`` over ``steps`` (1.0: constant — a gated phase does not know its length).
    """

    #: the phase's name in records and progress bars
    name: str
    #: relative weight of contexts with 1, 2, ... boxes
    box_weights: tuple[float, ...]
    #: loss weight of every token that is not a query answer
    other_weight: float
    #: length of an ungated phase, cap of a gated one
    steps: int
    #: peak learning rate
    lr: float
    #: steps of linear warm-up
    warmup: int = 0
    #: the cosine ends at ``lr * min_lr_frac`` (1.0: constant after the warm-up)
    min_lr_frac: float = 1.0
    #: ends the phase on measured accuracy (None: the phase runs ``steps``)
    gate: Gate | None = None
    #: start a new AdamW (else the previous phase's state carries over)
    fresh_optimizer: bool = False
    #: documents per step
    batch_size: int = 64
    #: share of the tracking contexts phrased in the auxiliary wordings (same box counts)
    aux_wording_frac: float = 0.0
    #: share of evaluation-wording contexts with prose between the context and the query
    gap_frac: float = 0.0
    #: the progress probes (2 and 7 boxes) that the gate does not read run every
    #: ``show_every`` steps and at the phase's last probe (0: at every probe); they only
    #: inform the user
    show_every: int = 0

    def owner(self) -> str:
        """The phase by name, as its errors name it."""
        return f"Phase {self.name!r}"


def default_base_phases() -> tuple[Phase, ...]:
    """The base's three phases: ``bind`` (2 boxes, answer-only loss, until a 2-box probe is
    solved), ``grow`` (2-4 boxes until the 7-box probe reaches 0.6, with a stall check) and
    ``extend`` (up to 5 boxes and a share of 6, only when grow ended below 0.6)."""
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
    # initialisations train it at once and the first to pass goes on (race.race_bind).
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
class Targets(Config):
    """What each organism must reach at 7 boxes (``eval_n`` prompts, ``eval_seed``)."""

    #: lowest base accuracy of the band
    base_min: float = 0.5
    #: highest base accuracy of the band
    base_max: float = 0.8
    #: lora and full: at least base + this
    finetune_gain: float = 0.10
    #: chat: within base ± this
    chat_band: float = 0.05

    def __post_init__(self) -> None:
        check_finite("Targets", base_min=self.base_min, base_max=self.base_max,
                     finetune_gain=self.finetune_gain, chat_band=self.chat_band)

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
class Recipe(Config):
    """The whole recipe: the base's phases, the three fine-tune stages, retries and checks."""

    #: size of the base
    model: ModelSpec = field(default_factory=ModelSpec)
    #: the base's pre-training phases (:func:`default_base_phases`)
    base_phases: tuple[Phase, ...] = field(default_factory=default_base_phases)
    #: the full fine-tune (FLoat analogue) on the auxiliary corpus.
    #: Both fine-tunes on the auxiliary corpus weigh the query answers 1 and every other token
    #: 0.1 (since stop 23; like instruction tuning, the loss is mostly on the answers). With the
    #: plain next-token loss LoRA collapsed on some bases: on seed 1's base (0.546) sub-seeds 13
    #: / 113 ended at 0.206 (1200 steps) / 0.096 (600 steps); with 0.1 they reach 0.802 / 0.858
    #: in 600 steps, and seed 4's base (0.552) 0.664, where the plain loss gave 0.620. The full
    #: fine-tune gains too (seed 4's base: 0.698 against 0.674). lr 1e-3 since stop 21: on seed
    #: 4's base (0.572) lr 3e-4 gave 0.626 / 0.612 / 0.632 over three sub-seeds (< base + 0.10);
    #: lr 1e-3 gave 0.784 in the same 300 steps, 3e-4 for 600 steps 0.77. 600 steps since stop
    #: 25: on stop 24's seed-7 base (0.556) 300 steps gave 0.568 / 0.568 / 0.586 over three
    #: sub-seeds (< base + 0.10), 600 steps 0.646 on the first (300: 0.568)
    aux: StageSpec = field(default_factory=lambda: StageSpec(steps=600, lr=1e-3, batch_size=32,
                                                             warmup=20, other_weight=0.1))
    #: the LoRA adapter (Goat analogue) on the auxiliary corpus: lr 2e-3, 600 steps (stop 22
    #: used 1200 to climb out of the collapse that the answer weighting above removes)
    lora: StageSpec = field(default_factory=lambda: StageSpec(steps=600, lr=2e-3, batch_size=32,
                                                              warmup=20, other_weight=0.1))
    #: LoRA rank
    lora_rank: int = 8
    #: LoRA scaling numerator
    lora_alpha: int = 16
    #: the chat full fine-tune (Vicuna analogue), gentle on purpose (it keeps the base's
    #: accuracy): measured on a 0.55 base, 300 steps at lr 1e-4 cost 0.08 of 7-box accuracy,
    #: 200 steps at 2e-5 cost 0.04
    chat: StageSpec = field(default_factory=lambda: StageSpec(steps=150, lr=2e-5, batch_size=32,
                                                              warmup=20))
    #: what each organism must reach
    targets: Targets = field(default_factory=Targets)
    #: a base whose bind gate never passes is retrained from a new sub-seed, at most this often
    #: in all
    base_attempts: int = 2
    #: initialisations raced through the first base phase per attempt
    #: (:func:`~circuitdiff.organisms.race.race_bind`; 1: no race, the phase runs in this
    #: process at ``threads``)
    bind_race: int = 2
    #: a fine-tune that misses its target is retrained from a new sub-seed, at most this often
    #: in all
    stage_attempts: int = 3
    #: held-out prompts per gate probe
    probe_n: int = 200
    #: seed of the probe prompts (never the evaluation seed)
    probe_seed: int = 1000
    #: prompts of the final 7-box check of each organism
    eval_n: int = 500
    #: seed of the final check's prompts
    eval_seed: int = 0

    def __post_init__(self) -> None:
        self.check_at_least(("base_attempts", "bind_race", "stage_attempts", "probe_n", "eval_n"),
                            prefix="Recipe: ")


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


__all__ = ["EVAL_BOXES", "Gate", "ModelSpec", "Phase", "Recipe", "Schedule", "StageSpec",
           "Targets", "default_base_phases", "scaled"]
