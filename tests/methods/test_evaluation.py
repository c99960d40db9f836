"""Mean ablation, faithfulness, completeness, minimality and cross-model comparison (tiny models)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from circuitdiff.methods.ablation import (AblationError, ablation_edits, cached_means,
                                  circuit_accuracy, circuit_keep, compute_means, variant_accuracies,
                                  variant_logits, without)
from circuitdiff.core.metrics import last_logits
from circuitdiff.core.arch import ArchitectureError
from circuitdiff.core.circuit import Circuit, CircuitGroup
from dataclasses import replace

from circuitdiff.core.pool import ModelPool
from circuitdiff.methods import evaluation
from circuitdiff.methods.evaluation import AnalysisConfig, EvalConfig, head_overlap
from circuitdiff.methods.completeness import completeness
from circuitdiff.methods.faithfulness import (FaithfulnessRow, evaluate_faithfulness, faithfulness,
                                              random_baseline, random_circuits)
from circuitdiff.report.figures import plot_completeness
from circuitdiff.report.tables import format_matrix, format_table, save_table
from circuitdiff.core.interventions import Hook, Read, Write, run_with_edits
from circuitdiff.methods.minimality import batched_evaluator, minimality
from circuitdiff.core.runs import RunFolder
from circuitdiff.core.task import EntityTrackingTask, TaskConfig, encode

torch.set_num_threads(1)
N_BOXES = 4


@pytest.fixture()
def task(tokenizer):
    return EntityTrackingTask(tokenizer, TaskConfig(n_boxes=N_BOXES), seed=0)


@pytest.fixture()
def prompts(task):
    return task.sample(12)


@pytest.fixture()
def means(tiny, task):
    return compute_means(tiny, task.sample(20, seed=5), batch_size=8)


def make_circuit(groups, layers=3, heads=4):
    return Circuit({name: CircuitGroup(hs, pos) for name, (pos, hs) in groups.items()},
                   layers, heads, "tiny")


def all_heads(layers=3, heads=4):
    return [(l, h) for l in range(layers) for h in range(heads)]


# -- means ----------------------------------------------------------------------------------------
def test_means_are_per_position_averages(tiny, task):
    mp = task.sample(10, seed=5)
    m = compute_means(tiny, mp, batch_size=3).means  # uneven batches
    b = encode(mp, tiny.tokenizer)
    read = Read(range(3))
    run_with_edits(tiny.model, b.model_inputs(), [read], tiny.arch)
    ref = torch.stack([read.out[l].mean(0) for l in range(3)])
    assert m.shape == (3, b.input_ids.shape[1], 4, 16)
    torch.testing.assert_close(m, ref, rtol=1e-5, atol=1e-6)


def test_means_cached_in_run_folder(tiny, task, tmp_path, monkeypatch):
    mp = task.sample(6, seed=5)
    folder = RunFolder(tmp_path)
    a = cached_means(folder, tiny, mp, {"n_mean": 6, "seed": 5})
    import circuitdiff.methods.ablation as ab
    monkeypatch.setattr(ab, "compute_means", lambda *a, **k: pytest.fail("recomputed"))
    b = cached_means(folder, tiny, mp, {"n_mean": 6, "seed": 5})
    assert torch.equal(a.means, b.means)
    assert list((tmp_path / "means").glob("*.safetensors"))


# -- ablation semantics -------------------------------------------------------------------------
def test_full_circuit_with_positions_intact_is_the_model(tiny, prompts, means):
    c = make_circuit({"a": ("last", all_heads()), "b": ("query_label", all_heads())})
    b = encode(prompts, tiny.tokenizer)
    plain = last_logits(tiny, b)
    assert torch.equal(last_logits(tiny, b, ablation_edits(means, b, circuit_keep(c), True)), plain)
    # the same through the batched variant path (stacked rows), and the accuracy
    v = variant_logits(tiny, prompts, means, [circuit_keep(c)], keep_other_positions=True)
    torch.testing.assert_close(v[0], plain, rtol=1e-5, atol=1e-5)
    full = circuit_accuracy(tiny, prompts, means, c, keep_other_positions=True)
    from circuitdiff.methods.accuracy import evaluate_accuracy
    ref = evaluate_accuracy(tiny, prompts)
    assert full.correct == ref.correct and full.predictions == ref.predictions
    # ...while ablating the other positions does change the model
    assert not torch.allclose(last_logits(tiny, b, ablation_edits(means, b, circuit_keep(c))), plain)


def test_empty_circuit_is_every_head_at_its_mean(tiny, prompts, means):
    c = make_circuit({"a": ("last", []), "b": ("query_label", [])})
    b = encode(prompts, tiny.tokenizer)
    ref = last_logits(tiny, b, [Write(l, means.means[l][None]) for l in range(3)])
    got = last_logits(tiny, b, ablation_edits(means, b, circuit_keep(c)))
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert not torch.allclose(got, last_logits(tiny, b))
    # all-mean logits do not depend on the prompt except through MLPs/embeddings: sanity only
    assert got.shape == (len(prompts), len(tiny.tokenizer))


def test_partial_circuit_matches_loop_reference(tiny, prompts, means):
    """Per-sample, per-position semantics against a slow loop implementation."""
    c = make_circuit({"vf": ("last", [(2, 1), (1, 3)]), "pt": ("last", [(2, 1)]),
                      "pd": ("query_label", [(0, 2), (1, 3)])})
    b = encode(prompts, tiny.tokenizer)
    mm = means.means

    def ref_fn(layer):
        def fn(x4):
            x4 = x4.clone()
            for s in range(x4.shape[0]):
                for t in range(x4.shape[1]):
                    for h in range(x4.shape[2]):
                        keep = ((t == int(b.positions["last"][s]) and (layer, h) in {(2, 1), (1, 3)})
                                or (t == int(b.positions["query_label"][s])
                                    and (layer, h) in {(0, 2), (1, 3)}))
                        if not keep:
                            x4[s, t, h] = mm[layer, t, h]
            return x4
        return fn

    ref = last_logits(tiny, b, [Hook(l, ref_fn(l)) for l in range(3)])
    got = last_logits(tiny, b, ablation_edits(means, b, circuit_keep(c)))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_lora_model_ablation_keeps_adapter(tiny_lora, prompts, tokenizer, task):
    means = compute_means(tiny_lora, task.sample(8, seed=5))
    c = make_circuit({"a": ("last", all_heads())})
    b = encode(prompts, tokenizer)
    with_lora = last_logits(tiny_lora, b, ablation_edits(means, b, circuit_keep(c), True))
    assert torch.equal(with_lora, last_logits(tiny_lora, b))
    with tiny_lora.adapter_disabled():
        assert not torch.allclose(with_lora, last_logits(tiny_lora, b))


def test_variant_batching_equals_one_variant_per_forward(tiny, prompts, means):
    c = make_circuit({"vf": ("last", [(2, 1), (1, 3), (0, 0)]), "pd": ("query_label", [(0, 2)])})
    variants = [circuit_keep(c), circuit_keep(without(c, {"vf": [(2, 1)]})),
                circuit_keep(without(c, {"pd": [(0, 2)]})), circuit_keep(random_circuits(c, 1)[0])]
    batched = variant_logits(tiny, prompts, means, variants, batch_size=5, max_rows=64)
    b = encode(prompts, tiny.tokenizer)
    for v, keep in enumerate(variants):
        one = last_logits(tiny, b, ablation_edits(means, b, keep))
        torch.testing.assert_close(batched[v], one, rtol=1e-5, atol=1e-5)
    accs = variant_accuracies(tiny, prompts, means, variants, batch_size=5, max_rows=7,
                              metric="in_context")
    seq = [circuit_accuracy(tiny, prompts, means, keep).in_context_accuracy for keep in variants]
    assert accs == pytest.approx(seq)


def test_layout_mismatch_is_an_error(tiny, prompts, means, tokenizer):
    other = EntityTrackingTask(tokenizer, TaskConfig(n_boxes=3), seed=0).sample(4)
    c = make_circuit({"a": ("last", [])})
    with pytest.raises(AblationError, match="recompute the means"):
        circuit_accuracy(tiny, other, means, c)


def test_circuit_with_unknown_heads_is_an_error(tiny, prompts, means):
    c = make_circuit({"a": ("last", [(2, 3)])}, layers=3, heads=4)
    c.groups["a"].heads.append((5, 0))
    with pytest.raises(ArchitectureError, match="5.0"):
        circuit_accuracy(tiny, prompts, means, c)
    with pytest.raises(ArchitectureError, match="head grid"):
        circuit_accuracy(tiny, prompts, means, make_circuit({"a": ("last", [])}, layers=32, heads=32))


# -- random circuits and faithfulness --------------------------------------------------------------
def test_random_baseline_summary():
    assert random_baseline([]) == (None, None)
    assert random_baseline([0.5]) == (0.5, 0.0)
    mean, sd = random_baseline([0.0, 1.0])
    assert mean == 0.5 and sd == pytest.approx(math.sqrt(0.5))


def test_random_circuits_keep_the_circuits_shape_and_are_seeded():
    """A circuit with no repeated head: each draw is ``sum(sizes)`` distinct heads from the
    grid dealt to the groups in order (the plain draw, its oracle below). A circuit that repeats
    heads (two groups at one role sharing a head, one head at two roles): the draw repeats its
    replacements alike, so group sizes, roles and (head, role) unit counts are the circuit's."""
    from circuitdiff.core.stats import draw_rng

    plain = make_circuit({"vf": ("last", [(0, 0), (0, 1), (1, 1), (2, 2)]),
                          "pd": ("query_label", [(2, 3), (1, 0)])})
    grid = all_heads()
    for i, d in enumerate(random_circuits(plain, 5, seed=3)):
        heads = draw_rng(3, i).sample(grid, 6)
        assert [d.groups["vf"].heads, d.groups["pd"].heads] == [heads[:4], heads[4:]]

    c = make_circuit({"vf": ("last", [(0, 0), (0, 1), (1, 1), (2, 2)]), "pt": ("last", [(0, 0), (1, 2)]),
                      "pd": ("query_label", [(2, 3), (1, 0), (1, 1)])})
    draws = random_circuits(c, 20, seed=3)

    def units(circ):
        return {(g.position, h) for g in circ.groups.values() for h in g.heads}

    for d in draws:
        assert [len(g.heads) for g in d.groups.values()] == [4, 2, 3]
        assert [g.position for g in d.groups.values()] == ["last", "last", "query_label"]
        assert len(units(d)) == len(units(c)) == 8
        assert len({h for g in d.groups.values() for h in g.heads}) == 7
        assert d.groups["vf"].heads[0] == d.groups["pt"].heads[0]       # the shared (0, 0)
        assert d.groups["vf"].heads[2] == d.groups["pd"].heads[2]       # (1, 1) at two roles
    assert [d.to_dict()["groups"] for d in draws] == \
        [d.to_dict()["groups"] for d in random_circuits(c, 20, seed=3)]
    assert [d.to_dict()["groups"] for d in draws] != \
        [d.to_dict()["groups"] for d in random_circuits(c, 20, seed=4)]
    assert len({json.dumps(d.to_dict()["groups"]) for d in draws}) > 15
    # every head at one role (a real model's keep-all circuit): still drawable, the same units
    big = make_circuit({"a": ("last", all_heads()), "b": ("query_label", [(0, 0)])})
    (d,) = random_circuits(big, 1)
    assert len(units(d)) == len(units(big)) and set(d.groups["a"].heads) == set(all_heads())
    assert random_circuits(big, 0) == []


def test_faithfulness_undefined_at_zero_accuracy():
    assert faithfulness(0.0, 0.0) is None
    assert faithfulness(0.5, 0.25) == 0.5
    row = FaithfulnessRow("m", "c", 0.0, 0.0, 0.0, 0.0, None, 10, [0.0])
    assert "undefined" in format_table([row])


def test_table_written_and_resumes(tiny, tokenizer, tmp_path, monkeypatch):
    import circuitdiff.methods.evaluation as cmp

    c = make_circuit({"vf": ("last", [(2, 1), (1, 3)]), "pd": ("query_label", [(0, 2)])})
    loads = []

    def load(spec):
        loads.append(spec)
        return tiny

    cfg = EvalConfig(n_prompts=8, n_mean=8, n_boxes=N_BOXES, n_random=3, batch_size=8,
                     circuits={"c": c})
    folder = RunFolder(tmp_path)
    rows = evaluation.run(ModelPool(["tiny"], load), None, cfg, store=folder).rows
    assert len(rows) == 1 and len(rows[0].random) == 3
    r = rows[0]
    assert r.faithfulness == (None if r.full == 0 else r.circuit_accuracy / r.full)
    pj, pc = save_table(folder, rows)
    assert json.loads(pj.read_text())[0]["circuit_accuracy"] == r.circuit_accuracy
    lines = pc.read_text().splitlines()
    assert lines[0].startswith("model,circuit,full,circuit_accuracy") and len(lines) == 2
    # a rerun reads every number from the run folder
    monkeypatch.setattr(cmp, "evaluate_faithfulness", lambda *a, **k: pytest.fail("recomputed"))
    monkeypatch.setattr(cmp, "evaluate_accuracy", lambda *a, **k: pytest.fail("recomputed"))
    assert evaluation.run(ModelPool(["tiny"], load), None, cfg, store=folder).rows[0] == r
    # the execution fields are not in the key: another batch size still reads the saved row
    assert evaluation.run(ModelPool(["tiny"], load), None, replace(cfg, batch_size=3),
                          store=folder).rows[0] == r


def shifted_tokenizer():
    """The fixture tokenizer's words with other ids: a *different* tokenizer."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from conftest import word_level_tokenizer

    vocab = word_level_tokenizer().get_vocab()
    vocab = {k: (v + 1) % len(vocab) for k, v in vocab.items()}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[A-Za-z]+| ?[^A-Za-z\s]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>")


def test_different_tokenizers_need_per_model_tokenization(tiny, tokenizer, tmp_path):
    from conftest import tiny_llama
    from circuitdiff.core.arch import resolve
    from circuitdiff.core.model import LoadedModel

    tok2 = shifted_tokenizer()
    m2 = tiny_llama(len(tok2), seed=3)
    other = LoadedModel(m2, tok2, resolve(m2), "tiny-other")
    models = {"a": tiny, "b": other}
    c = make_circuit({"vf": ("last", [(2, 1)])})
    cfg = EvalConfig(n_prompts=4, n_mean=4, n_boxes=N_BOXES, n_random=1, circuits={"c": c})
    with pytest.raises(ValueError, match="per-model-tokenization"):
        evaluation.run(ModelPool(["a", "b"], models.__getitem__), None, cfg,
                       store=RunFolder(tmp_path))
    cfg.per_model_tokenization = True
    rows = evaluation.run(ModelPool(["a", "b"], models.__getitem__), None, cfg,
                          store=RunFolder(tmp_path)).rows
    assert [r.model for r in rows] == ["tiny-llama", "tiny-other"]
    assert "tiny-other" in format_matrix(rows)


def test_bad_eval_config():
    with pytest.raises(ValueError, match="another seed"):
        EvalConfig(seed=3, mean_seed=3)
    with pytest.raises(ValueError, match="n_mean"):
        EvalConfig(n_mean=0)
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        AnalysisConfig(minimality=True, threshold=float("nan"))
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        minimality(make_circuit({"vf": ("last", [(2, 1)])}), lambda v: [1.0] * len(v),
                   threshold=float("nan"))
    with pytest.raises(ValueError, match="no group"):
        EvalConfig(circuits={"empty": Circuit({}, 3, 4, "tiny")})


def test_circuit_without_groups_is_an_error_not_faithfulness_one(tiny, prompts, means):
    empty = Circuit({}, 3, 4, "tiny")
    with pytest.raises(ValueError, match="no group"):
        evaluate_faithfulness(tiny, prompts, means, empty, "empty", n_random=0,
                              keep_other_positions=True)


def test_eval_config_key_and_round_trip():
    c = make_circuit({"vf": ("last", [(2, 1)])})
    cfg = EvalConfig(n_prompts=8, n_mean=8, n_boxes=N_BOXES, circuits={"c": c},
                     analyses=AnalysisConfig(completeness=True))
    assert cfg.shared_key() == {"n_prompts": 8, "seed": 0, "n_boxes": N_BOXES, "n_mean": 8,
                                "mean_seed": 1, "n_random": 10, "random_seed": 0,
                                "keep_other_positions": False, "per_model_tokenization": False}
    assert "batch_size" not in cfg.cache_key() and cfg.cache_key()["circuits"]["c"] == c.to_dict()
    back = EvalConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back.cache_key() == cfg.cache_key()
    assert back.circuits["c"].to_dict() == c.to_dict() and back.analyses.completeness


# -- completeness, minimality, overlap --------------------------------------------------------------
def test_completeness_points_match_direct_evaluation(tiny, prompts, means, tmp_path):
    c = make_circuit({"vf": ("last", [(2, 1), (1, 3), (0, 0), (2, 0)]), "pd": ("query_label", [(0, 2), (1, 1)])})
    pts = completeness(tiny, prompts, means, c, n_halves=2, seed=0, batch_size=6)
    assert [p.subset for p in pts] == ["group:vf", "group:pd", "half:0", "half:1"]
    assert [len(v) for v in pts[2].removed.values()] == [2, 1]
    direct = circuit_accuracy(tiny, prompts, means, without(c, {"vf": c.groups["vf"].heads}))
    assert pts[0].circuit_minus_k == pytest.approx(direct.accuracy)
    keep = {p: torch.ones(3, 4, dtype=torch.bool) for p in ("last", "query_label")}
    for l, h in c.groups["pd"].heads:
        keep["query_label"][l, h] = False
    direct_m = circuit_accuracy(tiny, prompts, means, keep, keep_other_positions=True)
    assert pts[1].model_minus_k == pytest.approx(direct_m.accuracy)
    png = plot_completeness(pts, tmp_path / "completeness.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_minimality_batched_equals_sequential(tiny, prompts, means):
    c = make_circuit({"vf": ("last", [(2, 1), (1, 3), (0, 0), (2, 0), (1, 2), (0, 1), (0, 3)]),
                      "pd": ("query_label", [(0, 2), (1, 1), (2, 3)])})
    calls = []

    def sequential(variants):
        calls.append(len(variants))
        return [circuit_accuracy(tiny, prompts, means, keep).in_context_accuracy for keep in variants]

    batched = batched_evaluator(tiny, prompts, means, batch_size=12, max_rows=512, metric="in_context")
    a = minimality(c, batched, threshold=0.01)
    b = minimality(c, sequential, threshold=0.01)
    assert a.to_dict() == b.to_dict()
    assert a.n_variants == sum(calls) and len(calls) == 2  # two batched rounds, deduplicated
    effects = [s.effect for ss in a.scores.values() for s in ss]
    assert len(set(effects)) > 1  # non-degenerate on this model
    for g, ss in a.scores.items():
        kept = [s.head for s in ss if s.kept]
        assert [f"{l}.{h}" for l, h in a.circuit.groups[g].heads] == kept
        assert all(len(s.partners) <= int(0.3 * len(c.groups[g].heads)) for s in ss)
        assert all(s.kept == (s.effect >= 0.01) for s in ss)
    assert any(s.kept for ss in a.scores.values() for s in ss)


def test_minimality_effect_definition():
    from circuitdiff.methods.minimality import marginal_effect
    assert marginal_effect(0.5, 0.25) == pytest.approx(1.0)
    assert marginal_effect(0.3, 0.0) == math.inf
    assert marginal_effect(0.0, 0.0) == 0.0


def test_head_overlap():
    a = make_circuit({"vf": ("last", [(0, 0), (0, 1), (1, 1)]), "pd": ("query_label", [(2, 2)])})
    b = make_circuit({"vf": ("last", [(0, 1), (1, 1), (2, 0), (2, 1)]), "sr": ("prev_query_label", [(1, 0)])})
    o = head_overlap(a, b)
    assert o["vf"] == {"intersection": 2, "n_reference": 3, "n_other": 4, "precision": 0.5,
                       "recall": 2 / 3}
    assert o["pd"]["precision"] is None and o["pd"]["recall"] == 0
    assert o["all"]["intersection"] == 2 and o["all"]["n_other"] == 5


# -- CLI ------------------------------------------------------------------------------------------
@pytest.fixture()
def saved_models(tmp_path, tokenizer):
    """Two tiny models with the fixture tokenizer and one with another tokenizer, as HF folders."""
    from conftest import tiny_llama

    out = {}
    for name, seed, tok in (("a", 0, tokenizer), ("b", 1, tokenizer), ("other", 2, shifted_tokenizer())):
        d = tmp_path / f"model-{name}"
        tiny_llama(len(tok), seed=seed).save_pretrained(d)
        tok.save_pretrained(d)
        out[name] = str(d)
    return out


def test_cli_evaluate_table_matrix_completeness_minimality(saved_models, tmp_path, capsys):
    from circuitdiff.cli import main

    c1 = tmp_path / "c1.json"
    c2 = tmp_path / "c2.json"
    make_circuit({"vf": ("last", [(2, 1), (1, 3), (0, 0), (2, 0)]),
                  "pd": ("query_label", [(0, 2), (1, 1)])}).save(c1)
    make_circuit({"vf": ("last", [(2, 1), (2, 2)]), "sr": ("prev_query_label", [(1, 0)])}).save(c2)
    out = tmp_path / "run"
    argv = ["evaluate", "--circuit", str(c1), "--circuit", str(c2), "--model", saved_models["a"],
            "--model", saved_models["b"], "--n-boxes", str(N_BOXES), "-n", "8", "--n-mean", "8",
            "--random-draws", "2", "--out", str(out), "--matrix", "--completeness", "--n-halves",
            "1", "--minimality"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "faithfulness" in text and "circuit \\ model" in text and "overlap c1" in text
    rows = json.loads((out / "faithfulness.json").read_text())
    assert len(rows) == 4 and {r["circuit"] for r in rows} == {"c1", "c2"}
    assert len((out / "faithfulness.csv").read_text().splitlines()) == 5
    assert json.loads((out / "overlap.json").read_text())["c1|c2"]["vf"]["intersection"] == 1
    pruned = Circuit.load(out / "pruned" / "c1.json")
    assert set(pruned.groups) == {"vf", "pd"}
    assert len(list(out.glob("completeness/*/*.png"))) == 4
    # a rerun resumes from the run folder and prints the same table
    assert main(argv) == 0
    assert json.loads((out / "faithfulness.json").read_text()) == rows


def test_cli_evaluate_bad_inputs(saved_models, tmp_path, capsys):
    from circuitdiff.cli import main

    good = tmp_path / "good.json"
    make_circuit({"vf": ("last", [(2, 1)])}).save(good)
    bad = tmp_path / "bad.json"
    d = make_circuit({"vf": ("last", [(2, 1)])}).to_dict()
    d["groups"]["vf"]["heads"].append("7.1")
    bad.write_text(json.dumps(d))
    common = ["--n-boxes", str(N_BOXES), "-n", "4", "--n-mean", "4", "--random-draws", "1",
              "--out", str(tmp_path / "run")]
    assert main(["evaluate", "--circuit", str(bad), "--model", saved_models["a"], *common]) == 2
    assert "7.1" in capsys.readouterr().err
    assert main(["evaluate", "--circuit", str(good), "--model", saved_models["a"], "--model",
                 saved_models["other"], *common]) == 2
    assert "--per-model-tokenization" in capsys.readouterr().err
    assert main(["evaluate", "--circuit", str(good), "--model", saved_models["a"], "--model",
                 saved_models["other"], "--per-model-tokenization", *common]) == 0
    assert main(["evaluate", "--circuit", str(tmp_path / "missing.json"), "--model",
                 saved_models["a"], *common]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["evaluate", "--circuit", str(good), *common]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["evaluate", "--circuit", str(good), "--model", saved_models["a"], "--minimality",
                 "--threshold", "nan", *common]) == 2
    assert "threshold must be a finite number" in capsys.readouterr().err
    empty = tmp_path / "empty.json"
    Circuit({}, 3, 4, "tiny").save(empty)
    assert main(["evaluate", "--circuit", str(empty), "--model", saved_models["a"], *common]) == 2
    assert "no group" in capsys.readouterr().err


def test_accuracy_run_caches_under_its_settings(tiny, tmp_path, monkeypatch):
    from circuitdiff.methods import accuracy
    from circuitdiff.methods.accuracy import AccuracyConfig

    cfg = AccuracyConfig(n_prompts=6, seed=2, n_boxes=N_BOXES, batch_size=4)
    assert cfg.cache_key() == {"n_prompts": 6, "seed": 2, "n_boxes": N_BOXES}
    res = accuracy.run(tiny, None, cfg, store=tmp_path)
    own = EntityTrackingTask(tiny.tokenizer, TaskConfig(n_boxes=N_BOXES), seed=2).sample(6)
    assert res == accuracy.evaluate_accuracy(tiny, own)
    given = accuracy.run(tiny, own[:3], cfg, store=tmp_path)  # given prompts: their own key
    assert given.n == 3
    monkeypatch.setattr(accuracy, "evaluate_accuracy", lambda *a, **k: pytest.fail("recomputed"))
    assert accuracy.run(tiny, own[:3], replace(cfg, batch_size=1), store=tmp_path) == given
    with pytest.raises(ValueError, match="n_prompts must be >= 1"):
        AccuracyConfig(n_prompts=0)


def test_a_circuit_that_repeats_a_head_keys_its_random_draws_by_the_sampler():
    """Results with random circuits of a circuit that repeats a head were drawn differently
    before the relabelling sampler: their key names its version, so they recompute; a circuit
    with no repeat keeps its key (its draws did not change)."""
    from circuitdiff.methods.faithfulness import REPEATED_HEAD_DRAW, random_draw_key

    plain = make_circuit({"vf": ("last", [(0, 0), (0, 1)]), "pd": ("query_label", [(1, 0)])})
    shared = make_circuit({"vf": ("last", [(0, 0), (0, 1)]), "pt": ("last", [(0, 0)])})
    assert random_draw_key(plain) == {}
    assert random_draw_key(shared) == {"random_draw": REPEATED_HEAD_DRAW}
