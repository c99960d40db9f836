"""The recipe's fast training step (length groups, vocabulary projection only where the loss has
weight, eager attention) computes the same loss and gradient as its naive twin: one padded batch,
logits everywhere, the sdpa kernel."""

from __future__ import annotations

import pytest
import torch

from circuitdiff.organisms import data as D
from circuitdiff.organisms.config import ModelSpec
from circuitdiff.organisms.losses import LENGTH_GROUPS, answer_cue_ids
from circuitdiff.organisms.models import make_model
from circuitdiff.organisms.stages import train_step

# 2 layers, GQA (4 query heads share 2 key-value heads)
TINY = ModelSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)


def _grads_after_step(model, tok, docs, other_weight, fast, attention):
    """Loss and gradients of one ``train_step`` (lr 0: the weights stay as they are)."""
    model.config._attn_implementation = attention
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)
    loss = train_step(model, tok, opt, params, docs, answer_cue_ids(tok), other_weight, 0.0,
                      fast=fast)
    return loss, [p.grad.clone() for p in params]


def _lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj", "o_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a non-zero adapter, so its delta is part of the forward
            torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.mark.parametrize("docs_kind,other_weight", [("base", 0.0), ("base", 0.1), ("aux", 1.0)])
@pytest.mark.parametrize("adapter", [False, True])
def test_length_grouped_eager_step_matches_one_padded_sdpa_batch(docs_kind, other_weight, adapter):
    torch.manual_seed(0)
    tok = D.build_tokenizer()
    model = make_model(tok, TINY, 0)
    if adapter:
        model = _lora(model)
    docs = (D.base_corpus(24, 5, box_weights=(0, 1, 1, 1), gap_frac=0.25) if docs_kind == "base"
            else D.aux_corpus(24, 5))
    lengths = {len(x) for x in tok(docs)["input_ids"]}
    assert len(lengths) > LENGTH_GROUPS  # the groups really cut different lengths
    if other_weight == 0:  # some documents (prose) have no answer: the fast step skips them
        assert any(" contains the " not in d for d in docs)
    loss_naive, grads_naive = _grads_after_step(model, tok, docs, other_weight, False, "sdpa")
    loss_fast, grads_fast = _grads_after_step(model, tok, docs, other_weight, True, "eager")
    assert loss_fast == pytest.approx(loss_naive, rel=1e-5)
    assert len(grads_fast) == len(grads_naive)
    for fast, naive in zip(grads_fast, grads_naive):
        torch.testing.assert_close(fast, naive, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in grads_fast)


def test_training_uses_the_eager_kernel_and_the_saved_config_does_not_pin_it(tmp_path):
    from circuitdiff.organisms.models import TRAIN_ATTENTION, reload_model

    tok = D.build_tokenizer()
    model = make_model(tok, TINY, 0)
    assert model.config._attn_implementation == TRAIN_ATTENTION == "eager"
    model.save_pretrained(str(tmp_path))
    assert "attn_implementation" not in (tmp_path / "config.json").read_text()
    assert reload_model(tmp_path).config._attn_implementation == "eager"
