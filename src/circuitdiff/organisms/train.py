"""Recipe that trains the four model organisms from scratch on CPU.

* **base**  ("Llama"):  a small GQA ``LlamaForCausalLM`` pre-trained from scratch on the synthetic
  base corpus (entity tracking in the evaluation wording with 2-5 boxes, one query per context,
  plus prose). Binding sits behind a long loss plateau; what got this model out of it (measured,
  see ``experiments/organism_plateau``): lr 1e-3 (3e-3 never left it), 2-box contexts first, and
  a loss on the query answers alone until binding has formed (a 0.1 weight on the other tokens
  kept a 2-box probe at chance for 4750 steps). The base never sees 6 or 7 boxes, which is what
  keeps its 7-box accuracy "not great".
* **lora**  ("Goat"):   a peft LoRA adapter (q/k/v/o) on the base, trained on the auxiliary corpus.
* **full**  ("FLoat"):  full fine-tune of the base on the same auxiliary corpus.
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

from circuitdiff.organisms import data as D

EVAL_BOXES = 7


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
class Recipe:
    model: ModelSpec = field(default_factory=ModelSpec)
    # measured on 2-box probes: lr 3e-3 never leaves the binding plateau, 1e-3 does
    base: StageSpec = field(default_factory=lambda: StageSpec(steps=6000, lr=1e-3, batch_size=64,
                                                              warmup=100, other_weight=0.1,
                                                              stop_at=4500))
    # curriculum over the base run: (until this fraction of steps, box-count weights for 1..7
    # boxes, loss weight of non-answer tokens). Two boxes and the answer loss alone until binding
    # has emerged (measured: even a 0.1 weight on the other tokens kept a 2-box probe at chance
    # for 4750 steps, while answer-only training left the plateau after ~1000-1500), then more
    # boxes and the whole text.
    base_curriculum: tuple[tuple[float, tuple[float, ...], float], ...] = (
        (0.4, (0, 1, 0, 0, 0, 0, 0), 0.0),
        (1.0, (0, 1, 1, 1, 0, 0, 0), 0.1),
    )
    # a short second pre-training stage (fresh optimizer) with up to 5 boxes: on 2-4 boxes alone
    # the base stays at ~0.3 on 7 boxes; this lifts it into the paper's "not great" range
    base_extend: StageSpec | None = field(default_factory=lambda: StageSpec(
        steps=600, lr=3e-4, batch_size=64, warmup=20, other_weight=0.1, stop_at=None))
    base_extend_box_weights: tuple[float, ...] = (0, 1, 1, 1, 1, 0, 0)
    aux: StageSpec = field(default_factory=lambda: StageSpec(steps=300, lr=3e-4, batch_size=32,
                                                             warmup=20))
    lora: StageSpec = field(default_factory=lambda: StageSpec(steps=300, lr=2e-3, batch_size=32,
                                                              warmup=20))
    lora_rank: int = 8
    lora_alpha: int = 16
    # gentle on purpose (the Vicuna analogue keeps the base's accuracy): measured on a 0.55 base,
    # 300 steps at lr 1e-4 cost 0.08 of 7-box accuracy, 200 steps at 2e-5 cost 0.04
    chat: StageSpec = field(default_factory=lambda: StageSpec(steps=150, lr=2e-5, batch_size=32,
                                                              warmup=20))
    eval_n: int = 500
    eval_seed: int = 0


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
        initializer_range=0.02)
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


def answer_cue_ids(tokenizer, cue: str = " contains the") -> list[int]:
    """Token ids of the words that precede a query answer in the evaluation wording."""
    return tokenizer(cue, add_special_tokens=False)["input_ids"]


def loss_weights(ids: torch.Tensor, labels: torch.Tensor, cue: list[int] | None,
                 other_weight: float) -> torch.Tensor:
    """Per-token loss weights: 1 on tokens that follow ``cue`` (query answers), else ``other_weight``."""
    w = torch.full(ids.shape, float(other_weight))
    if cue:
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
        ids, mask, labels = tensorize(docs, tokenizer)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, spec)
        logits = model(input_ids=ids, attention_mask=mask).logits
        other = spec.other_weight if other_weight_at is None else other_weight_at(step / spec.steps)
        loss = weighted_lm_loss(logits, labels, loss_weights(ids, labels, answer_cue, other))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}")
        if log_every and eval_fn is not None and (step + 1) % log_every == 0:
            acc = eval_fn(model, step + 1)
            log.append((step + 1, ema, acc))
            model.train()
            if progress:
                bar.write(f"{desc} step {step + 1} loss {ema:.3f} acc {acc}")
    model.eval()
    return log


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
    s = lambda st: replace(  # noqa: E731
        st, steps=max(1, int(round(st.steps * scale))), warmup=max(1, int(round(st.warmup * scale))),
        stop_at=None if st.stop_at is None else max(1, int(round(st.stop_at * scale))))
    return replace(recipe, base=s(recipe.base), aux=s(recipe.aux), lora=s(recipe.lora),
                   chat=s(recipe.chat),
                   base_extend=None if recipe.base_extend is None else s(recipe.base_extend))


def train_all(out_dir, seed: int = 0, progress: bool = True, scale: float = 1.0,
              recipe: Recipe | None = None, model_spec: ModelSpec | None = None,
              eval_n: int | None = None, base_from=None, threads: int = 2) -> dict[str, float]:
    """Train base, lora, full and chat into ``out_dir/{base,lora,full,chat}``.

    Returns the 7-box accuracy of each organism on ``eval_n`` prompts (seed ``recipe.eval_seed``).
    ``scale`` multiplies every stage's number of steps; ``model_spec`` overrides the model size
    (both only for smoke tests: the shipped organisms use the defaults). ``base_from`` reuses an
    already trained base folder (same recipe) instead of pre-training it again. ``threads``: torch
    CPU threads (the shipped organisms used 2; float reductions differ with the thread count).
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.set_num_threads(max(1, min(2, threads)))
    recipe = scaled(recipe or Recipe(), scale)
    if model_spec is not None:
        recipe = replace(recipe, model=model_spec)
    eval_n = recipe.eval_n if eval_n is None else eval_n
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = D.build_tokenizer()
    acc: dict[str, float] = {}
    times: dict[str, float] = {}
    evaluate = lambda m, *_: accuracy(m, tok, eval_n, recipe.eval_seed)  # noqa: E731

    # base
    t0 = time.time()
    if base_from is not None:
        base = _reload(Path(base_from))
    else:
        base = make_model(tok, recipe.model, seed)
        phase = lambda f: next(p for p in recipe.base_curriculum  # noqa: E731
                               if f < p[0] or p[0] >= 1.0)
        train_stage(base, tok, lambda n, s, f: D.base_corpus(n, s, box_weights=phase(f)[1]),
                    recipe.base, seed * 10 + 1, "base", progress,
                    other_weight_at=lambda f: phase(f)[2])
        if recipe.base_extend is not None:
            train_stage(base, tok, lambda n, s, f: D.base_corpus(
                n, s, box_weights=recipe.base_extend_box_weights), recipe.base_extend,
                seed * 10 + 5, "base+", progress)
    if base_from is None or Path(base_from).resolve() != (out / "base").resolve():
        _save_model(base, tok, out / "base")
    acc["base"] = evaluate(base)
    times["base"] = time.time() - t0

    aux_docs = lambda n, s, f: D.aux_corpus(n, s)  # noqa: E731

    # full fine-tune on auxiliary data (FLoat)
    t0 = time.time()
    full = _reload(out / "base")
    train_stage(full, tok, aux_docs, recipe.aux, seed * 10 + 2, "full", progress)
    _save_model(full, tok, out / "full")
    acc["full"] = evaluate(full)
    times["full"] = time.time() - t0

    # LoRA on auxiliary data (Goat)
    t0 = time.time()
    set_seed(seed * 10 + 3)
    lcfg = LoraConfig(r=recipe.lora_rank, lora_alpha=recipe.lora_alpha, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")
    lora = get_peft_model(_reload(out / "base"), lcfg)
    train_stage(lora, tok, aux_docs, recipe.lora, seed * 10 + 3, "lora", progress)
    lora.save_pretrained(str(out / "lora"))
    tok.save_pretrained(str(out / "lora"))
    _fix_adapter_base_path(out / "lora")
    acc["lora"] = evaluate(lora)
    times["lora"] = time.time() - t0

    # chat full fine-tune (Vicuna)
    t0 = time.time()
    chat = _reload(out / "base")
    train_stage(chat, tok, lambda n, s, f: D.chat_corpus(n, s), recipe.chat, seed * 10 + 4, "chat",
                progress)
    _save_model(chat, tok, out / "chat")
    acc["chat"] = evaluate(chat)
    times["chat"] = time.time() - t0

    summary = {"seed": seed, "scale": scale,
               "base_from": None if base_from is None else str(base_from), "eval_n": eval_n, "eval_seed": recipe.eval_seed,
               "accuracy": acc, "seconds": {k: round(v, 1) for k, v in times.items()},
               "recipe": asdict(recipe)}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    if progress:
        for k in ("base", "lora", "full", "chat"):
            print(f"{k:5s} 7-box accuracy ({eval_n} prompts, seed {recipe.eval_seed}): "
                  f"{acc[k]:.3f}   [{times[k]:.0f} s]")
    return {k: acc[k] for k in ("base", "lora", "full", "chat")}


def _reload(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)


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
    accs = train_all(args.out, seed=args.seed, progress=not args.quiet, scale=args.scale,
                     base_from=args.base_from, threads=args.threads)
    print(json.dumps(accs), f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
