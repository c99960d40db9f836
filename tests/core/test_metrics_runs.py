"""One metric module and one settings digest: the pieces every method shares."""

from __future__ import annotations

import torch

from circuitdiff.core.metrics import answer_prob, correct, in_context_prediction
from circuitdiff.core.runs import RunFolder, model_tag, safe_name, settings_digest
from circuitdiff.core.task import EntityTrackingTask, TaskConfig, batches, encode


def _batch(tokenizer, n=4):
    return encode(EntityTrackingTask(tokenizer, TaskConfig(n_boxes=3), seed=0).sample(n),
                  tokenizer)


def test_correct_and_in_context(tokenizer):
    b = _batch(tokenizer)
    V = len(tokenizer)
    logits = torch.zeros(len(b), V)
    logits[torch.arange(len(b)), b.answer_ids] = 5.0
    assert correct(logits, b).all() and correct(logits, b, "in_context").all()
    # a non-object token wins the full argmax, but the answer still leads among the objects
    logits[:, 0] = 10.0
    assert not correct(logits, b).any() and correct(logits, b, "in_context").all()
    # objects padded with -1 are never predicted
    objs = b.object_ids.clone()
    objs[:, -1] = -1
    assert (in_context_prediction(logits, objs) >= 0).all()


def test_answer_prob_is_softmax_of_the_answer():
    logits = torch.randn(3, 7)
    ans = torch.tensor([0, 4, 6])
    want = logits.softmax(-1)[torch.arange(3), ans]
    assert torch.allclose(answer_prob(logits, ans), want)


def test_batch_repeat_is_variant_major(tokenizer):
    b = _batch(tokenizer, 3)
    r = b.repeat(2)
    assert len(r) == 6
    assert torch.equal(r.input_ids[3:], b.input_ids) and torch.equal(r.input_ids[:3], b.input_ids)
    assert torch.equal(r.positions["box_label"][4], b.positions["box_label"][1])
    prompts = EntityTrackingTask(tokenizer, TaskConfig(n_boxes=3)).sample(5)
    assert [len(x) for x in batches(prompts, tokenizer, 2)] == [2, 2, 1]


def test_settings_digest_is_stable():
    # cache keys of existing run folders depend on this exact value: never change it silently
    assert settings_digest({"b": 1, "a": [1, 2]}) == settings_digest({"a": [1, 2], "b": 1})
    assert settings_digest({"a": 1}) == "f9d86028c6e0d64e"
    assert len(settings_digest({"a": 1}, 10)) == 10


def test_names_and_cached_steps(tmp_path):
    assert safe_name("a/b c") == "a_b_c" and safe_name("///") == "unnamed"
    assert model_tag("x/organism:base") != model_tag("y/organism:base")
    folder = RunFolder(tmp_path)
    calls = []
    compute = lambda: calls.append(1) or {"v": len(calls)}  # noqa: E731
    assert folder.cached("s.json", {"k": 1}, compute) == {"v": 1}
    assert folder.cached("s.json", {"k": 1}, compute) == {"v": 1}   # loaded, not recomputed
    assert folder.cached("s.json", {"k": 2}, compute) == {"v": 2}   # settings changed
