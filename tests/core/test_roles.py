"""The position schema: every role points at the intended tokens for three tokenizers, offsets,
bad roles; circuits with multi-position roles round-trip; multi-token mean-ablation masks."""

from __future__ import annotations

import json

import pytest
import torch

from circuitdiff.core.circuit import Circuit, CircuitEdge, CircuitGroup
from circuitdiff.core.task import (PARTITION_ROLES, EntityTrackingTask, TaskConfig, TaskError,
                                   check_role, encode, role_names)
from circuitdiff.methods.ablation import ablate_where, role_mask

TEMPLATE_WORDS = {"The", "the", "is", "in", "Box"}


def check_roles(tok, n_boxes: int = 7) -> None:
    """Every schema role of 6 prompts points at the intended token(s) for ``tok``."""
    task = EntityTrackingTask(tok, TaskConfig(n_boxes=n_boxes), seed=3)
    prompts = task.sample(6)
    batch = encode(prompts, tok)
    names = batch.role_names()
    for b, p in enumerate(prompts):
        ids = batch.input_ids[b]
        word = lambda i: tok.decode([int(ids[i])]).strip()  # noqa: E731
        role = lambda r: batch.role(r)[b]  # noqa: E731
        assert word(role("last")) == "the"
        assert word(role("query_label")) == p.query_label
        assert word(role("prev_query_label")) == p.query_label
        assert int(role("prev_query_label")) == int(role(f"label_{p.query_index}"))
        assert word(role("correct_object")) == p.answer
        for i in range(n_boxes):
            assert word(role(f"label_{i}")) == p.labels[i]
            assert word(role(f"object_{i}")) == p.objects[i]
            assert word(role(f"separator_{i}")) == ("." if i == n_boxes - 1 else ",")
        assert [word(i) for i in role("labels")] == p.labels
        assert [word(i) for i in role("objects")] == p.objects
        assert [word(i) for i in role("separators")] == [","] * (n_boxes - 1) + ["."]
        assert {word(i) for i in role("fillers")} == TEMPLATE_WORDS
        assert len(role("fillers")) == 4 * n_boxes  # "the X is in Box L" per box
        assert [word(i) for i in role("query_words")] == ["Box", "contains"]
        # offsets: the token after the queried box's label closes its segment
        assert int(role("prev_query_label+1")) == int(role(f"separator_{p.query_index}"))
        assert torch.equal(role("labels-1"), role("labels") - 1)
        # the partition roles cover every real token exactly once
        covered = torch.cat([batch.role(r)[b].view(-1) for r in PARTITION_ROLES if r in names])
        real = batch.attention_mask[b].nonzero()[:, 0]
        assert sorted(covered.tolist()) == real.tolist()
    if tok.bos_token_id is not None and batch.input_ids[0, 0] == tok.bos_token_id:
        assert "prefix" in names and [int(i) for i in batch.role("prefix")[0]] == [0]
    else:
        assert "prefix" not in names


def test_roles_word_level_tokenizer(tokenizer):
    check_roles(tokenizer)


# the SmolLM2 and Gemma-3 tokenizers (GGUF, slow to load) are checked with check_roles inside
# tests/core/test_foundation.py's position tests, which load them once


def test_bad_roles_name_the_defined_roles(tokenizer):
    batch = encode(EntityTrackingTask(tokenizer, TaskConfig(n_boxes=3)).sample(2), tokenizer)
    with pytest.raises(TaskError, match=r"unknown role 'lables'; the task defines: last, "
                                        r"query_label, prev_query_label, correct_object, label_0"):
        batch.role("lables")
    with pytest.raises(TaskError, match="label_I"):
        check_role("query")  # without a box count the per-box roles are shown generically
    with pytest.raises(TaskError, match="unknown role 'label_5'"):
        check_role("label_5", n_boxes=3)
    with pytest.raises(TaskError, match="leaves the prompt"):
        batch.role("last+1")
    with pytest.raises(TaskError, match="leaves the prompt"):
        batch.role("objects-2")  # the first object is the second token: -2 is before the text
    with pytest.raises(TaskError, match="NAME\\+K"):
        check_role("labels+")
    assert "separators" in role_names(3) and "object_2" in role_names(3)


def test_multi_token_ablation_mask_is_exactly_the_role(tokenizer):
    """Keeping heads at `labels` keeps them at every label token and nowhere else."""
    batch = encode(EntityTrackingTask(tokenizer, TaskConfig(n_boxes=4), seed=1).sample(3),
                   tokenizer)
    L, H = 3, 4
    keep_labels = torch.zeros(L, H, dtype=torch.bool)
    keep_labels[0, 1] = keep_labels[2, 3] = True
    keep_last = torch.zeros(L, H, dtype=torch.bool)
    keep_last[1, 0] = True
    where = ablate_where(batch, {"labels": keep_labels, "last": keep_last}, L, H)
    expect = torch.ones_like(where)
    for b in range(3):  # the slow, obvious way
        for t in batch.role("labels")[b].tolist():
            expect[:, b, t] = ~keep_labels
        expect[:, b, int(batch.role("last")[b])] = ~keep_last
    assert torch.equal(where, expect)
    # keep-other-positions: only the roles' own non-circuit heads are ablated
    kept = ablate_where(batch, {"labels": keep_labels}, L, H, keep_other_positions=True)
    at = role_mask(batch, "labels")
    assert torch.equal(kept, at[None, :, :, None] & ~keep_labels[:, None, None, :])


def test_circuit_with_multi_position_roles_round_trips(tmp_path):
    c = Circuit({"reader": CircuitGroup(["1.2", "1.5"], "last", "value reader @ last"),
                 "mover": CircuitGroup([(0, 3)], "labels", "object mover @ labels"),
                 "shifted": CircuitGroup([(0, 1)], "prev_query_label+1")}, 2, 8, "m",
                edges=[CircuitEdge("reader", "logits", "logits"),
                       CircuitEdge("mover", "reader", "v"),
                       CircuitEdge("shifted", "reader", "k")])
    c.save(tmp_path / "c.json")
    back = Circuit.load(tmp_path / "c.json")
    assert back.to_dict() == c.to_dict()
    assert back.groups["mover"].position == "labels" and back.edges[1].kind == "v"
    assert back.n_units() == 4
    # JSON from before roles and edges (four paper groups, no edges, no functions) still loads
    old = {"model": "x", "n_layers": 2, "n_heads": 8, "settings": {},
           "groups": {"value_fetcher": {"position": "last", "heads": ["1.0"]},
                      "structure_reader": {"position": "prev_query_label", "heads": ["0.1"]}}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    legacy = Circuit.load(tmp_path / "old.json")
    assert legacy.edges == [] and legacy.groups["value_fetcher"].function == ""
    with pytest.raises(TaskError, match="unknown role 'lables'"):
        CircuitGroup(["1.0"], "lables")
    with pytest.raises(ValueError, match="names group 'nope'"):
        Circuit({"a": CircuitGroup(["1.0"], "last")}, 2, 8, edges=[CircuitEdge("nope", "a", "q")])
