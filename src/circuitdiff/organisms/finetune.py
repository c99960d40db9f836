"""Fine-tune families of a real pretrained model on CPU, the way the paper's were made.

The paper compares Llama-7B with Goat-7B (a LoRA fine-tune on arithmetic) and FLoat-7B (the same
data, all weights trained). This module makes the same pair for any causal LM that
:func:`circuitdiff.core.model.load_model` loads (the shipped recipe uses Qwen2.5-Coder-0.5B):

* ``kind="lora"`` — a peft LoRA adapter (rank ``rank`` on every attention projection), saved
  un-merged as an adapter folder whose ``base_model_name_or_path`` is the base *spec*, so
  ``--model FOLDER`` loads base plus adapter;
* ``kind="attention"`` — a partial fine-tune: every attention projection (q, k, v, o with their
  biases) trained, MLPs, norms and embeddings frozen, saved as a full Hugging Face folder.

The data are never the evaluation template: the organism recipe's auxiliary corpus
(:func:`circuitdiff.organisms.data.aux_corpus` — tracking in other wordings, "the apple sits in
crate F", and code-like variable binding ``x = 5 ; print x -> 5``), trained with the plain
next-token loss on whole documents. Training stops after ``steps`` or ``minutes`` of wall time,
whichever comes first (the CPU budget), and the result records the 7-box accuracy before and
after on ``n_eval`` evaluation prompts, the steps run, the loss curve, and the sha256 of the saved
weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.config import Config, execution
from ..core.task import EntityTrackingTask, TaskConfig
from .data import aux_corpus

KINDS = ("lora", "attention")
#: the attention projections every kind trains (structural names of Llama/Qwen2/Gemma layers)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class FinetuneConfig(Config):
    """One fine-tune of the family (every field is recorded with the result)."""

    #: ``lora`` (peft adapter) or ``attention`` (every attention projection trained)
    kind: str = "lora"
    #: LoRA rank (``lora`` only); alpha is twice the rank
    rank: int = 8
    #: AdamW learning rate (None: 5e-4 for ``lora``, 1e-5 for ``attention``, whose full weights
    #: a LoRA-sized rate wrecks within two steps)
    lr: float | None = None
    #: optimiser steps at most
    steps: int = 400
    #: documents per step
    batch_size: int = 8
    #: wall-time budget in minutes (training stops at the first step past it)
    minutes: float = 25.0
    #: training-data seed (documents and LoRA init)
    seed: int = 0
    #: boxes per tracking document, at least and at most
    min_boxes: int = 3
    max_boxes: int = 7
    #: evaluation prompts (7 boxes, seed 0) measured before and after
    n_eval: int = 100
    #: torch threads while training
    threads: int = execution(1)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        self.check_at_least(("rank", "steps", "batch_size", "n_eval", "threads"))
        if self.lr is None:
            self.lr = 5e-4 if self.kind == "lora" else 1e-5
        if not (self.lr > 0 and self.minutes > 0):
            raise ValueError("lr and minutes must be > 0")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def seven_box_accuracy(loaded, n: int, seed: int = 0, batch_size: int = 25) -> float:
    """Accuracy on ``n`` 7-box evaluation prompts of ``seed`` (the number every table reports)."""
    from ..methods.accuracy import evaluate_accuracy

    prompts = EntityTrackingTask(loaded.tokenizer, TaskConfig(n_boxes=7), seed=seed).sample(n)
    return evaluate_accuracy(loaded, prompts, batch_size).accuracy


def _trainable(model: torch.nn.Module, cfg: FinetuneConfig) -> torch.nn.Module:
    if cfg.kind == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(cfg.seed)
        model = get_peft_model(model, LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank,
                                                 lora_dropout=0.0, target_modules=list(ATTENTION)))
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(any(f".{m}." in name for m in ATTENTION))
    return model


def finetune(base: str, out: str | Path, cfg: FinetuneConfig | None = None,
             progress: bool = True) -> dict:
    """Fine-tune ``base`` (a spec) by ``cfg`` and save it to ``out``; returns the record (also
    written to ``out/finetune.json``)."""
    from tqdm.auto import tqdm

    from ..core.model import LoadedModel, load_model
    from ..core.arch import resolve

    cfg = cfg or FinetuneConfig()
    out = Path(out)
    torch.set_num_threads(cfg.threads)
    loaded = load_model(base)
    tok = loaded.tokenizer
    acc_before = seven_box_accuracy(loaded, cfg.n_eval)
    model = _trainable(loaded.model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trained = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    docs = aux_corpus(cfg.steps * cfg.batch_size, cfg.seed, min_boxes=cfg.min_boxes,
                      max_boxes=cfg.max_boxes)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    losses, start = [], time.monotonic()
    bar = tqdm(range(cfg.steps), desc=f"finetune {cfg.kind}", disable=not progress)
    for step in bar:
        enc = tok(docs[step * cfg.batch_size:(step + 1) * cfg.batch_size], return_tensors="pt",
                  padding=True)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if time.monotonic() - start > cfg.minutes * 60:
            break
    train_s = time.monotonic() - start
    model.eval()
    for p in params:
        p.requires_grad_(False)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.kind == "lora":
        model.save_pretrained(out)
        acfg = json.loads((out / "adapter_config.json").read_text())
        acfg["base_model_name_or_path"] = base
        (out / "adapter_config.json").write_text(json.dumps(acfg, indent=2))
        weights = out / "adapter_model.safetensors"
        tuned = LoadedModel(model, tok, resolve(model), str(out))
    else:
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        weights = out / "model.safetensors"
        tuned = LoadedModel(model, tok, resolve(model), str(out))
    acc_after = seven_box_accuracy(tuned, cfg.n_eval)
    record = {"base": base, "kind": cfg.kind, "config": cfg.to_dict(),
              "data": f"organisms.data.aux_corpus(seed={cfg.seed}, boxes {cfg.min_boxes}-"
                      f"{cfg.max_boxes}): tracking in non-evaluation wordings + variable binding",
              "trained_parameters": n_trained, "steps_run": len(losses),
              "train_seconds": round(train_s, 1), "threads": cfg.threads,
              "loss_first": losses[0] if losses else math.nan,
              "loss_last10": sum(losses[-10:]) / max(1, len(losses[-10:])),
              "losses": [round(x, 4) for x in losses],
              "accuracy_7box": {"n": cfg.n_eval, "seed": 0, "before": acc_before,
                                "after": acc_after, "change": acc_after - acc_before},
              "weights": weights.name, "sha256": sha256_file(weights)}
    (out / "finetune.json").write_text(json.dumps(record, indent=2))
    return record


__all__ = ["FinetuneConfig", "KINDS", "finetune", "seven_box_accuracy", "sha256_file"]
