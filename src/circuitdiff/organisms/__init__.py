"""Model organisms: a miniature Llama / Vicuna / Goat / FLoat trained here on CPU.

``base`` is a small GQA ``LlamaForCausalLM`` pre-trained from scratch on synthetic text that
contains entity tracking; ``lora`` (Goat-like) is a peft LoRA adapter and ``full`` (FLoat-like) a
full fine-tune of it on auxiliary binding-like data that never uses the evaluation template;
``chat`` (Vicuna-like) is a full fine-tune on unrelated chat text. Each is an ordinary Hugging
Face folder::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(organism_path("base"))

    from peft import PeftModel
    lora = PeftModel.from_pretrained(model, organism_path("lora"))  # adapter on the base

Retrain them with ``python -m circuitdiff.organisms.train --out DIR --seed 0``.
"""

from __future__ import annotations

#: the names, the shipped weights' folder and a name's path are core's
#: (:mod:`circuitdiff.core.specs`): loading an organism never imports this package
from ..core.specs import ORGANISMS, ORGANISMS_DIR, organism_path


def is_adapter(name: str) -> bool:
    """True for organisms shipped as a peft adapter on top of ``base``."""
    return (organism_path(name) / "adapter_config.json").is_file()


__all__ = ["ORGANISMS", "ORGANISMS_DIR", "organism_path", "is_adapter"]
