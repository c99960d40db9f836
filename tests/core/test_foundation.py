"""Foundation: task positions, loading, architecture adapter and head interventions."""

from __future__ import annotations

import json

import pytest
import torch

from circuitdiff.core.metrics import last_logits
from circuitdiff.methods.accuracy import evaluate_accuracy
from circuitdiff.core.arch import ArchitectureError, resolve
from circuitdiff.core.interventions import (InterventionError, Read, StopAfter, Write, intervene,
                                       run_with_edits)
from circuitdiff.core.model import LoadedModel, ModelSpecError, load_model, resolve_dtype
from circuitdiff.core.task import (EntityTrackingTask, Prompt, TaskConfig, TaskError, encode,
                              encode_pair, load_jsonl, locate, save_jsonl)

from conftest import add_lora, save_base_and_lora, tiny_llama
from test_roles import check_roles


@pytest.fixture()
def prompts(tokenizer):
    return EntityTrackingTask(tokenizer, TaskConfig(n_boxes=7), seed=3).sample(6)


def _logits(loaded, batch, edits=()):
    with torch.no_grad():
        return run_with_edits(loaded.model, batch.model_inputs(), edits, loaded.arch)


# -- interventions -----------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["tiny", "tiny_lora"])
def test_replacing_heads_with_their_own_values_reproduces_logits(which, request, tokenizer,
                                                                 prompts):
    loaded = request.getfixturevalue(which)
    batch = encode(prompts, tokenizer)
    L = loaded.arch.n_layers
    clean = _logits(loaded, batch)
    reads = [Read(range(L), kind=k) for k in ("head", "q", "k", "v")]
    _logits(loaded, batch, reads)
    assert reads[0].out[0].shape == (6, batch.input_ids.shape[1], 4, 16)
    assert reads[2].out[0].shape[2] == loaded.arch.n_kv_heads == 2
    writes = [Write(l, r.out[l], kind=r.kind) for r in reads for l in range(L)]
    again = _logits(loaded, batch, writes)
    assert torch.allclose(again, clean, atol=1e-6)
    # the reads are real: writing another sample's values does change the output
    swapped = [Write(l, reads[0].out[l].roll(1, 0)) for l in range(L)]
    assert not torch.allclose(_logits(loaded, batch, swapped), clean, atol=1e-3)


@pytest.mark.parametrize("which", ["tiny", "tiny_lora"])
def test_one_head_at_one_position_changes_only_that_position_onward(which, request, tokenizer,
                                                                    prompts):
    loaded = request.getfixturevalue(which)
    batch = encode(prompts, tokenizer, padding_side="right")
    clean = _logits(loaded, batch)
    pos = batch.positions["query_label"]
    vals = torch.randn(len(prompts), 1, 16) * 3
    where = torch.zeros(len(prompts), 1, 4, dtype=torch.bool)
    where[:, :, 1] = True
    edited = _logits(loaded, batch, [Write(1, vals[:, :, None, :], pos, where)])
    diff = (edited - clean).abs().amax(-1)  # [B, T]
    t = torch.arange(batch.input_ids.shape[1])[None]
    before = t < pos[:, None]
    assert diff[before].max() == 0
    real_after = (t >= pos[:, None]) & batch.attention_mask.bool()
    assert (diff[real_after] > 1e-5).all()


def test_lora_edit_equals_manual_computation_with_o_proj_delta(tiny_lora, tokenizer, prompts):
    loaded = tiny_lora
    batch = encode(prompts[:2], tokenizer)
    layer, head = 2, 3
    pos = batch.positions["last"]
    new = torch.randn(2, 1, 1, 16)
    where = torch.zeros(2, 1, 4, dtype=torch.bool)
    where[..., head] = True
    # manual: read the o_proj input, edit the head, push it through base weight + LoRA delta
    o = loaded.arch.attention[layer].o
    captured = {}
    h = o.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0].clone()))
    with torch.no_grad():
        loaded.model(**batch.model_inputs())
    h.remove()
    x = captured["x"].clone()
    x4 = x.view(*x.shape[:2], 4, 16)
    x4[torch.arange(2), pos, head] = new[:, 0, 0]
    scale = o.scaling["default"]
    manual = x @ o.base_layer.weight.T + o.lora_B["default"](o.lora_A["default"](x)) * scale
    lora_delta = o.lora_B["default"](o.lora_A["default"](x)) * scale
    assert lora_delta.abs().max() > 1e-3  # the delta is real
    got = {}
    h = o.register_forward_hook(lambda m, a, out: got.setdefault("y", out.clone()))
    with torch.no_grad():
        run_with_edits(loaded.model, batch.model_inputs(), [Write(layer, new, pos, where)], loaded.arch)
    h.remove()
    assert torch.allclose(got["y"], manual, atol=1e-6)


def test_disabling_adapter_reproduces_base(tokenizer, prompts, tmp_path):
    base = tiny_llama(len(tokenizer))
    batch = encode(prompts, tokenizer)
    with torch.no_grad():
        ref = base(**batch.model_inputs()).logits
    peft_model = add_lora(tiny_llama(len(tokenizer)))
    loaded = LoadedModel(peft_model, tokenizer, resolve(peft_model), "tiny", "lora")
    with torch.no_grad():
        with_adapter = loaded.model(**batch.model_inputs()).logits
        with loaded.adapter_disabled():
            off = loaded.model(**batch.model_inputs()).logits
    assert not torch.allclose(with_adapter, ref, atol=1e-3)
    assert torch.allclose(off, ref, atol=1e-6)


def test_mix_is_differentiable_and_interpolates(tiny, tokenizer, prompts):
    batch = encode(prompts[:3], tokenizer)
    pos = batch.positions["last"]
    r = Read([1], pos)
    clean = _logits(tiny, batch, [r])
    other = torch.randn_like(r.out[1])
    ones = torch.ones(4, requires_grad=True)
    out = run_with_edits(tiny.model, batch.model_inputs(), [Write(1, other, pos, mode="mix", m=ones)],
              tiny.arch)
    assert torch.allclose(out, clean, atol=1e-6)
    out[:, -1].logsumexp(-1).sum().backward()
    assert ones.grad is not None and ones.grad.abs().sum() > 0
    set_all = _logits(tiny, batch, [Write(1, other, pos)])
    zeros = _logits(tiny, batch, [Write(1, other, pos, mode="mix", m=torch.zeros(4))])
    assert torch.allclose(set_all, zeros, atol=1e-6)


def test_stop_after_and_hooks_removed_on_error(tiny, tokenizer, prompts):
    batch = encode(prompts[:2], tokenizer)
    r = Read([0, 1])
    assert run_with_edits(tiny.model, batch.model_inputs(), [r, StopAfter(1)], tiny.arch) is None
    assert set(r.out) == {0, 1}
    n_hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks)  # noqa: E731
                          for m in tiny.model.modules())
    assert n_hooks() == 0
    with pytest.raises(RuntimeError):
        with intervene(tiny.model, [Read([0, 1, 2], kind="v")]):
            assert n_hooks() == 3
            raise RuntimeError("boom")
    assert n_hooks() == 0


def test_positions_outside_prompt_are_rejected(tiny, tokenizer, prompts):
    batch = encode(prompts[:2], tokenizer)
    T = batch.input_ids.shape[1]
    with pytest.raises(InterventionError, match="outside the prompt"):
        run_with_edits(tiny.model, batch.model_inputs(), [Read([0], torch.tensor([T, 0]))], tiny.arch)
    with pytest.raises(InterventionError, match="outside"):
        run_with_edits(tiny.model, batch.model_inputs(), [Read([0], torch.tensor([-1, 0]))], tiny.arch)
    with pytest.raises(InterventionError, match="layer 9"):
        run_with_edits(tiny.model, batch.model_inputs(), [Read([9])], tiny.arch)
    short = Prompt(["apple", "book", "map"], ["A", "B", "C"], 0, "A")
    padded = encode([short, prompts[0]], tokenizer)  # first row is left-padded
    with pytest.raises(InterventionError, match="padding"):
        run_with_edits(tiny.model, padded.model_inputs(), [Read([0], torch.tensor([0, 0]))], tiny.arch)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_match_unpadded(tiny_lora, tokenizer, side):
    task3 = EntityTrackingTask(tokenizer, TaskConfig(n_boxes=3), seed=1)
    task7 = EntityTrackingTask(tokenizer, TaskConfig(n_boxes=7), seed=2)
    mixed = task3.sample(2) + task7.sample(2)
    batch = encode(mixed, tokenizer, padding_side=side)
    batched = last_logits(tiny_lora, batch)
    for i, p in enumerate(mixed):
        single = last_logits(tiny_lora, encode([p], tokenizer))
        assert torch.allclose(batched[i], single[0], atol=1e-5)
    # reads at named positions agree too
    r = Read([2], batch.positions["query_label"])
    last_logits(tiny_lora, batch, [r])
    for i, p in enumerate(mixed):
        one = encode([p], tokenizer)
        r1 = Read([2], one.positions["query_label"])
        last_logits(tiny_lora, one, [r1])
        assert torch.allclose(r.out[2][i], r1.out[2][0], atol=1e-5)


# -- architecture -------------------------------------------------------------------------------
def test_architecture_counts_from_config(tiny, tiny_lora):
    for lm in (tiny, tiny_lora):
        a = lm.arch
        assert (a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim) == (3, 4, 2, 16)
        assert a.kv_head_of(3) == 1 and a.kv_head_of(1) == 0
    # with a LoRA the sites are the peft wrappers, so hooks see the LoRA delta
    assert hasattr(tiny_lora.arch.attention[0].o, "lora_A")


def test_architecture_refuses_models_without_attention_projections():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50))
    with pytest.raises(ArchitectureError, match="q_proj/k_proj/v_proj/o_proj"):
        resolve(m)


def test_no_gqa_and_other_families():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    m = tiny_llama(60, heads=4, kv_heads=4)
    assert resolve(m).n_groups == 1
    q = Qwen2ForCausalLM(Qwen2Config(vocab_size=60, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2))
    a = resolve(q)
    assert (a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim) == (2, 4, 2, 8)


# -- task ---------------------------------------------------------------------------------------
def _check_positions(tok, task):
    prompts = task.sample(5)
    for p in prompts:
        loc = locate(p, tok)
        toks = [tok.decode([i]).strip() for i in loc.input_ids]
        pos = loc.positions
        assert toks[pos["last"]] == "the"
        assert toks[pos["query_label"]] == p.query_label
        assert toks[pos["prev_query_label"]] == p.query_label
        assert pos["prev_query_label"] < pos["query_label"]
        assert toks[pos["correct_object"]] == p.answer
        assert [toks[i] for i in loc.box_label_positions] == p.labels
        assert [toks[i] for i in loc.box_object_positions] == p.objects
        assert loc.answer_id == loc.input_ids[pos["correct_object"]]
        assert tok.decode([loc.answer_id]) in (" " + p.answer, p.answer)
        assert len(tok(" " + p.answer, add_special_tokens=False).input_ids) >= 1
    cf = task.corrupt(prompts)
    for c in cf:
        assert c.query_label not in c.labels and c.query_index is None
    dcm = task.dcm_counterfactuals(prompts)
    for kind in ("object_value", "position", "box_label"):
        ids = dcm.target_ids(tok, kind)
        for b, c, i, w in zip(dcm.base, dcm.counterfactual, ids, dcm.targets[kind]):
            assert tok.decode([i]).strip() == w
    for b, c, v, p_, bl in zip(dcm.base, dcm.counterfactual, *dcm.targets.values()):
        j = c.query_index
        k = b.labels.index(c.query_label)
        assert v == c.objects[j]              # the counterfactual's own answer
        assert p_ == b.objects[j]             # base object at the counterfactual's query position
        assert bl == b.objects[k]             # base object in the box with the cf's query label
        assert len({v, p_, bl, b.answer}) == 4


def test_positions_word_level_tokenizer(tokenizer):
    _check_positions(tokenizer, EntityTrackingTask(tokenizer, TaskConfig(n_boxes=7), seed=0))


def test_positions_smollm2_tokenizer(smollm2_path):
    from circuitdiff.core.model import load_tokenizer

    tok = load_tokenizer(smollm2_path)
    _check_positions(tok, EntityTrackingTask(tok, TaskConfig(n_boxes=7), seed=0))
    check_roles(tok)  # the whole position schema (tests/core/test_roles.py), same tokenizer


@pytest.mark.slow  # the Gemma-3 GGUF tokenizer (~35 s)
def test_positions_gemma3_tokenizer(gemma3_path):
    from circuitdiff.core.model import load_tokenizer

    tok = load_tokenizer(gemma3_path)
    assert tok.bos_token is not None  # positions must survive a leading special token
    _check_positions(tok, EntityTrackingTask(tok, TaskConfig(n_boxes=7), seed=0))
    check_roles(tok)  # the whole position schema, with a `prefix` role for the BOS token


def test_label_matching_is_by_token_not_substring(tokenizer):
    # 'B' must never match the B of 'Box'; 'X' objects/labels land on their own tokens
    p = Prompt(["book", "box", "bag"], ["B", "O", "X"], 0, "B")
    loc = locate(p, tokenizer)
    toks = tokenizer.convert_ids_to_tokens(loc.input_ids)
    assert toks[loc.positions["prev_query_label"]] == " B"
    assert toks[loc.positions["correct_object"]] == " book"


def test_task_bad_input(tokenizer):
    with pytest.raises(TaskError, match="larger than the label alphabet"):
        TaskConfig(n_boxes=5, labels=("A", "B", "C"))
    with pytest.raises(TaskError, match="single tokens"):
        EntityTrackingTask(tokenizer, TaskConfig(n_boxes=3, objects=("apple", "zebra", "unicorn",
                                                                       "yak", "okapi", "lynx")))
    task = EntityTrackingTask(tokenizer, TaskConfig(n_boxes=3))
    with pytest.raises(TaskError, match="pair one to one"):
        encode_pair(task.sample(3), task.corrupt(task.sample(2)), tokenizer)


def test_jsonl_roundtrip(tokenizer, tmp_path):
    task = EntityTrackingTask(tokenizer, TaskConfig(n_boxes=4), seed=5)
    ps = task.sample(4)
    save_jsonl(tmp_path / "d.jsonl", ps, {"note": list("abcd")})
    back, extra = load_jsonl(tmp_path / "d.jsonl")
    assert [p.text for p in back] == [p.text for p in ps] and extra["note"] == list("abcd")
    (tmp_path / "bad.jsonl").write_text('{"foo": 1}\n')
    with pytest.raises(TaskError, match="bad.jsonl:1"):
        load_jsonl(tmp_path / "bad.jsonl")


# -- loading ------------------------------------------------------------------------------------
def test_load_folder_adapter_and_base_from_same_weights(saved_models, tokenizer, prompts):
    base_dir, lora_dir = saved_models
    base = load_model(str(base_dir))
    both = load_model(str(base_dir), adapter=str(lora_dir))
    via_folder = load_model(str(lora_dir))  # adapter folder names its (relative) base
    batch = encode(prompts, tokenizer)
    b = last_logits(base, batch)
    a = last_logits(both, batch)
    assert not torch.allclose(a, b, atol=1e-4)
    assert torch.allclose(last_logits(via_folder, batch), a, atol=1e-6)
    with torch.no_grad(), both.adapter_disabled():
        assert torch.allclose(last_logits(both, batch), b, atol=1e-6)
    assert both.arch.n_kv_heads == 2 and hasattr(both.arch.attention[1].q, "lora_B")
    res = evaluate_accuracy(both, prompts, batch_size=4)
    assert res.n == 6 and 0 <= res.accuracy <= 1


def test_load_bad_input(saved_models, tokenizer, tmp_path):
    base_dir, lora_dir = saved_models
    with pytest.raises(ModelSpecError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelSpecError, match="does not exist"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelSpecError, match="adapter"):
        load_model(str(base_dir), adapter=str(tmp_path / "missing_adapter"))
    other = tiny_llama(len(tokenizer), layers=3, heads=2, kv_heads=2)
    other.config.hidden_size  # different head count -> q/k/v shapes differ
    from transformers import LlamaConfig, LlamaForCausalLM
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32,
                                        intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=2, num_key_value_heads=2))
    wide.save_pretrained(tmp_path / "wide")
    tokenizer.save_pretrained(tmp_path / "wide")
    with pytest.raises(ModelSpecError, match="does not match the base"):
        load_model(str(tmp_path / "wide"), adapter=str(lora_dir))
    with pytest.raises(ModelSpecError, match="unknown dtype"):
        load_model(str(base_dir), dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(ModelSpecError, match="CUDA is not available"):
            resolve_dtype("bfloat16", "cuda")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSpecError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


@pytest.mark.slow  # de-quantises a 135M GGUF (~40 s)
def test_smollm2_gguf_loads_and_evaluates(smollm2_path):
    loaded = load_model(smollm2_path)
    assert (loaded.arch.n_heads, loaded.arch.n_kv_heads, loaded.arch.head_dim) == (9, 3, 64)
    task = EntityTrackingTask(loaded.tokenizer, TaskConfig(n_boxes=7), seed=0)
    res = evaluate_accuracy(loaded, task.sample(4), batch_size=4)
    assert res.n == 4


def test_cli_data_and_eval(saved_models, tmp_path, capsys):
    from circuitdiff.cli import main

    base_dir, _ = saved_models
    assert main(["data", "--model", str(base_dir), "--out", str(tmp_path / "d"), "-n", "5"]) == 0
    assert {p.name for p in (tmp_path / "d").iterdir()} >= {"clean.jsonl", "corrupt.jsonl",
                                                            "mean_ablation.jsonl"}
    assert main(["eval", "--model", str(base_dir), "--data", str(tmp_path / "d" / "clean.jsonl"),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n"] == 5 and out["n_boxes"] == 7
    assert main(["eval", "--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_gemma3_architecture_in_process(tokenizer, prompts):
    """Gemma-3 (q/k norms, sliding windows, head_dim from config) is supported structurally."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                           head_dim=8, sliding_window=16, max_position_embeddings=128)
    m = Gemma3ForCausalLM(cfg).eval()
    loaded = LoadedModel(m, tokenizer, resolve(m), "tiny-gemma3")
    assert (loaded.arch.n_heads, loaded.arch.n_kv_heads, loaded.arch.head_dim) == (4, 1, 8)
    batch = encode(prompts[:3], tokenizer)
    clean = last_logits(loaded, batch)
    r = Read([0, 1])
    last_logits(loaded, batch, [r])
    same = last_logits(loaded, batch, [Write(l, r.out[l]) for l in (0, 1)])
    assert torch.allclose(same, clean, atol=1e-5)
    changed = last_logits(loaded, batch, [Write(1, torch.zeros_like(r.out[1]))])
    assert not torch.allclose(changed, clean, atol=1e-4)


def test_core_owns_the_organisms_path_and_never_imports_organisms():
    """Loading an organism needs only core: the weights' folder is core's (organisms trains
    them and imports the path from core, never the reverse)."""
    from pathlib import Path

    import circuitdiff.core as core
    from circuitdiff.core.specs import ORGANISMS_DIR, organism_path
    from test_layout import _imported_parts

    assert organism_path("base") == ORGANISMS_DIR / "base"
    assert ORGANISMS_DIR.parts[-2:] == ("data", "organisms")
    importers = [p.name for p in Path(core.__file__).parent.rglob("*.py")
                 if "organisms" in _imported_parts(p)]
    assert not importers, importers
