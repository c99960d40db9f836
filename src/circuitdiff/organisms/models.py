"""Building, saving and reloading the organisms' models (plain Hugging Face folders)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from circuitdiff.organisms.config import ModelSpec

#: attention kernel used while training: the eager one (matmul + softmax) beats the CPU sdpa
#: kernel on these 16-wide heads (bench/organism_step.py); the math is the same
TRAIN_ATTENTION = "eager"


def set_seed(seed: int) -> None:
    """Seed Python's and torch's generators (every stage's data and init derive from it)."""
    random.seed(seed)
    torch.manual_seed(seed)


def make_model(tokenizer, spec: ModelSpec, seed: int):
    """A freshly initialised ``LlamaForCausalLM`` of size ``spec`` (initialised from ``seed``)."""
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


def reload_model(folder: Path):
    """A saved full model, in float32 with the training attention kernel (the saved config does
    not pin the kernel, so users get their own default)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                attn_implementation=TRAIN_ATTENTION)


def save_model(model, tokenizer, folder: Path) -> None:
    """Save a full model and its tokenizer as a Hugging Face folder (safetensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))


def save_adapter(model, tokenizer, folder: Path) -> None:
    """Save a peft adapter and the tokenizer, pointing the adapter at the sibling ``../base``
    folder (relative), whatever path trained it."""
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    p = folder / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg["base_model_name_or_path"] = "../base"
    p.write_text(json.dumps(cfg, indent=2))


__all__ = ["TRAIN_ATTENTION", "make_model", "reload_model", "save_adapter", "save_model",
           "set_seed"]
