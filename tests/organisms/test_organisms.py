"""Shipped model organisms load with plain transformers/peft and keep their recorded accuracy."""

from __future__ import annotations

import json

import pytest
import torch

from circuitdiff.organisms import ORGANISMS, organism_path
from circuitdiff.core.task import DEFAULT_LABELS, DEFAULT_OBJECTS, EntityTrackingTask, TaskConfig, \
    encode, locate

# 7-box accuracy on EntityTrackingTask(tok, TaskConfig(n_boxes=7), seed=1234).sample(100),
# measured on the shipped weights (README figures use 500 prompts, seed 0: see the report).
EXPECTED_ACC_100_SEED1234 = {"base": 0.61, "lora": 0.98, "full": 0.99, "chat": 0.57}
# same organisms on EntityTrackingTask(..., seed=0).sample(500, seed=0) (the README figures):
# base 0.568, lora 0.930, full 0.954, chat 0.540
TOLERANCE = 0.05


def _load(name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = organism_path(name)
    tok = AutoTokenizer.from_pretrained(str(folder))
    if name == "lora":
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(str(organism_path("base")))
        model = PeftModel.from_pretrained(base, str(folder))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(folder))
    return model.eval(), tok


@torch.no_grad()
def _accuracy(model, tok, n=100, seed=1234):
    task = EntityTrackingTask(tok, TaskConfig(n_boxes=7), seed=seed)
    b = encode(task.sample(n), tok, padding_side="left")
    logits = model(**b.model_inputs()).logits
    pred = logits[torch.arange(len(b)), b.positions["last"]].argmax(-1)
    return (pred == b.answer_ids).float().mean().item()


def test_organism_names():
    assert ORGANISMS == ("base", "lora", "full", "chat")
    with pytest.raises(ValueError, match="base, lora, full, chat"):
        organism_path("llama")


def test_tokenizer_fits_task():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(organism_path("base")))
    assert tok.is_fast
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert tok.bos_token_id is not None
    task = EntityTrackingTask(tok, TaskConfig(n_boxes=7), seed=0)
    assert set(task.objects) == set(DEFAULT_OBJECTS)
    assert set(task.labels) == set(DEFAULT_LABELS)
    for p in task.sample(5, seed=3):
        loc = locate(p, tok)
        toks = tok.convert_ids_to_tokens(loc.input_ids)
        assert toks[loc.positions["last"]] == " the"
        assert toks[loc.positions["query_label"]] == " " + p.query_label
        assert toks[loc.positions["prev_query_label"]] == " " + p.query_label
        assert toks[loc.positions["correct_object"]] == " " + p.answer
        assert loc.positions["query_label"] == loc.positions["last"] - 2
        assert [toks[i] for i in loc.box_label_positions] == [" " + l for l in p.labels]


@pytest.mark.parametrize("name", ORGANISMS)
def test_organism_accuracy(name):
    model, tok = _load(name)
    if name == "lora":
        assert json.loads((organism_path("lora") / "adapter_config.json").read_text())[
            "base_model_name_or_path"] == "../base"
    acc = _accuracy(model, tok)
    expected = EXPECTED_ACC_100_SEED1234[name]
    assert expected is not None
    assert abs(acc - expected) <= TOLERANCE, (name, acc, expected)


@pytest.mark.slow  # a scaled recipe run (~10-30 s)
def test_training_recipe_smoke(tmp_path):
    from circuitdiff.organisms.config import ModelSpec
    from circuitdiff.organisms.recipe import train_all

    spec = ModelSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2)
    accs = train_all(tmp_path, seed=0, progress=False, scale=0.002, model_spec=spec, eval_n=8,
                     check_targets=False)
    assert set(accs) == set(ORGANISMS)
    assert all(0.0 <= a <= 1.0 for a in accs.values())
    from transformers import AutoModelForCausalLM
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    PeftModel.from_pretrained(base, str(tmp_path / "lora"))
    for name in ("full", "chat"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / name))
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == "../base"


@pytest.mark.slow  # a scaled recipe run through the CLI (~20 s)
def test_cli_organisms_list_and_train(tmp_path, capsys):
    from circuitdiff.cli import main

    assert main(["organisms", "list"]) == 0
    listed = capsys.readouterr().out
    assert all(f"organism:{n}" in listed for n in ORGANISMS)
    # the CLI reaches the same recipe (a tiny scale keeps this a smoke run)
    assert main(["organisms", "train", "--out", str(tmp_path), "--scale", "0.0005",
                 "--json"]) == 0
    out = capsys.readouterr().out
    assert set(json.loads(out)["accuracy"]) == {"base", "lora", "full", "chat"}
    assert (tmp_path / "lora" / "adapter_config.json").exists()


def test_answer_weighted_loss_targets_the_query_answers():
    from circuitdiff.organisms.data import build_tokenizer
    from circuitdiff.organisms.losses import (answer_cue_ids, loss_weights, tensorize,
                                              weighted_lm_loss)

    tok = build_tokenizer()
    ids, mask, labels = tensorize(["The apple is in Box F, the map is in Box C. Box C contains "
                                   "the map.", "Tom sees the cat."], tok)
    w = loss_weights(ids, labels, answer_cue_ids(tok), other_weight=0.0)
    # exactly one weighted token: the answer " map" of the first document
    assert w.sum().item() == 1.0
    r, c = torch.nonzero(w)[0].tolist()
    assert r == 0 and tok.convert_ids_to_tokens(int(ids[r, c])) == " map"
    assert tok.convert_ids_to_tokens(int(ids[r, c - 1])) == " the"
    # the auxiliary wordings' answers weigh too, and nothing else in them
    aux = ["The map is inside Box C, the cup is inside Box F. Box F holds the cup.",
           "map : C ; cup : F ; which crate ? F -> cup ;",
           "put the map into bin C , put the cup into bin F . what is inside bin F ? the cup ."]
    aids, _, alabels = tensorize(aux, tok)
    aw = loss_weights(aids, alabels, answer_cue_ids(tok), other_weight=0.0)
    assert aw.sum(1).tolist() == [1.0, 1.0, 1.0]
    assert {tok.convert_ids_to_tokens(int(aids[r, c])) for r, c in torch.nonzero(aw).tolist()} == {" cup"}
    # padding never weighs, and other_weight=1 is plain next-token loss
    w1 = loss_weights(ids, labels, answer_cue_ids(tok), other_weight=1.0)
    assert (w1[mask == 0] == 0).all()
    torch.manual_seed(0)
    logits = torch.randn(*ids.shape, len(tok))
    plain = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, len(tok)),
                                              labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(weighted_lm_loss(logits, labels, w1), plain, atol=1e-6)
    # answer-only loss is the cross-entropy of that one answer token
    answer_ce = torch.nn.functional.cross_entropy(logits[r, c - 1][None], ids[r, c][None])
    assert torch.allclose(weighted_lm_loss(logits, labels, w), answer_ce, atol=1e-6)


def test_aux_corpus_styles_restrict_the_wording():
    """``styles`` draws only the named auxiliary wordings; the default never uses the evaluation
    wording and is a pure function of the seed."""
    from circuitdiff.organisms.data import aux_corpus

    inside = aux_corpus(60, 3, binding_frac=0.0, styles=(3,))
    assert all(" inside Box " in d for d in inside)
    crates = aux_corpus(60, 3, binding_frac=0.0, styles=(0, 2))
    assert not any(" inside Box " in d or " -> " in d for d in crates)
    default = aux_corpus(200, 5)
    assert default == aux_corpus(200, 5)
    assert any(" inside Box " in d for d in default) and any(" -> " in d for d in default)
    assert not any(" contains the " in d or " is in Box " in d for d in default)
    for bad in ((4,), ()):
        with pytest.raises(ValueError, match="styles"):
            aux_corpus(4, 0, styles=bad)


def test_base_corpus_aux_wording_share():
    from circuitdiff.organisms.data import base_corpus

    kw = dict(box_weights=(0, 1, 1, 1))
    # the option off leaves the corpus as it was; on, a share of contexts leaves the eval wording
    assert base_corpus(50, 3, **kw) == base_corpus(50, 3, aux_wording_frac=0.0, **kw)
    tracking = lambda docs: [d for d in docs if "Box" in d or ";" in d or "put" in d]  # noqa: E731
    allaux = tracking(base_corpus(200, 3, aux_wording_frac=1.0, **kw))
    assert allaux and not any(" contains the" in d for d in allaux)
    half = tracking(base_corpus(400, 3, aux_wording_frac=0.5, **kw))
    share = sum(" contains the" not in d for d in half) / len(half)
    assert 0.35 < share < 0.65


def test_base_corpus_gap_puts_prose_between_context_and_query():
    from circuitdiff.organisms.data import base_corpus

    kw = dict(box_weights=(0, 1, 1), tracking_frac=1.0)
    assert base_corpus(50, 4, **kw) == base_corpus(50, 4, gap_frac=0.0, **kw)
    for doc in base_corpus(40, 4, gap_frac=1.0, **kw):
        context, _, rest = doc.partition(". ")
        query = rest[rest.rindex(" Box ") + 1:] if " Box " in rest else rest
        gap = rest[:len(rest) - len(query)].strip()
        assert context.count(" is in Box ") >= 1 and query.startswith("Box ")
        assert gap and "Box" not in gap, doc   # 1-3 prose sentences, then the query
