"""CMAP: cross-model activation patching (tiny models, CPU, offline)."""

from __future__ import annotations

import copy
import gc
import json
import weakref

import pytest
import torch

from circuitdiff.core.arch import ArchitectureError, resolve
from circuitdiff.core.circuit import Circuit, CircuitGroup
from circuitdiff.core.metrics import last_logits
from circuitdiff.core.model import LoadedModel, load_model
from circuitdiff.core.runs import RunFolder
from circuitdiff.core.task import EntityTrackingTask, TaskConfig, batches
from circuitdiff.methods.accuracy import evaluate_accuracy
from circuitdiff.core.pool import ModelPool
from circuitdiff.core.pool import check_pair
from circuitdiff.methods.cmap import (CMAPConfig, Endpoint, InputPatch, OutputPatch, _Bootstrap,
                                      gap_share, patched_logits, run)
from circuitdiff.report.cmap import format_cmap, save_cmap_report

from conftest import save_base_and_lora, tiny_llama

torch.set_num_threads(1)
N_BOXES = 4


@pytest.fixture()
def prompts(tokenizer):
    return EntityTrackingTask(tokenizer, TaskConfig(n_boxes=N_BOXES), seed=0).sample(16)


def circuit(layers: int = 3, heads: int = 4) -> Circuit:
    """Four groups at three positions, an empty one, heads over two layers and both kv heads."""
    return Circuit({"value_fetcher": CircuitGroup([(2, 0), (2, 3), (1, 1)], "last"),
                    "position_transmitter": CircuitGroup([(1, 0)], "last"),
                    "position_detector": CircuitGroup([(0, 2), (1, 3)], "query_label"),
                    "structure_reader": CircuitGroup([], "prev_query_label")},
                   layers, heads, "tiny")


def logits(loaded: LoadedModel, prompts, adapter: bool | None = None) -> torch.Tensor:
    b = batches(prompts, loaded.tokenizer, 64)[0]
    with torch.no_grad():
        if adapter is False:
            with loaded.adapter_disabled():
                return last_logits(loaded, b)
        return last_logits(loaded, b)


def cfg(**kw) -> CMAPConfig:
    base = dict(n_prompts=16, n_boxes=N_BOXES, random_draws=2, bootstrap=50, batch_size=6,
                max_rows=40, circuit=circuit())
    return CMAPConfig(**{**base, **kw})


def accuracies(result) -> dict:
    return {(d.direction, r.kind, r.name): (r.accuracy, r.random)
            for d in result.directions for r in d.rows}


# -- exactness -------------------------------------------------------------------------------------
def test_cmap_of_a_model_into_itself_reproduces_its_accuracy(tiny, prompts):
    full = evaluate_accuracy(tiny, prompts).accuracy
    with pytest.warns(UserWarning, match="same logits"):
        res = run([tiny, tiny], prompts, cfg(per_head=True, input=True, reverse=True))
    assert [d.direction for d in res.directions] == ["finetuned->base", "base->finetuned"]
    for d in res.directions:
        assert d.source_accuracy == d.target_accuracy == full
        assert d.identical
        rows = [r for r in d.rows if not r.empty]
        assert {r.kind for r in rows} == {"group", "cumulative", "circuit", "input"}
        for r in rows:
            assert r.accuracy == full and r.share is None and r.share_ci is None, r
            assert all(a == full for a in r.random)
        assert [r.name for r in d.rows if r.empty] == ["structure_reader"]
        for m in d.per_head.values():
            assert all(a == full for row in m["accuracy"] for a in row)
            assert all(s is None for row in m["share"] for s in row)
    assert res.warnings and "undefined" in res.warnings[0]
    assert res.directions[0].gap_uncertain and res.directions[0].gap_ci == [0.0, 0.0]


def finetune_layer0_qkv(base: LoadedModel, seed: int = 7) -> LoadedModel:
    """A copy of ``base`` whose layer-0 q/k/v weights (only) are different."""
    ft = copy.deepcopy(base.model)
    g = torch.Generator().manual_seed(seed)
    attn = resolve(ft).attention[0]
    with torch.no_grad():
        for proj in (attn.q, attn.k, attn.v):
            proj.weight.add_(0.5 * torch.randn(proj.weight.shape, generator=g))
    return LoadedModel(ft, base.tokenizer, resolve(ft), "tiny-layer0-qkv")


def test_output_cmap_of_every_layer0_head_at_every_position_is_the_finetune(tiny, prompts):
    ft = finetune_layer0_qkv(tiny)
    want, base_logits = logits(ft, prompts), logits(tiny, prompts)
    assert (want - base_logits).abs().max() > 1e-2  # the fine-tune really differs
    layer0 = [(0, h) for h in range(4)]
    src, tgt = Endpoint("ft", ft), Endpoint("base", tiny)
    got = patched_logits(src, tgt, prompts, OutputPatch.of({"all": layer0}), batch_size=5)
    assert (got - want).abs().max() <= 1e-5
    # input CMAP of q, k and v of those heads is the same edit one step earlier
    got = patched_logits(src, tgt, prompts, InputPatch(tuple(layer0), "all", "qkv"), batch_size=5)
    assert (got - want).abs().max() <= 1e-5
    # only at `last`, later positions' layer-0 outputs stay the base's: not the fine-tune
    got = patched_logits(src, tgt, prompts, OutputPatch.of({"last": layer0}), batch_size=5)
    assert (got - want).abs().max() > 1e-3


def test_output_cmap_at_named_positions_equals_a_hand_built_patch(tiny, prompts):
    """Each group's heads are patched at its own position, and nowhere else."""
    from circuitdiff.core.interventions import Read, Write

    ft = finetune_layer0_qkv(tiny)
    by_pos = {"last": [(0, 1), (1, 2)], "query_label": [(0, 3), (0, 0)]}
    got = patched_logits(Endpoint("ft", ft), Endpoint("base", tiny), prompts,
                         OutputPatch.of(by_pos), batch_size=7)
    b = batches(prompts, tiny.tokenizer, 64)[0]
    reads = {pos: Read([0, 1], b.positions[pos]) for pos in by_pos}
    with torch.no_grad():
        last_logits(ft, b, list(reads.values()))
        edits = []
        for pos, heads in by_pos.items():
            for layer in (0, 1):
                where = torch.zeros(4, dtype=torch.bool)
                where[[h for l, h in heads if l == layer]] = True
                edits.append(Write(layer, reads[pos].out[layer], b.positions[pos], where[None, None]))
        want = last_logits(tiny, b, edits)
    assert (got - want).abs().max() <= 1e-6
    assert (want - logits(tiny, prompts)).abs().max() > 1e-3


def test_stacked_variants_equal_one_variant_per_forward(tiny, prompts):
    ft = finetune_layer0_qkv(tiny)
    c = dict(per_head=True, reverse=True, random_draws=3)
    one = run([tiny, ft], prompts, cfg(max_rows=6, **c))     # batch 6: one variant
    many = run([tiny, ft], prompts, cfg(max_rows=1000, **c))  # all variants at once
    assert accuracies(one) == accuracies(many)
    assert [d.per_head for d in one.directions] == [d.per_head for d in many.directions]
    accs = [a for d in many.directions for m in d.per_head.values() for row in m["accuracy"]
            for a in row]
    assert len(set(accs)) > 1  # single heads make a difference: the comparison means something


def test_input_qkv_equals_output_cmap_in_layer0_and_q_alone_does_not(tiny, prompts):
    """In layer 0 both models read the same residual, so patching a head's q, k and v is
    patching its output; under GQA, heads sharing the patched k/v keep the base's outputs."""
    ft = finetune_layer0_qkv(tiny)
    src, tgt = Endpoint("ft", ft), Endpoint("base", tiny)
    heads = ((0, 1),)  # kv head 0 is shared with head 0, which must stay the base's
    out = patched_logits(src, tgt, prompts, OutputPatch.of({"query_label": heads}))
    qkv = patched_logits(src, tgt, prompts, InputPatch(heads, "query_label", "qkv"))
    assert (out - qkv).abs().max() <= 1e-5
    q = patched_logits(src, tgt, prompts, InputPatch(heads, "query_label", "q"))
    assert (out - q).abs().max() > 1e-4


# -- LoRA: one weight copy, adapter toggled --------------------------------------------------
def test_lora_path_equals_two_separately_loaded_models(tiny_lora, tokenizer, prompts):
    merged_model = copy.deepcopy(tiny_lora.model).merge_and_unload()
    merged = LoadedModel(merged_model, tokenizer, resolve(merged_model), "merged")
    base_model = tiny_llama(len(tokenizer))  # the weights under the adapter (same seed)
    base = LoadedModel(base_model, tokenizer, resolve(base_model), "base")
    assert (logits(base, prompts) - logits(tiny_lora, prompts, adapter=False)).abs().max() <= 1e-5
    toggled_ft, toggled_base = Endpoint("lora", tiny_lora, True), Endpoint("lora", tiny_lora, False)
    for patch in (OutputPatch.of({"last": [(2, 0), (1, 1)], "query_label": [(0, 2)]}),
                  InputPatch(((1, 1), (1, 3)), "last", "qk")):
        two_ft, two_base = Endpoint("m", merged), Endpoint("b", base)
        for (s1, t1), (s2, t2) in (((toggled_ft, toggled_base), (two_ft, two_base)),
                                   ((toggled_base, toggled_ft), (two_base, two_ft))):
            one = patched_logits(s1, t1, prompts, patch)
            two = patched_logits(s2, t2, prompts, patch)
            assert (one - two).abs().max() <= 1e-5
            assert (one - logits(tiny_lora, prompts, adapter=t1.adapter)).abs().max() > 1e-4
    no_load = lambda spec: pytest.fail(f"the LoRA path loaded {spec}")  # noqa: E731
    c = cfg(reverse=True, input=True, per_head=True)
    a = run(ModelPool([tiny_lora], no_load), prompts, c)
    b = run([base, merged], prompts, c)
    assert accuracies(a) == accuracies(b)
    assert [d.per_head for d in a.directions] == [d.per_head for d in b.directions]


def test_full_finetune_is_recorded_then_freed_never_two_models_loaded(tmp_path, tokenizer,
                                                                       prompts):
    base_dir, _ = save_base_and_lora(tokenizer, tmp_path)
    ft_dir = tmp_path / "full"
    tiny_llama(len(tokenizer), seed=3).save_pretrained(ft_dir)
    tokenizer.save_pretrained(ft_dir)
    alive: list[weakref.ref] = []
    max_alive = 0

    def load(spec):
        nonlocal max_alive
        gc.collect()
        loaded = load_model(spec)
        alive.append(weakref.ref(loaded.model))
        max_alive = max(max_alive, sum(r() is not None for r in alive))
        return loaded

    folder = RunFolder(tmp_path / "run")
    res = run(ModelPool([str(base_dir), str(ft_dir)], load), prompts, cfg(reverse=True),
              store=folder)
    assert max_alive == 1 and len(alive) == 3  # fine-tune, base, fine-tune again (reverse)
    records = list((tmp_path / "run" / "cmap" / "record").glob("*.safetensors"))
    assert len(records) == 2
    from safetensors import safe_open
    with safe_open(str(records[0]), "pt") as f:  # only the group positions are kept
        shapes = {f.get_slice(k).get_shape()[1] for k in f.keys() if ".head." in k}
    assert shapes == {2}  # last and query_label (the empty group's position is not needed)
    # a rerun resumes from the run folder: nothing is patched again
    import circuitdiff.methods.cmap as cm
    orig = cm._direction
    cm._direction = lambda *a, **k: pytest.fail("recomputed")
    try:
        again = run([str(base_dir), str(ft_dir)], prompts, cfg(reverse=True), store=folder)
    finally:
        cm._direction = orig
    assert again.to_dict()["directions"] == res.to_dict()["directions"]


# -- metric ---------------------------------------------------------------------------------------
def test_gap_share_is_undefined_not_divided_by_zero():
    assert gap_share(0.7, 0.5, 0.5) is None
    assert gap_share(0.7, 0.5, 0.9) == pytest.approx(0.5)
    assert gap_share(0.5, 0.9, 0.5) == pytest.approx(1.0)  # reverse: the gain removed
    same = torch.tensor([True, False, True, False])
    boot = _Bootstrap(4, 200, 0, 0.95, same, same)
    assert boot.share_ci(torch.tensor([True, True, True, False])) == (None, 0)
    assert boot.gap_ci() == [0.0, 0.0]
    assert boot.accuracy_ci(same) is not None


def test_bootstrap_interval_brackets_the_share():
    g = torch.Generator().manual_seed(0)
    src = torch.rand(400, generator=g) < 0.9
    tgt = torch.rand(400, generator=g) < 0.4
    patched = torch.where(torch.rand(400, generator=g) < 0.5, src, tgt)
    boot = _Bootstrap(400, 500, 0, 0.95, src, tgt)
    share = gap_share(patched.double().mean().item(), tgt.double().mean().item(),
                      src.double().mean().item())
    ci, defined = boot.share_ci(patched)
    assert defined == 500 and ci[0] < share < ci[1] and ci[1] - ci[0] < 0.4
    lo, hi = boot.gap_ci()
    assert 0 < lo < src.double().mean() - tgt.double().mean() < hi


def test_random_control_runs_every_row_on_each_draw(tiny, prompts):
    ft = finetune_layer0_qkv(tiny)
    res = run([tiny, ft], prompts, cfg(random_draws=3))
    d = res.directions[0]
    for r in d.rows:
        if not r.empty:
            assert len(r.random) == 3
            assert r.random_mean == pytest.approx(sum(r.random) / 3)
    assert [r.kind for r in d.rows] == ["group"] * 4 + ["cumulative"] * 2 + ["circuit"]
    text = format_cmap(res)
    assert "(empty group)" in text and "n=16" in text


def test_group_rows_take_a_prefix_of_the_circuits_draws(tiny, prompts):
    """``group_random_draws``: the whole circuit keeps every draw (its verdict ranks it among
    them), the group and cumulative rows the first k — the same draws a run with k gives them."""
    ft = finetune_layer0_qkv(tiny)
    few = run([tiny, ft], prompts, cfg(random_draws=2)).directions[0]
    mixed = run([tiny, ft], prompts, cfg(random_draws=4, group_random_draws=2)).directions[0]
    for a, b in zip(few.rows, mixed.rows):
        if b.empty:
            continue
        if b.kind == "circuit":
            assert len(b.random) == 4 and b.random[:2] == a.random
        else:
            assert b.random == a.random and len(b.random) == 2


# -- CLI ------------------------------------------------------------------------------------------
def write_circuit(path, layers=3, heads=4):
    circuit(layers, heads).save(path)
    return str(path)


def test_cli_cmap_on_saved_lora_models_both_directions(tmp_path, saved_models, capsys):
    from circuitdiff.cli import main

    base_dir, lora_dir = saved_models
    out = tmp_path / "run"
    argv = ["cmap", "--circuit", write_circuit(tmp_path / "c.json"), "--base", str(base_dir),
            "--finetuned", str(lora_dir), "--n-boxes", "4", "-n", "10", "--out", str(out),
            "--per-head", "--reverse", "--input", "--random-draws", "2", "--bootstrap", "50"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "LoRA adapter toggled" in text and "gap share" in text and "(empty group)" in text
    res = json.loads(next(out.glob("cmap/c/*_vs_*/result.json")).read_text())
    assert [d["direction"] for d in res["directions"]] == ["finetuned->base", "base->finetuned"]
    assert res["n"] == 10 and res["config"]["seed"] == 0
    d = res["directions"][0]
    assert set(d["per_head"]) == {"last", "query_label"}
    assert len(d["per_head"]["last"]["accuracy"]) == 3
    assert len(d["per_head"]["last"]["accuracy"][0]) == 4
    pngs = sorted(p.name for p in out.glob("cmap/c/*_vs_*/*.png"))
    assert pngs == ["bars_base_to_finetuned.png", "bars_finetuned_to_base.png",
                    "heads_base_to_finetuned_last.png", "heads_base_to_finetuned_query_label.png",
                    "heads_finetuned_to_base_last.png", "heads_finetuned_to_base_query_label.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in out.glob("cmap/c/*_vs_*/*.png"))
    assert main(argv) == 0  # resumes from the cache


def bad_setups(tmp_path, tokenizer):
    base_dir, lora_dir = save_base_and_lora(tokenizer, tmp_path)
    other_base = tmp_path / "other_base"
    tiny_llama(len(tokenizer), seed=5).save_pretrained(other_base)
    tokenizer.save_pretrained(other_base)
    two_layers = tmp_path / "two_layers"
    tiny_llama(len(tokenizer), layers=2).save_pretrained(two_layers)
    tokenizer.save_pretrained(two_layers)
    other_tok = tmp_path / "other_tok"
    tiny_llama(len(tokenizer)).save_pretrained(other_tok)
    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(["zebra"])
    tok.save_pretrained(other_tok)
    return base_dir, lora_dir, other_base, two_layers, other_tok


@pytest.mark.parametrize("case, needle", [
    ("lora_on_other_base", "pass --base"),
    ("different_grid", "head grids"),
    ("different_tokenizer", "different tokenizers"),
    ("circuit_grid", "use a circuit found on this base"),
])
def test_cli_cmap_bad_input_exits_2_and_writes_nothing(tmp_path, tokenizer, capsys, case, needle):
    from circuitdiff.cli import main

    base_dir, lora_dir, other_base, two_layers, other_tok = bad_setups(tmp_path, tokenizer)
    c = write_circuit(tmp_path / "c.json")
    base, ft = {"lora_on_other_base": (other_base, lora_dir),
                "different_grid": (base_dir, two_layers),
                "different_tokenizer": (base_dir, other_tok),
                "circuit_grid": (base_dir, other_base)}[case]
    if case == "circuit_grid":
        c = write_circuit(tmp_path / "c5.json", layers=5)
    out = tmp_path / "run"
    argv = ["cmap", "--circuit", c, "--base", str(base), "--finetuned", str(ft), "--n-boxes", "4",
            "-n", "6", "--out", str(out)]
    capsys.readouterr()  # drop the model-saving progress bars
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_cli_cmap_identical_models_warn_and_report_undefined(tmp_path, saved_models, capsys):
    from circuitdiff.cli import main

    base_dir, _ = saved_models
    out = tmp_path / "run"
    argv = ["cmap", "--circuit", write_circuit(tmp_path / "c.json"), "--base", str(base_dir),
            "--finetuned", str(base_dir), "--n-boxes", "4", "-n", "6", "--out", str(out),
            "--random-draws", "0", "--bootstrap", "20"]
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert "warning" in cap.err and "undefined" in cap.err
    assert "gap 0 (share undefined)" in cap.out and "undefined" in cap.out


def test_api_rejects_models_of_different_grids(tiny, tokenizer, prompts):
    small = tiny_llama(len(tokenizer), layers=2)
    other = LoadedModel(small, tokenizer, resolve(small), "two-layers")
    with pytest.raises(ArchitectureError, match="head grids"):
        run([tiny, other], prompts, cfg())
    with pytest.raises(ValueError, match="no LoRA adapter"):
        run(tiny, prompts, cfg())


def test_check_pair_sees_the_lora_path_of_organisms():
    assert check_pair("organism:base", "organism:lora").lora
    assert not check_pair("organism:base", "organism:full").lora
    assert check_pair("organism:base", "organism:base").warnings
    with pytest.raises(ValueError, match="pass --base organism:base$"):
        check_pair("organism:full", "organism:lora")


def test_report_files(tiny, prompts, tmp_path):
    ft = finetune_layer0_qkv(tiny)
    res = run([tiny, ft], prompts, cfg(per_head=True, per_head_positions=("last",)))
    paths = save_cmap_report(res, RunFolder(tmp_path))
    names = sorted(p.name for p in paths)
    assert names == ["bars_finetuned_to_base.png", "heads_finetuned_to_base_last.png",
                     "result.json", "table.txt"]


def test_rows_count_units_and_distinct_heads_apart(tiny, prompts):
    """Issue 31: a head the circuit uses at two positions is two (head, role) units but one
    head; the circuit's size is its units, in the rows and in the table."""
    ft = finetune_layer0_qkv(tiny)
    c = Circuit({"a": CircuitGroup([(0, 1), (1, 2)], "last"),
                 "b": CircuitGroup([(0, 1)], "query_label")}, 3, 4, "tiny")
    res = run([tiny, ft], prompts, cfg(circuit=c, random_draws=0, input=True))
    rows = {r.name: r for r in res.directions[0].rows}
    assert (rows["circuit"].n_units, rows["circuit"].n_heads) == (3, 2)
    assert (rows["a"].n_units, rows["a"].n_heads) == (2, 2)
    assert (rows["b:QKV"].n_units, rows["b:QKV"].n_heads) == (1, 1)
    table = format_cmap(res).splitlines()
    assert "units" in table[1] and "heads" in table[1]
    assert any(line.startswith("circuit") and "| 3 " in line and "| 2 " in line for line in table)


def test_config_key_is_derived_and_needs_a_circuit(tiny, prompts):
    c = cfg()
    assert "batch_size" not in c.cache_key() and "max_rows" not in c.cache_key()
    assert c.cache_key()["circuit"] == circuit().to_dict()
    assert "circuit" not in c.settings()
    assert CMAPConfig.from_dict(c.to_dict()).cache_key() == c.cache_key()
    with pytest.raises(ValueError, match="circuit"):
        run([tiny, tiny], prompts, cfg(circuit=None))
    with pytest.raises(ValueError, match="confidence"):
        cfg(confidence=float("nan"))


def test_positions_are_the_task_roles_as_index_columns(tokenizer, prompts):
    """CMAP's positions are the task's roles through ``Batch.role_index`` (``[B, P]``), plus
    ``all``; an unknown name is a one-line TaskError."""
    from circuitdiff.core.task import TaskError
    from circuitdiff.methods.cmap import position_index

    b = batches(prompts, tokenizer, 64)[0]
    assert torch.equal(position_index(b, "last"), b.role("last")[:, None])
    assert position_index(b, "all").shape == b.input_ids.shape
    with pytest.raises(TaskError, match="nope"):
        position_index(b, "nope")
