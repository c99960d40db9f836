"""DCM: the mix edit (identity at m = 1, plain patch at m = 0), mask gradients, desiderata targets,
training, the CLI on tiny saved models, and bad input (tiny models, offline, CPU)."""

from __future__ import annotations

import importlib
import json
import random
from dataclasses import replace

import pytest
import torch

from circuitdiff.cli import main
from circuitdiff.core.circuit import Circuit, CircuitGroup
from circuitdiff.core.interventions import Read, Write, run_with_edits
from circuitdiff.core.metrics import last_logits
from circuitdiff.core.task import EntityTrackingTask, TaskConfig, locate
from circuitdiff.core.pool import ModelPool
from circuitdiff.methods import dcm
from circuitdiff.methods.dcm import (DCMConfig, DCMError, FunctionalConfig, choose_lambda,
                                     found_gate, random_gate_calibration,
                                     random_head_sets)
from circuitdiff.methods.dcm import desiderata as D
from circuitdiff.methods.dcm.masks import counterfactual_values, patched_last_logits, train_masks

torch.set_num_threads(1)

HEADS = [(0, 1), (1, 0), (1, 3), (2, 2)]
POSITIONS = ("last", "query_label", "prev_query_label", "correct_object")


@pytest.fixture()
def task(tokenizer):
    return EntityTrackingTask(tokenizer, TaskConfig(n_boxes=4), seed=0)


def encoded(task, name: str, n: int = 6, seed: int = 0):
    base = task.sample(n, seed=seed)
    return D.encode_examples(name, D.build_examples(task, name, base, seed), task.tokenizer)


# -- the edit ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["tiny", "tiny_lora"])
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("prefix_cache", [True, False])
def test_mask_one_leaves_logits_unchanged(request, task, fixture, position, prefix_cache):
    loaded = request.getfixturevalue(fixture)
    enc = encoded(task, "random_text_start")  # counterfactuals of another length than the base
    vals = counterfactual_values(loaded, enc.counterfactual, position, HEADS)
    k = 3
    out = patched_last_logits(loaded, enc.base, position, HEADS, vals.repeat_interleave(k, 0),
                              torch.ones(len(vals) * k, len(HEADS)), k, prefix_cache)
    plain = last_logits(loaded, enc.base).repeat_interleave(k, 0)
    assert (out - plain).abs().max().item() <= 1e-6


def plain_patch(loaded, enc, position, heads):
    """Reference: read the counterfactual's full forward, write (mode='set') at the base's
    position — no masks, no prefix cache."""
    layers = sorted({layer for layer, _ in heads})
    read = Read(layers, enc.counterfactual.positions[position])
    run_with_edits(loaded.model, enc.counterfactual.model_inputs(), [read], loaded.arch)
    edits = []
    for layer in layers:
        where = torch.zeros(len(enc.base), 1, loaded.arch.n_heads, dtype=torch.bool)
        where[:, :, [h for lay, h in heads if lay == layer]] = True
        edits.append(Write(layer, read.out[layer], enc.base.positions[position], where=where))
    return last_logits(loaded, enc.base, edits)


@pytest.mark.parametrize("fixture", ["tiny", "tiny_lora"])
@pytest.mark.parametrize("position", POSITIONS)
def test_mask_zero_is_a_plain_activation_patch(request, task, fixture, position):
    loaded = request.getfixturevalue(fixture)
    enc = encoded(task, "extra_box_before_correct")
    vals = counterfactual_values(loaded, enc.counterfactual, position, HEADS)
    out = patched_last_logits(loaded, enc.base, position, HEADS, vals,
                              torch.zeros(len(vals), len(HEADS)), 1)
    ref = plain_patch(loaded, enc, position, HEADS)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ref, last_logits(loaded, enc.base), atol=1e-4)  # it did patch


def test_mask_gradient_matches_finite_differences(tiny, task):
    tiny.model.double()
    enc = encoded(task, "position", n=4)
    vals = counterfactual_values(tiny, enc.counterfactual, "last", HEADS).double()
    tgt = enc.targets

    def loss(m: torch.Tensor) -> torch.Tensor:
        logits = patched_last_logits(tiny, enc.base, "last", HEADS, vals,
                                     m.expand(len(tgt), -1), 1)
        return -logits.gather(1, tgt[:, None]).mean()

    m = torch.tensor([0.7, 0.4, 0.55, 0.3], dtype=torch.double, requires_grad=True)
    loss(m).backward()
    # eps 1e-3: the model's RMSNorm computes in float32 even in a float64 model, so smaller steps
    # measure rounding; the central difference's own error is O(eps^2)
    eps = 1e-3
    fd = torch.stack([(loss(m.detach() + eps * e) - loss(m.detach() - eps * e)) / (2 * eps)
                      for e in torch.eye(len(HEADS), dtype=torch.double)])
    assert m.grad.abs().max() > 1e-3  # the masks matter
    torch.testing.assert_close(m.grad, fd.detach(), rtol=1e-3, atol=1e-5)


def test_training_gives_gradients_only_to_masks_and_separates_rows(tiny, task):
    enc = encoded(task, "object_value", n=8)
    enc2 = encoded(task, "box_label", n=8)
    vals = torch.stack([counterfactual_values(tiny, e.counterfactual, "last", HEADS)
                        for e in (enc, enc2)])
    tgts = torch.stack([enc.targets, enc2.targets])
    for p in tiny.model.parameters():
        p.requires_grad_(False)
    masks = train_masks(tiny, enc.base, "last", HEADS, vals, tgts, [0.001, 10.0], lr=0.1,
                        epochs=2, batch_size=4)
    assert masks.shape == (2, 2, len(HEADS))
    assert all(p.grad is None for p in tiny.model.parameters())
    assert bool(((masks >= 0) & (masks <= 1)).all())
    assert torch.equal(masks[1], torch.ones(2, len(HEADS)))  # a huge λ keeps every head
    assert not torch.equal(masks[0], torch.ones(2, len(HEADS)))  # a small one lets masks move


def test_nan_loss_names_step_and_batch(tiny, task):
    enc = encoded(task, "position", n=8)
    vals = counterfactual_values(tiny, enc.counterfactual, "last", HEADS)[None]
    vals[0, 4:] = float("nan")  # the second batch of 4 (in training order) goes NaN
    with pytest.raises(DCMError, match=r"at step \d+ \(epoch 1, batch \d\)"):
        train_masks(tiny, enc.base, "last", HEADS, vals, enc.targets[None], [0.01],
                    batch_size=4)


# -- desiderata ---------------------------------------------------------------------------------
def test_plain_prompts_render_and_locate_like_the_task(task, tokenizer):
    for p in task.sample(5):
        tp = D.from_prompt(p)
        assert tp.text == p.text
        a, b = D.locate_text(tp, tokenizer), locate(p, tokenizer)
        assert a.input_ids == b.input_ids and a.positions == b.positions
        assert a.box_object_positions == b.box_object_positions


def intended(name: str, ex: D.Example) -> str:
    """The target word each desideratum means, derived from the prompts' words."""
    b, c = ex.base, ex.counterfactual
    if name == "object_value":
        return c.answer
    if name == "box_label":
        return b.objects[b.labels.index(c.query_label)]
    return b.objects[c.query_index]  # position and its robustness set: the queried ordinal


SURFACE = {
    "random_text_start": lambda b, c: not c.text.startswith(c.objects[0]) and
    c.text.index(". ") < c.text.index(c.objects[0]),
    "random_text_end": lambda b, c: c.text.count(". ") == 2,
    "tokens_between_box_and_object": lambda b, c: len(c.text) > len(b.text),
    "extra_segment_start": lambda b, c: len(c.objects) == len(b.objects) + 1,
    "extra_segment_end": lambda b, c: len(c.objects) == len(b.objects) + 1,
    "extra_box_before_correct": lambda b, c: len(c.objects) == len(b.objects) + 1,
    "altered_box_object_order": lambda b, c: c.text.startswith("Box "),
    "no_commas": lambda b, c: "," not in c.text,
    "altered_association": lambda b, c: sorted(c.objects) == sorted(b.objects) and all(
        c.objects[k] != b.objects[k] and c.labels[k] != b.labels[k] for k in range(len(b.objects))),
    "comma_after_object": lambda b, c: all(f"{o}," in c.text for o in c.objects),
}


@pytest.mark.parametrize("name", list(D.PAPER_DESIDERATA + D.ROBUSTNESS_DESIDERATA))
def test_every_desideratum_targets_the_intended_token(task, tokenizer, name):
    base = task.sample(20, seed=3)
    examples = D.build_examples(task, name, base, seed=3)
    enc = D.encode_examples(name, examples, tokenizer)
    for i, ex in enumerate(examples):
        word = intended(name, ex)
        assert ex.target_word == word
        assert word != ex.base.answer  # else patching could not show anything
        assert tokenizer.decode([int(enc.targets[i])]).strip() == word
        # the id is the token at that object's position in the prompt that holds it
        src = enc.base if ex.target_in == "base" else enc.counterfactual
        pos = src.positions["box_object"][i, ex.target_box]
        assert int(src.input_ids[i, pos]) == int(enc.targets[i])
        # the counterfactual's query label really is its queried box's label
        q = enc.counterfactual.positions["query_label"][i]
        p = enc.counterfactual.positions["prev_query_label"][i]
        assert int(enc.counterfactual.input_ids[i, q]) == int(enc.counterfactual.input_ids[i, p])
        if name in SURFACE:
            assert SURFACE[name](ex.base, ex.counterfactual), ex.counterfactual.text
            assert ex.base.text == base[i].text  # only the counterfactual changes
    if name in D.PAPER_DESIDERATA:  # targets as in the task's own DCM set
        ds = task.dcm_counterfactuals([base[0]], seed=random.Random(3 * 1_000_003).randrange(2 ** 31))
        assert examples[0].target_word == ds.targets[name][0]


def test_paper_desiderata_share_counterfactuals(task):
    base = task.sample(5)
    texts = {n: [e.counterfactual.text for e in D.build_examples(task, n, base, 0)]
             for n in D.PAPER_DESIDERATA}
    assert texts["object_value"] == texts["position"] == texts["box_label"]


def test_a_user_desideratum_is_one_function(task, tokenizer):
    @D.desideratum("swap_first_two", "test: counterfactual = base with boxes 0 and 1 swapped")
    def swap(task, base, rng):
        objs = [base.objects[1], base.objects[0]] + base.objects[2:]
        cf = D.render(objs, base.labels, base.query_index)
        return D.Example(D.from_prompt(base), cf, "counterfactual", base.query_index)

    try:
        assert "swap_first_two" in D.resolve_names(["all"])
        enc = encoded(task, "swap_first_two")
        assert enc.targets.shape == (6,)
    finally:
        del D.DESIDERATA["swap_first_two"]


def test_desideratum_that_does_not_apply_says_why(tokenizer):
    three = EntityTrackingTask(tokenizer, TaskConfig(n_boxes=2), seed=0)
    with pytest.raises(D.DesiderataError, match="at least 3 boxes"):
        D.check_applicable(["position"], three)
    altered = EntityTrackingTask(tokenizer, TaskConfig(
        n_boxes=4, segment_template=D.ALTERED_TEMPLATE), seed=0)
    with pytest.raises(D.DesiderataError, match="already uses the altered wording"):
        D.check_applicable(["altered_box_object_order"], altered)
    with pytest.raises(D.DesiderataError, match="ends with the object"):
        D.check_applicable(["comma_after_object"], altered)
    with pytest.raises(D.DesiderataError, match="unknown desideratum"):
        D.resolve_names(["nope"])


# -- dcm(), λ choice, random sets, functional patching -----------------------------------------
def small_circuit(n_layers=3, n_heads=4) -> Circuit:
    return Circuit({"movers": CircuitGroup([(1, 0), (1, 3), (2, 2)], "last"),
                    "detectors": CircuitGroup([(0, 1), (0, 2)], "query_label"),
                    "readers": CircuitGroup([], "prev_query_label")}, n_layers, n_heads)


def test_choose_lambda_uses_validation_only():
    # best validation 0.5 at λ=0.01; 0.1 is too far below, 0.03 within tolerance
    assert choose_lambda([0.001, 0.01, 0.03, 0.1], [0.4, 0.5, 0.49, 0.1], 0.02) == 2
    assert choose_lambda([0.001, 0.01], [0.3, 0.1], 0.0) == 0


def test_config_expands_desiderata_and_rejects_bad_lambda():
    assert DCMConfig(desiderata="paper").desiderata == D.PAPER_DESIDERATA
    assert DCMConfig(desiderata=("robustness",)).desiderata[0] == "position"
    with pytest.raises(ValueError, match="λ must be > 0"):
        DCMConfig(lambdas=(0.01, -1.0))


def test_random_head_sets_are_seeded_and_without_replacement():
    a = random_head_sets(5, 3, 4, 10, seed=1)
    assert a == random_head_sets(5, 3, 4, 10, seed=1)
    assert all(len(set(s)) == 5 for s in a)
    assert len({tuple(s) for s in a}) > 1


def test_dcm_and_functional_patching_on_a_tiny_model(tiny, tiny_lora, tmp_path):
    from circuitdiff.core.runs import RunFolder

    cfg = DCMConfig(circuit=small_circuit(), n_train=8, n_val=4, n_test=4, lambdas=(0.01, 0.1),
                    n_boxes=4, n_random=2, batch_size=4)
    folder = RunFolder(tmp_path)
    res = dcm.run(tiny, None, cfg, store=folder)
    # weights frozen while masks train (no gradient reached them), and unfrozen again after
    assert all(p.grad is None and p.requires_grad for p in tiny.model.parameters())
    assert res.empty_groups == ["readers"]
    assert {(r.group, r.desideratum) for r in res.rows} == {
        (g, d) for g in ("movers", "detectors") for d in D.PAPER_DESIDERATA}
    for r in res.rows:
        assert len(r.curve) == 2 and r.chosen_lambda in (0.01, 0.1)
        assert set(r.selected) <= set(r.group_heads)
        assert 0 <= r.test_accuracy <= 1
    again = dcm.run(tiny, None, cfg, store=folder)  # resumed from the run folder
    assert again.to_dict()["rows"] == res.to_dict()["rows"]
    # functional patching: the all-heads selection of a group patched in two models
    forced = res.rows[0]
    forced.selected, forced.found = list(forced.group_heads), True
    fun = dcm.functional.run(ModelPool(["a", "b"], lambda s: {"a": tiny, "b": tiny_lora}[s]),
                             None, FunctionalConfig(res, cfg))
    rows = fun.rows
    assert [r.model for r in rows if r.group == forced.group and
            r.desideratum == forced.desideratum] == [tiny.name, tiny_lora.name]
    assert rows[0].accuracy == pytest.approx(forced.whole_group)  # same heads, same prompts
    # every other selection found no function on a random model: skipped, with a note each
    assert len(fun.notes) == len(res.rows) - 1


def test_found_gate_needs_both_baselines_beaten_with_an_interval():
    cfg = DCMConfig(bootstrap=200)
    n = 40
    sel, none, rnd = torch.ones(n), torch.zeros(n), torch.zeros(2, n)
    assert found_gate(torch.cat([none[None], sel[None], rnd]), cfg, "g/d")[:2] == (True, "")
    # as good as random heads of its size: no function found, and the reason says which
    same = torch.cat([none[None], sel[None], torch.ones(2, n)])
    found, reason, vs_none, vs_rnd = found_gate(same, cfg, "g/d")
    assert not found and reason.startswith(dcm.NO_FUNCTION) and "random heads" in reason
    assert vs_none[0] > 0 and vs_rnd == [0.0, 0.0]
    # one more hit than no patching on 40 prompts: the interval reaches 0
    barely = torch.cat([none[None], torch.zeros(n).index_fill(0, torch.tensor([0]), 1)[None],
                        rnd])
    found, reason, _, _ = found_gate(barely, cfg, "g/d")
    assert not found and "not above no patching" in reason
    # no random sets: nothing to beat, nothing found
    assert not found_gate(torch.stack([none, sel]), cfg, "g/d")[0]


def test_random_gate_calibration_judges_each_random_set_against_the_others():
    cfg = DCMConfig(bootstrap=200)
    n = 40
    none, sel = torch.zeros(n), torch.ones(n)
    # four random sets as weak as no patching: none of them counts as a function
    weak = torch.cat([none[None], sel[None], torch.zeros(4, n)])
    assert random_gate_calibration(weak, cfg, "g/d") == (0, 4)
    # one random set that does carry the target (it beats no patching and the other three):
    # the rule accepts it, and the calibration says so (its false-positive count)
    planted = weak.clone()
    planted[3] = 1
    assert random_gate_calibration(planted, cfg, "g/d") == (1, 4)
    # a lone random set has no random null to be judged against
    assert random_gate_calibration(weak[:3], cfg, "g/d") == (None, 0)


def test_null_model_finds_no_function(tiny, tokenizer):
    """A random tiny model encodes nothing: masks still move (lr 1, tiny λ select heads), but
    no selection beats no patching and random heads on validation."""
    cfg = DCMConfig(circuit=small_circuit(), n_train=8, n_val=16, n_test=4,
                    lambdas=(0.0001, 0.001), lr=1.0, n_boxes=4, n_random=3, batch_size=8)
    res = dcm.run(tiny, None, cfg)
    assert any(r.selected for r in res.rows)
    assert res.rows and not any(r.found for r in res.rows)
    assert all(r.reason.startswith(dcm.NO_FUNCTION) for r in res.rows)
    # the found rule's calibration on the random head sets: recorded, and no random set counts
    assert all(r.random_draws == 3 and r.random_found == 0 for r in res.rows if r.selected)
    fun = dcm.functional.run(tiny, None, FunctionalConfig(res, cfg))
    assert fun.rows == [] and len(fun.notes) == len(res.rows)


def test_run_merges_a_one_head_group_as_the_study_does(tiny):
    c = small_circuit()
    c.groups["mover"] = CircuitGroup([(2, 0)], "last")
    cfg = DCMConfig(circuit=c, desiderata="position", n_train=4, n_val=4, n_test=4,
                    lambdas=(0.1,), n_boxes=4, n_random=1, batch_size=4)
    res = dcm.run(tiny, None, cfg)
    assert {r.group for r in res.rows} == {"movers+mover", "detectors"}
    assert res.notes == ["mover (one head, 2.0) merged into movers as movers+mover"]
    assert res.selection("movers+mover", "position").group_heads == ["1.0", "1.3", "2.2", "2.0"]


def every_selection_counts(monkeypatch):
    """The found gate passed for every selection (the gate has its own tests): lets the CLI
    test reach functional patching on a random tiny model."""
    monkeypatch.setattr(importlib.import_module("circuitdiff.methods.dcm.run"), "found_gate",
                        lambda hits, cfg, label: (True, "", None, None))


# -- CLI ----------------------------------------------------------------------------------------
def write_circuit(tmp_path, circuit: Circuit):
    path = tmp_path / "circuit.json"
    circuit.save(path)
    return str(path)


def cli_args(circuit_path, models, out, *extra):
    args = ["dcm", "--circuit", circuit_path, "--n-boxes", "4", "--n-train", "8", "--n-val", "4",
            "--n-test", "4", "--lambdas", "0.01,0.1", "--random-draws", "2", "--batch-size", "4",
            "--out", str(out)]
    for m in models:
        args += ["--model", str(m)]
    return args + list(extra)


def test_cli_on_tiny_saved_models(saved_models, tmp_path, capsys, monkeypatch):
    every_selection_counts(monkeypatch)
    base, lora = saved_models
    out = tmp_path / "run"
    circuit = write_circuit(tmp_path, small_circuit())
    # lr 1 and tiny λ: one Adam step takes every mask that helps the target to 0, so even a
    # random tiny model selects heads and functional patching runs
    run = cli_args(circuit, [base, lora], out, "--desiderata", "object_value,position,no_commas",
                   "--lambdas", "0.0001,0.001", "--lr", "1.0")
    assert main(run) == 0
    text = capsys.readouterr().out
    assert "(empty group)" in text and "readers" in text
    table = json.loads((out / "dcm_table.json").read_text())
    assert len(table["rows"]) == 2 * 3 and table["empty_groups"] == ["readers"]
    assert (out / "dcm_table.csv").read_text().startswith("group,position,desideratum")
    curve = (out / "dcm_table_curve.csv").read_text().splitlines()
    assert len(curve) == 1 + 2 * 3 * 2  # header + groups x desiderata x λ
    pngs = sorted(p.name for p in out.glob("dcm/*/*.png"))
    assert pngs == ["detectors_lambda.png", "movers_lambda.png"]
    fun = json.loads((out / "functional.json").read_text())
    selected = {(r["group"], r["desideratum"]) for r in table["rows"] if r["selected"]}
    assert selected and {(r["group"], r["desideratum"]) for r in fun} == selected
    assert [r["model"] for r in fun] == [str(base)] * len(selected) + [str(lora)] * len(selected)
    assert (out / "functional.csv").exists() and (out / "functional.png").exists()
    assert "functional patching" in text
    cached = [sorted(out.glob("dcm/*/movers.json"))[0], sorted(out.glob("functional/*/*.json"))[0]]
    stamps = [p.stat().st_mtime_ns for p in cached]
    assert main(run) == 0
    assert [p.stat().st_mtime_ns for p in cached] == stamps  # resumed, not recomputed


def test_cli_accepts_the_circuits_the_study_accepts(saved_models, tmp_path, capsys):
    """A one-head group (as the default discover output has) is merged, not an error."""
    base, _ = saved_models
    circuit = small_circuit()
    circuit.groups["mover"] = CircuitGroup([(2, 0)], "last")
    out = tmp_path / "run"
    assert main(cli_args(write_circuit(tmp_path, circuit), [base], out, "--desiderata",
                         "position", "--lambdas", "0.1")) == 0
    text = capsys.readouterr().out
    assert "note: mover (one head, 2.0) merged into movers as movers+mover" in text
    rows = json.loads((out / "dcm_table.json").read_text())["rows"]
    assert {r["group"] for r in rows} == {"movers+mover", "detectors"}
    assert all(r["reason"].startswith("no function found") for r in rows if not r["found"])


@pytest.mark.parametrize("change, message", [
    (lambda c: [c.groups.clear(), c.groups.__setitem__("movers", CircuitGroup([(1, 0)], "last"))],
     "is one head"),
    (None, "λ must be > 0"),
])
def test_cli_bad_input_exits_2_before_writing(saved_models, tmp_path, capsys, change, message):
    base, _ = saved_models
    circuit = small_circuit()
    extra = []
    if change is not None:
        change(circuit)
    else:
        extra = ["--lambdas", "0.01,0"]
    out = tmp_path / "run"
    assert main(cli_args(write_circuit(tmp_path, circuit), [base], out, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_rejects_inapplicable_desideratum_and_other_tokenizers(saved_models, tmp_path,
                                                                    capsys, tokenizer):
    base, _ = saved_models
    circuit = write_circuit(tmp_path, small_circuit())
    out = tmp_path / "run"
    args = cli_args(circuit, [base], out, "--desiderata", "position")
    args[args.index("--n-boxes") + 1] = "2"
    assert main(args) == 2
    assert "does not apply" in capsys.readouterr().err and not out.exists()
    # a model whose tokenizer has another vocabulary
    from circuitdiff.core.toy import word_level_tokenizer
    from conftest import tiny_llama

    other = word_level_tokenizer()
    other.add_tokens(["zebra"])
    odir = tmp_path / "other"
    tiny_llama(len(other)).save_pretrained(odir)
    other.save_pretrained(odir)
    assert main(cli_args(circuit, [base, odir], out)) == 2
    assert "different tokenizer" in capsys.readouterr().err and not out.exists()


def test_position_missing_in_counterfactual_is_an_error(task):
    enc = encoded(task, "position")
    enc.counterfactual.positions["prev_query_label"][0] = -1
    with pytest.raises(D.DesiderataError, match="no prev_query_label token"):
        D.check_position(enc, "prev_query_label")


def test_dcm_view_keeps_what_dcm_can_train_and_says_what_it_changed():
    from circuitdiff.core.circuit import Circuit, CircuitGroup
    from circuitdiff.methods.dcm import dcm_view

    c = Circuit({"readers": CircuitGroup([(1, 0), (1, 1)], "last"),
                 "mover": CircuitGroup([(0, 2)], "last"),
                 "movers": CircuitGroup([(0, 3), (0, 4)], "labels"),
                 "lonely": CircuitGroup([(0, 5)], "query_label"),
                 "empty": CircuitGroup([], "prev_query_label")}, 2, 8, "m")
    view, notes = dcm_view(c)
    assert {n: (g.position, g.heads) for n, g in view.groups.items()} == {
        "readers+mover": ("last", [(1, 0), (1, 1), (0, 2)])}
    assert any("movers is read at labels" in n for n in notes)
    assert any("lonely is one head (0.5) alone at query_label" in n for n in notes)
    assert any("mover (one head, 0.2) merged into readers" in n for n in notes)
