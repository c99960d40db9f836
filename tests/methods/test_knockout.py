"""Attention knockout through the model's own attention masks (eager and sdpa, tiny models)."""

from __future__ import annotations

import pytest
import torch

from circuitdiff.core.metrics import last_logits
from circuitdiff.methods.accuracy import evaluate_accuracy
from circuitdiff.methods.knockout import (Edge, KnockoutError, _edited_mask, attention_knockout,
                                  block_matrix, knockout_curve)
from circuitdiff.report.figures import plot_knockout_curves
from circuitdiff.core.model import LoadedModel
from circuitdiff.core.task import POSITION_NAMES, EntityTrackingTask, TaskConfig, encode

torch.set_num_threads(1)


@pytest.fixture()
def prompts(tokenizer):
    return EntityTrackingTask(tokenizer, TaskConfig(n_boxes=4), seed=0).sample(10)


def with_impl(loaded: LoadedModel, impl: str) -> LoadedModel:
    loaded.model.config._attn_implementation = impl
    return loaded


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_knockout_of_nothing_is_the_model(tiny, prompts, impl):
    tiny = with_impl(tiny, impl)
    b = encode(prompts, tiny.tokenizer)
    plain = last_logits(tiny, b)
    T = b.input_ids.shape[1]
    with attention_knockout(tiny.arch, torch.zeros(len(b), T, T, dtype=torch.bool), 0):
        assert torch.equal(last_logits(tiny, b), plain)
    # an edge blocked from a layer past the last one does nothing either
    blk = block_matrix(b, Edge.parse("last:all"))
    with attention_knockout(tiny.arch, blk, tiny.arch.n_layers):
        assert torch.equal(last_logits(tiny, b), plain)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_knockout_last_to_all_at_layer0_changes_output(tiny, prompts, impl):
    tiny = with_impl(tiny, impl)
    b = encode(prompts, tiny.tokenizer)
    plain = last_logits(tiny, b)
    with attention_knockout(tiny.arch, block_matrix(b, Edge.parse("last:all")), 0):
        ko = last_logits(tiny, b)
    assert torch.isfinite(ko).all()
    assert not torch.allclose(ko, plain, atol=1e-4)


def test_eager_and_sdpa_masks_agree(tiny, prompts):
    """Additive float mask (eager), bool mask and materialised None mask (sdpa) block the same."""
    b = encode(prompts, tiny.tokenizer)
    blk = block_matrix(b, Edge.parse("last:correct_object")) | \
        block_matrix(b, Edge.parse("query_label:prev_query_label"))
    out = {}
    for impl in ("eager", "sdpa"):
        with_impl(tiny, impl)
        with attention_knockout(tiny.arch, blk, 1):
            out[impl] = last_logits(tiny, b)
    torch.testing.assert_close(out["eager"], out["sdpa"], rtol=1e-4, atol=1e-5)
    # padding (a shorter prompt in the batch) makes sdpa pass a real bool mask instead of None
    short = EntityTrackingTask(tiny.tokenizer, TaskConfig(n_boxes=3), seed=1).sample(3)
    bp = encode(prompts[:3] + short, tiny.tokenizer)
    blk = block_matrix(bp, Edge.parse("last:correct_object"))
    for impl in ("eager", "sdpa"):
        with_impl(tiny, impl)
        with attention_knockout(tiny.arch, blk, 0):
            out[impl] = last_logits(tiny, bp)
    torch.testing.assert_close(out["eager"], out["sdpa"], rtol=1e-4, atol=1e-5)


def test_blocked_entries_get_zero_attention_only_from_layer_L(tiny, prompts):
    tiny = with_impl(tiny, "eager")
    b = encode(prompts, tiny.tokenizer)
    blk = block_matrix(b, Edge.parse("last:correct_object"))
    rows = torch.arange(len(b))
    q, k = b.positions["last"], b.positions["correct_object"]
    with attention_knockout(tiny.arch, blk, 1):
        att = tiny.model(**b.model_inputs(), output_attentions=True).attentions
    assert (att[0][rows, :, q, k] > 0).all()
    for layer in (1, 2):
        assert (att[layer][rows, :, q, k] == 0).all()
        # the rest of the row still sums to one (only that entry was removed)
        torch.testing.assert_close(att[layer][rows, :, q].sum(-1), torch.ones(len(b), 4))


def test_curve_batched_over_layers_equals_separate_runs(tiny, prompts):
    tiny = with_impl(tiny, "sdpa")
    curve = knockout_curve(tiny, prompts, "last:all", batch_size=4, max_rows=8)
    assert curve.layers == [0, 1, 2] and curve.n == len(prompts)
    ref = evaluate_accuracy(tiny, prompts)
    assert curve.baseline == ref.accuracy and curve.baseline_in_context == ref.in_context_accuracy
    b = encode(prompts, tiny.tokenizer)
    blk = block_matrix(b, Edge.parse("last:all"))
    for L, acc, ctx in zip(curve.layers, curve.accuracy, curve.in_context_accuracy):
        with attention_knockout(tiny.arch, blk, L):
            logits = last_logits(tiny, b)
        objs = b.object_ids
        pred_ctx = objs.gather(1, logits.gather(1, objs).argmax(-1, keepdim=True))[:, 0]
        assert acc == (logits.argmax(-1) == b.answer_ids).double().mean().item()
        assert ctx == (pred_ctx == b.answer_ids).double().mean().item()
    assert curve.in_context_accuracy != [curve.baseline_in_context] * 3 or curve.accuracy != \
        [curve.baseline] * 3


def test_random_edge_avoids_named_positions_and_is_seeded(tiny, prompts):
    b = encode(prompts, tiny.tokenizer)
    e = Edge.parse("random")
    assert e == Edge("last", "random")
    a = block_matrix(b, e, torch.Generator().manual_seed(0))
    assert torch.equal(a, block_matrix(b, e, torch.Generator().manual_seed(0)))
    assert not torch.equal(a, block_matrix(b, e, torch.Generator().manual_seed(1)))
    assert (a.sum((1, 2)) == 1).all()
    rows = torch.arange(len(b))
    key = a[rows, b.positions["last"]].float().argmax(-1)
    for name in POSITION_NAMES:
        assert (key != b.positions[name]).all()
    curve = knockout_curve(tiny, prompts, "random", layers=[0, 2], seed=3)
    assert curve.layers == [0, 2] and curve.seed == 3


def test_bad_edges_and_masks(tiny, prompts):
    for bad in ("last", "last:nowhere", "lables:last", "last:last", "a:b:c", "all:last"):
        with pytest.raises(KnockoutError):
            Edge.parse(bad)
    with pytest.raises(KnockoutError, match="unknown role 'nowhere'.*the task defines: last"):
        Edge.parse("last:nowhere")
    with pytest.raises(KnockoutError, match="layer 7"):
        knockout_curve(tiny, prompts, "last:correct_object", layers=[7])
    hidden = torch.zeros(2, 5, 8)
    with pytest.raises(KnockoutError, match="sdpa"):
        _edited_mask(torch.ones(2, 5), torch.zeros(2, 5, 5, dtype=torch.bool), hidden)


def test_knockout_on_lora_model_and_plot(tiny_lora, prompts, tmp_path):
    c = knockout_curve(tiny_lora, prompts, "query_label:prev_query_label")
    assert c.baseline == evaluate_accuracy(tiny_lora, prompts).accuracy
    png = plot_knockout_curves([c], tmp_path / "k.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_knockout(tmp_path, tokenizer, capsys):
    import json

    from conftest import tiny_llama
    from circuitdiff.cli import main

    d = tmp_path / "model"
    tiny_llama(len(tokenizer)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    out = tmp_path / "run"
    argv = ["knockout", "--model", str(d), "--n-boxes", "4", "-n", "6", "--out", str(out),
            "--edge", "last:correct_object", "--edge", "random", "--layers", "0-1"]
    assert main(argv) == 0
    assert "last:correct_object" in capsys.readouterr().out
    curves = json.loads(next(out.glob("knockout/*/curves.json")).read_text())
    assert [c["edge"] for c in curves] == ["last:correct_object", "last:random"]
    assert [c["layers"] for c in curves] == [[0, 1], [0, 1]]
    assert next(out.glob("knockout/*/knockout.png")).read_bytes()[:4] == b"\x89PNG"
    assert main(argv[:-2] + ["--edge", "last:nowhere"]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_edges_between_schema_roles(tiny, prompts):
    """Any role of the schema, several tokens or an offset, on either side of an edge."""
    b = encode(prompts, tiny.tokenizer)
    blk = block_matrix(b, Edge.parse("labels:objects"))
    expect = torch.zeros_like(blk)
    for i in range(len(b)):  # the slow, obvious way
        for q in b.role("labels")[i].tolist():
            for k in b.role("objects")[i].tolist():
                expect[i, q, k] = True
    assert torch.equal(blk, expect)
    off = block_matrix(b, Edge.parse("last:prev_query_label+1"))
    rows = torch.arange(len(b))
    assert off[rows, b.role("last"), b.role("prev_query_label") + 1].all() and off.sum() == len(b)
    curve = knockout_curve(tiny, prompts, "labels:objects", layers=[0, 1])
    assert curve.edge == "labels:objects" and len(curve.accuracy) == 2


def test_knockout_run_caches_each_edge_and_resumes(tiny, tmp_path, monkeypatch):
    import circuitdiff.methods.knockout as ko
    from dataclasses import replace

    cfg = ko.KnockoutConfig(edges=("last:correct_object", "random"), layers=(0, 2), n=6,
                            seed=1, n_boxes=4, batch_size=4, max_rows=8)
    assert cfg.edges == ("last:correct_object", "last:random")
    assert cfg.cache_key() == {"edges": ["last:correct_object", "last:random"], "layers": [0, 2],
                               "n": 6, "seed": 1, "n_boxes": 4}
    res = ko.run(tiny, None, cfg, store=tmp_path)
    assert [c.edge for c in res.curves] == list(cfg.edges) and res.curves[0].n == 6
    prompts = EntityTrackingTask(tiny.tokenizer, TaskConfig(n_boxes=4), seed=1).sample(6)
    assert res.curves[0] == knockout_curve(tiny, prompts, "last:correct_object", [0, 2], seed=1)
    # a rerun (other batching) reads every curve; other boxes are another key (the study's
    # old key left n_boxes out)
    def recomputed(*a, **k):
        raise RuntimeError("recomputed")

    monkeypatch.setattr(ko, "knockout_curve", recomputed)
    assert ko.run(tiny, None, replace(cfg, batch_size=2), store=tmp_path) == res
    with pytest.raises(RuntimeError, match="recomputed"):
        ko.run(tiny, None, replace(cfg, n_boxes=3), store=tmp_path)


def test_knockout_config_is_checked():
    from circuitdiff.methods.knockout import KnockoutConfig

    with pytest.raises(KnockoutError, match="edges is empty"):
        KnockoutConfig(edges=())
    with pytest.raises(KnockoutError, match="nowhere"):
        KnockoutConfig(edges=("last:nowhere",))
    with pytest.raises(KnockoutError, match="layers"):
        KnockoutConfig(layers=(-1,))
    with pytest.raises(KnockoutError, match="n must be >= 1"):
        KnockoutConfig(n=0)
