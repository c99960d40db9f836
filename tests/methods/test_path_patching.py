"""Path patching: the fast path equals the naive oracle, the chain, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from circuitdiff.core.arch import resolve
from circuitdiff.core.circuit import Circuit
from circuitdiff.methods import discovery
from circuitdiff.methods.discovery import PAPER_CHAIN, DiscoveryConfig, parse_sizes
from circuitdiff.report.figures import discovery_heatmaps
from circuitdiff.core.model import LoadedModel
from circuitdiff.methods.path_patching import (FastOptions, PatchRequest, PathPatchingError,
                                               Scores, attribution_scores, compare_scores,
                                               path_patching_scores, top_heads)
from circuitdiff.core.task import DEFAULT_LABELS, EntityTrackingTask, TaskConfig, TaskError

from conftest import add_lora, tiny_llama

torch.set_num_threads(1)

# (position, receivers, receiver kind) for each step of the chain on the 3-layer tiny model;
# receivers span two layers and, for k/v, two query heads of one kv head
STEPS = {
    "value_fetcher": ("last", [], "q"),
    "position_transmitter": ("last", [(2, 0), (2, 3), (1, 1)], "q"),
    "position_detector": ("query_label", [(2, 1), (2, 0), (1, 2)], "v"),
    "structure_reader": ("prev_query_label", [(1, 0), (2, 3)], "v"),
}
# the automatic chain's edges at non-`last` roles, several covering many tokens per prompt:
# k/v computed at every box's label (the lookback's key and value), q at every object, and an
# offset role
AUTO_EDGES = {
    "k_at_labels": ("labels", [(2, 1), (1, 2)], "k"),
    "v_at_labels": ("labels", [(2, 0), (1, 3)], "v"),
    "q_at_labels": ("labels", [(2, 2), (1, 0)], "q"),
    "v_at_offset": ("prev_query_label+1", [(2, 3), (1, 1)], "v"),
    "k_at_multi_offset": ("objects+1", [(2, 3), (1, 1)], "k"),
    "v_at_separators": ("separators", [(2, 2)], "v"),
}
STEPS.update(AUTO_EDGES)


def pp(loaded, clean, cf, position="last", receivers=(), kind="q", senders=None, *, cache=None,
       **options) -> torch.Tensor:
    """Mean scores of ``path_patching_scores`` for one request (options as keywords)."""
    out = path_patching_scores(loaded, clean, cf, PatchRequest(position, receivers, kind, senders),
                               FastOptions(**options), cache=cache)
    assert isinstance(out, Scores) and out.se.shape == out.mean.shape
    return out.mean


def attribution(loaded, clean, cf, position="last", receivers=(), kind="q", **kw):
    return attribution_scores(loaded, clean, cf, PatchRequest(position, receivers, kind), **kw)


def _sharpen(loaded: LoadedModel, factor: float = 4.0) -> LoadedModel:
    """Scale the random weights up so that heads have sizeable (non-linear) effects."""
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "lora" not in name:
                p.mul_(factor)
    return loaded


def _prompts(tok, n=6, boxes=3, seed=0):
    task = EntityTrackingTask(tok, TaskConfig(n_boxes=boxes), seed=seed)
    clean = task.sample(n)
    return clean, task.corrupt(clean)


def _check_equal(loaded, clean, cf, step, **kw):
    pos, recv, kind = STEPS[step]
    naive = pp(loaded, clean, cf, pos, recv, kind, impl="naive",
                                 batch_size=4, **kw)
    fast = pp(loaded, clean, cf, pos, recv, kind, impl="fast", batch_size=4,
                                **kw)
    assert naive.shape == (3, 4)
    assert naive.abs().max() > 1e-3, "oracle gives ~0 everywhere: the comparison proves nothing"
    assert (fast - naive).abs().max() <= 1e-4
    return naive, fast


@pytest.mark.parametrize("step", list(STEPS))
def test_fast_equals_naive(tiny, tokenizer, step):
    loaded = _sharpen(tiny)
    clean, cf = _prompts(tokenizer)
    naive, fast = _check_equal(loaded, clean, cf, step)
    pos, recv, kind = STEPS[step]
    if recv:  # senders at or after the last receiver layer cannot reach it
        assert bool((fast[max(l for l, _ in recv):] == 0).all())


@pytest.mark.parametrize("step", ["position_transmitter", "structure_reader"])
def test_fast_equals_naive_sdpa(tiny, tokenizer, step):
    """The cached suffix forward of pass 2 also matches under the SDPA attention kernel."""
    loaded = _sharpen(tiny)
    loaded.model.config._attn_implementation = "sdpa"
    clean, cf = _prompts(tokenizer, n=7, seed=5)
    _check_equal(loaded, clean, cf, step)


@pytest.mark.parametrize("step", ["value_fetcher", "position_detector", "k_at_labels",
                                  "v_at_labels"])
def test_fast_equals_naive_under_lora(tiny_lora, tokenizer, step):
    loaded = _sharpen(tiny_lora)
    clean, cf = _prompts(tokenizer, seed=3)
    _, fast = _check_equal(loaded, clean, cf, step)
    with loaded.adapter_disabled():
        base = pp(loaded, clean, cf, *STEPS[step], batch_size=4)
    assert (base - fast).abs().max() > 1e-4  # the adapter's o_proj/q/k/v deltas are used


def test_small_chunks_and_mixed_senders(tiny, tokenizer):
    """Chunking over senders (pass 1 and the cached pass 2) does not change scores."""
    loaded = _sharpen(tiny)
    clean, cf = _prompts(tokenizer, n=5)
    pos, recv, kind = STEPS["structure_reader"]
    senders = [(0, 3), (1, 1), (0, 0)]
    one = pp(loaded, clean, cf, pos, recv, kind, senders=senders, max_rows=1)
    ref = pp(loaded, clean, cf, pos, recv, kind, impl="naive")
    for l, h in senders:
        assert abs(float(one[l, h] - ref[l, h])) <= 1e-4
    unscored = torch.ones(3, 4, dtype=torch.bool)
    for s in senders:
        unscored[s] = False
    assert bool((one[unscored] == 0).all())


def test_identical_inputs_score_zero(tiny, tokenizer):
    loaded = _sharpen(tiny)
    clean, _ = _prompts(tokenizer)
    for step in ("value_fetcher", "position_detector"):
        pos, recv, kind = STEPS[step]
        for impl in ("fast", "naive"):
            s = pp(loaded, clean, clean, pos, recv, kind, impl=impl)
            assert s.abs().max() <= 1e-5, (step, impl)


# -- a hand-built model whose one head copies the answer ----------------------------------------
COPY_HEAD = (1, 2)
TEMPLATE = "Box {label} contains the {object}"


def copy_head_model(tokenizer):
    """2-layer Llama set by hand. Layer-0 heads 0/1 copy the label 3/2 tokens back (a RoPE
    phase peak) into two blocks of the residual; at *last* the layer-1 head 2 matches the query
    label against each object's preceding label (low RoPE frequencies: content only), attends to
    the correct object and writes that object's unembedding direction. Everything else is 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    V = len(tokenizer)
    cfg = LlamaConfig(vocab_size=V, hidden_size=128, intermediate_size=8, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=64,
                      max_position_embeddings=256, rope_theta=10000.0, pad_token_id=0,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    LAB, OBJ, PREV, QRY = slice(1, 27), slice(27, 60), slice(60, 86), slice(86, 112)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.zero_()
        E = torch.zeros(V, 128)
        E[:, 0] = 4.0  # constant direction (same rms for every token)
        labels = {tokenizer.convert_tokens_to_ids(" " + lab): j
                  for j, lab in enumerate(DEFAULT_LABELS)}
        for t in range(V):
            if t in labels:
                E[t, 1 + labels[t]] = 4.0
            else:
                v = torch.randn(33, generator=g)
                E[t, OBJ] = 4.0 * v / v.norm()
        model.model.embed_tokens.weight.copy_(E)
        U = torch.zeros(V, 128)
        U[:, OBJ] = 3.0 * E[:, OBJ]
        model.lm_head.weight.copy_(U)
        theta = 10000.0 ** (-torch.arange(32).float() * 2 / 64)
        a0 = model.model.layers[0].self_attn
        for head, offset, dst in ((0, 3, PREV), (1, 2, QRY)):
            rows = slice(head * 64, head * 64 + 64)
            q, k = torch.zeros(64), torch.zeros(64)
            q[:16] = torch.cos(offset * theta[:16])
            q[32:48] = -torch.sin(offset * theta[:16])
            k[:16] = 1.0
            a0.q_proj.weight[rows, 0] = q * 5.0  # normalised const dim is 8
            a0.k_proj.weight[rows, 0] = k / 8.0
            a0.v_proj.weight[rows.start:rows.start + 26, LAB] = torch.eye(26) / 8.0
            a0.o_proj.weight[dst, rows.start:rows.start + 26] = torch.eye(26) * 4.0
        a1 = model.model.layers[1].self_attn
        r0 = COPY_HEAD[1] * 64
        content = list(range(19, 32)) + list(range(51, 64))  # pairs that barely rotate
        for j, d in enumerate(content):
            a1.q_proj.weight[r0 + d, QRY.start + j] = 6.0
            a1.k_proj.weight[r0 + d, PREV.start + j] = 6.0
        a1.v_proj.weight[r0:r0 + 33, OBJ] = torch.eye(33)
        a1.o_proj.weight[OBJ, r0:r0 + 33] = torch.eye(33) * 20.0
    return LoadedModel(model, tokenizer, resolve(model), "copy-head")


def test_copy_head_ranks_first(tokenizer):
    from circuitdiff.methods.accuracy import evaluate_accuracy
    from circuitdiff.core.task import encode

    loaded = copy_head_model(tokenizer)
    task = EntityTrackingTask(tokenizer, TaskConfig(n_boxes=7, segment_template=TEMPLATE), seed=1)
    clean = task.sample(12)
    cf = task.corrupt(clean)
    assert evaluate_accuracy(loaded, clean).accuracy == 1.0  # the model really does the task
    b = encode(clean, tokenizer)
    att = loaded.model(**b.model_inputs(), output_attentions=True).attentions[1]
    on_obj = att[torch.arange(12), COPY_HEAD[1], -1, b.positions["correct_object"]]
    assert bool((on_obj > 0.9).all())
    for impl in ("fast", "naive"):
        s = pp(loaded, clean, cf, "last", impl=impl)
        assert top_heads(s, 1) == [COPY_HEAD]
        assert float(s[COPY_HEAD]) < -0.5
        others = s.clone()
        others[COPY_HEAD] = 0
        assert others.abs().max() < 1e-3
    att_scores = attribution(loaded, clean, cf, "last")
    assert top_heads(att_scores, 1) == [COPY_HEAD]


# -- attribution and comparison --------------------------------------------------------------
def test_compare_scores_known_values():
    exact = torch.tensor([[-3.0, -1.0], [0.5, 2.0]])
    assert compare_scores(exact * 2, exact, 2).spearman == pytest.approx(1.0)
    assert compare_scores(-exact, exact, 1).spearman == pytest.approx(-1.0)
    c = compare_scores(torch.tensor([[-1.0, -3.0], [2.0, 0.5]]), exact, 2)
    assert c.topk_recall == 1.0 and c.spearman == pytest.approx(0.6)
    c = compare_scores(torch.tensor([[-1.0, 5.0], [-3.0, 0.5]]), exact, 2)
    assert c.topk_recall == 0.5
    nan = exact.clone()
    nan[1, 1] = float("nan")
    assert compare_scores(exact, nan, 1).spearman == pytest.approx(1.0)


@pytest.mark.parametrize("step", ["value_fetcher", "position_detector"])
def test_attribution_tracks_exact(tiny, tokenizer, step):
    """Unsharpened random model: effects are small, so the linear estimate is close."""
    clean, cf = _prompts(tokenizer, n=4)
    pos, recv, kind = STEPS[step]
    exact = pp(tiny, clean, cf, pos, recv, kind)
    est = attribution(tiny, clean, cf, pos, recv, kind, batch_size=3)
    if recv:
        assert bool((est[max(l for l, _ in recv):] == 0).all())
    live = exact != 0
    assert compare_scores(est[live].view(1, -1), exact[live].view(1, -1), 3).spearman > 0.8
    assert (est - exact).abs().max() < 0.3 * exact.abs().max()


# -- the chain --------------------------------------------------------------------------------
def _deep_tiny(tokenizer, seed=3):
    m = tiny_llama(len(tokenizer), seed=seed, layers=6, heads=4, kv_heads=2)
    return _sharpen(LoadedModel(m, tokenizer, resolve(m), "tiny-6"), 3.0)


@pytest.mark.parametrize("method", ["exact", "hybrid", "attribution"])
def test_discover_chain_saves_and_resumes(tokenizer, tmp_path, monkeypatch, method):
    loaded = _deep_tiny(tokenizer)
    clean, cf = _prompts(tokenizer, n=4, boxes=3)
    out = tmp_path / "run"
    cfg = DiscoveryConfig(sizes=(3, 2, 2, 1), method=method, compare_exact=True, chain="paper")
    res = discovery.run(loaded, (clean, cf), cfg, store=out)
    discovery_heatmaps(res, out, loaded.name)
    c = Circuit.load(out / "circuit.json")
    assert list(c.groups) == [g for g, _, _ in PAPER_CHAIN]
    assert [len(g.heads) for g in c.groups.values()] == [3, 2, 2, 1]
    assert [g.position for g in c.groups.values()] == [p for _, p, _ in PAPER_CHAIN]
    assert c.settings["sizes"] == [3, 2, 2, 1] and c.settings["scoring"] == method
    for g in c.groups:
        assert (out / f"heatmap_{g}.png").stat().st_size > 0
        assert (out / f"scores_{g}.safetensors").exists() or method == "attribution"
    # each step's receivers come from the previous group: PT heads lie below the last VF layer
    vf_end = max(l for l, _ in c.groups["value_fetcher"].heads)
    assert all(l < vf_end for l, _ in c.groups["position_transmitter"].heads)
    if method == "exact":  # exact chain = each step re-scored independently
        s = pp(loaded, clean, cf, "last", c.groups["value_fetcher"].heads, "q")
        assert torch.allclose(s, res.scores["position_transmitter"], atol=1e-6)
    assert set(res.comparisons) == set(c.groups)
    assert all(-1 <= v.spearman <= 1 and 0 <= v.topk_recall <= 1
               for v in res.comparisons.values())

    # resume: nothing is recomputed
    import circuitdiff.methods.discovery.steps as steps

    def boom(*a, **k):
        raise AssertionError("recomputed a cached step")
    monkeypatch.setattr(steps, "path_patching_scores", boom)
    monkeypatch.setattr(steps, "attribution_scores", boom)
    again = discovery.run(loaded, (clean, cf), cfg, store=out)
    assert again.circuit.groups == res.circuit.groups


def test_chain_stops_when_a_group_is_all_in_layer_0(tokenizer, tmp_path):
    clean, cf = _prompts(tokenizer, n=4, boxes=3)
    with pytest.raises(PathPatchingError, match="position_detector head found is in layer 0"):
        discovery.run(_deep_tiny(tokenizer, seed=0), (clean, cf),
                      DiscoveryConfig(sizes=(3, 2, 2, 1), chain="paper"), store=tmp_path)
    res = discovery.run(_deep_tiny(tokenizer, seed=0), (clean, cf),
                        DiscoveryConfig(sizes=(3, 2, 2, 1), truncate=True, chain="paper"),
                        store=tmp_path / "t")
    assert res.circuit.settings["truncated_at"] == "structure_reader"
    assert res.circuit.groups["structure_reader"].heads == []
    assert all(l == 0 for l, _ in res.circuit.groups["position_detector"].heads)
    assert len(res.circuit.groups["value_fetcher"].heads) == 3


def test_cli_discover(tokenizer, tmp_path, capsys):
    from circuitdiff.cli import main

    loaded = _deep_tiny(tokenizer)
    folder = tmp_path / "model"
    loaded.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "run"
    rc = main(["discover", "--model", str(folder), "--out", str(out), "-n", "4", "--n-boxes",
               "3", "--sizes", "3,2,2,1", "--method", "hybrid", "--compare-exact", "--chain",
               "paper"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "value_fetcher @ last" in text and "structure_reader @ prev_query_label" in text
    assert "Spearman" in text
    assert Circuit.load(out / "circuit.json").settings["n_prompts"] == 4
    rc = main(["discover", "--model", str(folder), "--out", str(out), "--sizes", "3,0,2,1",
               "--chain", "paper"])
    assert rc == 2
    assert "at least one head" in capsys.readouterr().err


# -- bad input --------------------------------------------------------------------------------
def test_bad_input(tiny, tokenizer):
    clean, cf = _prompts(tokenizer, n=3)
    with pytest.raises(PathPatchingError, match="earlier layer"):
        pp(tiny, clean, cf, "last", [(1, 0)], "q", senders=[(1, 2), (2, 0)])
    with pytest.raises(PathPatchingError, match="unknown role 'query'.*defines: last, "
                                                "query_label.*labels, objects, separators"):
        pp(tiny, clean, cf, "query", [(2, 0)], "v")
    with pytest.raises(PathPatchingError, match="leaves the prompt"):
        pp(tiny, clean, cf, "last+1", [(2, 0)], "v")
    with pytest.raises(PathPatchingError, match="logits receivers need position"):
        pp(tiny, clean, cf, "query_label")
    with pytest.raises(PathPatchingError, match="receiver_kind"):
        pp(tiny, clean, cf, "last", [(2, 0)], "o")
    with pytest.raises(PathPatchingError, match="does not exist"):
        pp(tiny, clean, cf, "last", [(3, 0)], "q")
    with pytest.raises(TaskError, match="pair one to one"):
        pp(tiny, clean, cf[:-1], "last")
    with pytest.raises(TaskError, match="pair one to one"):
        attribution(tiny, clean, cf[:-1], "last")
    with pytest.raises(PathPatchingError, match="query names a box"):
        pp(tiny, cf, clean, "last")
    with pytest.raises(PathPatchingError, match="at least one head"):
        parse_sizes("20,5,0,5")
    with pytest.raises(PathPatchingError, match="at least one head"):
        top_heads(torch.zeros(3, 4), 0)
    with pytest.raises(PathPatchingError, match="4 sizes"):
        parse_sizes("20,5")


def test_empty_group_and_multitoken_answers(tiny, tokenizer, tmp_path):
    from circuitdiff.core.model import LoadedModel as LM

    with pytest.raises(PathPatchingError, match="at least one head"):
        discovery.run(tiny, None, DiscoveryConfig(n_prompts=2, n_boxes=3, sizes=(2, 0, 1, 1),
                                                  chain="paper"), store=tmp_path / "a")
    # a tokenizer that splits every object into characters: answers are multi-token
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = {c: i for i, c in enumerate(["<pad>", "<unk>"] + [chr(i) for i in range(32, 127)])}
    tk = Tokenizer(models.WordLevel(chars, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    char_tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>")
    loaded = LM(tiny.model, char_tok, tiny.arch, "char")
    with pytest.raises(TaskError, match="single tokens"):
        discovery.run(loaded, None, DiscoveryConfig(n_prompts=2, n_boxes=3, sizes=(1, 1, 1, 1),
                                                    chain="paper"), store=tmp_path / "b")


def test_unsupported_layer_falls_back_to_naive(tiny, tokenizer):
    """A decoder layer the replay does not reproduce gives a warning and the naive scores."""
    loaded = _sharpen(tiny)
    clean, cf = _prompts(tokenizer, n=3)
    naive = pp(loaded, clean, cf, "last", impl="naive")
    layer = loaded.arch.layers[1]
    orig = layer.forward

    def shifted(*a, **k):  # an extra term the plain pre-norm replay does not know about
        return orig(*a, **k) * 1.5
    layer.forward = shifted
    try:
        naive = pp(loaded, clean, cf, "last", impl="naive")
        with pytest.warns(UserWarning, match="naive"):
            fast = pp(loaded, clean, cf, "last")
    finally:
        layer.forward = orig
    assert torch.equal(fast, naive)
    assert math.isfinite(float(fast.sum()))


# -- the fast path's pass 2: shared prefix, per-sender start, cache reuse -----------------------
import circuitdiff.methods.path_patching.exact as exact_mod  # noqa: E402
from circuitdiff.methods.path_patching import CaptureCache  # noqa: E402

KV_STEPS = ["structure_reader", "k_at_labels", "v_at_labels", "position_detector",
            "position_transmitter"]


def _mixed_prompts(tok, n=6, seed=0):
    """3-box prompts of two templates in one batch: different lengths, so the batch is
    left-padded and the clean prefix of pass 2 holds padding for some samples."""
    a, xa = _prompts(tok, n=n // 2, boxes=3, seed=seed)
    task = EntityTrackingTask(tok, TaskConfig(n_boxes=3, segment_template=TEMPLATE),
                              seed=seed + 1)
    b = task.sample(n - n // 2)
    xb = task.corrupt(b)
    return [c for pair in zip(b, a) for c in pair], [x for pair in zip(xb, xa) for x in pair]


def _strict_equal(loaded, clean, cf, pos, recv, kind, senders=None, tol=1e-5, **options):
    naive = pp(loaded, clean, cf, pos, recv, kind, senders=senders, impl="naive", batch_size=8)
    fast = pp(loaded, clean, cf, pos, recv, kind, senders=senders, batch_size=8, **options)
    assert naive.abs().max() > 1e-3, "oracle gives ~0 everywhere: the comparison proves nothing"
    assert (fast - naive).abs().max() <= tol, float((fast - naive).abs().max())
    return fast


@pytest.mark.parametrize("mode,fused", [("shared", True), ("shared", False), ("tiled", True)])
@pytest.mark.parametrize("step", KV_STEPS)
def test_pass2_attention_modes_equal_naive(tiny, tokenizer, mode, fused, step):
    """Both ways of attending to the prefix shared by the stacked senders (merged by
    log-sum-exp, fused kernel or plain matmuls; or one call over a per-layer tile with the GQA
    query heads folded) give the oracle's scores, on a GQA model (4 q / 2 kv heads) and on a
    left-padded batch whose prefixes hold padding."""
    loaded = _sharpen(tiny)
    assert loaded.arch.n_kv_heads < loaded.arch.n_heads
    clean, cf = _mixed_prompts(tokenizer)
    from circuitdiff.core.task import encode
    assert bool((encode(clean, tokenizer).attention_mask == 0).any())  # really padded
    _strict_equal(loaded, clean, cf, *STEPS[step], attention=mode, fused=fused)


@pytest.mark.parametrize("mode", ["shared", "tiled"])
@pytest.mark.parametrize("step", ["k_at_labels", "v_at_labels", "structure_reader"])
def test_pass2_under_lora_unmerged(tiny_lora, tokenizer, mode, step):
    """With a peft LoRA adapter attached un-merged, the suffix forward runs the adapter's
    q/k/v/o deltas (its own modules) and still equals the oracle."""
    loaded = _sharpen(tiny_lora)
    clean, cf = _mixed_prompts(tokenizer, seed=3)
    fast = _strict_equal(loaded, clean, cf, *STEPS[step], attention=mode)
    with loaded.adapter_disabled():
        base = pp(loaded, clean, cf, *STEPS[step], batch_size=8)
    assert (base - fast).abs().max() > 1e-4


def test_pass2_starts_at_each_senders_first_receiver_layer(tokenizer, monkeypatch):
    """Pass 2 runs a sender only from its first reachable receiver layer (receivers at or below
    its own layer keep their clean input), and the scores still equal the oracle's."""
    loaded = _deep_tiny(tokenizer)
    clean, cf = _prompts(tokenizer, n=5, boxes=3, seed=2)
    recv = [(1, 0), (3, 2), (3, 1), (5, 3)]  # receivers in layers 1, 3, 5 (v at an early role)
    starts: dict[int, set] = {}
    orig = exact_mod._pass2

    def spy(model, rep, inputs, pc, start, p, req, recv_vals, *a, **k):
        starts.setdefault(start, set()).update(recv_vals)
        return orig(model, rep, inputs, pc, start, p, req, recv_vals, *a, **k)
    monkeypatch.setattr(exact_mod, "_pass2", spy)
    _strict_equal(loaded, clean, cf, "labels", recv, "v")
    # senders in layer 0 start at 1, in 1-2 at 3, in 3-4 at 5; each patches only layers >= start
    assert starts == {1: {1, 3, 5}, 3: {3, 5}, 5: {5}}


def test_capture_cache_reuse_is_exact(tiny, tokenizer):
    """Reusing the clean/counterfactual captures and prefix states across calls (as discovery
    does) gives identical scores; a model changed in place never hits a stale entry."""
    loaded = _sharpen(tiny)
    clean, cf = _prompts(tokenizer, n=5, seed=4)
    steps = ["k_at_labels", "v_at_labels", "value_fetcher", "position_transmitter"]
    ref = {s: pp(loaded, clean, cf, *STEPS[s]) for s in steps}
    cache = CaptureCache()
    got = {s: pp(loaded, clean, cf, *STEPS[s], cache=cache) for s in steps}
    again = pp(loaded, clean, cf, *STEPS["k_at_labels"], cache=cache)
    assert cache.hits >= 3  # labels twice more, last once more
    for s in steps:
        assert torch.equal(got[s], ref[s]), s
    assert torch.equal(again, ref["k_at_labels"])
    own = CaptureCache()
    pp(loaded, clean, cf, *STEPS["v_at_labels"], cache=own)
    _sharpen(loaded, 1.5)  # in place: bumps the parameters' versions
    fresh = pp(loaded, clean, cf, *STEPS["v_at_labels"])
    assert torch.equal(pp(loaded, clean, cf, *STEPS["v_at_labels"],
                                            cache=own), fresh)
    assert not torch.equal(fresh, ref["v_at_labels"])


def test_discovery_reuses_captures(tokenizer, tmp_path, monkeypatch):
    """discovery.run() shares one capture cache over its steps (same circuit as without)."""
    loaded = _deep_tiny(tokenizer)
    clean, cf = _prompts(tokenizer, n=4, boxes=3)
    cfg = DiscoveryConfig(sizes=(3, 2, 2, 1), chain="paper")
    seen = []
    orig = exact_mod._fast_batch

    def spy(*a, **k):
        seen.append(a[7] if len(a) > 7 else k.get("cache"))
        return orig(*a, **k)
    monkeypatch.setattr(exact_mod, "_fast_batch", spy)
    res = discovery.run(loaded, (clean, cf), cfg, store=tmp_path / "a")
    assert seen and all(c is seen[0] for c in seen) and seen[0] is not None
    assert seen[0].hits >= 1  # value fetchers and position transmitters share 'last'
    seen.clear()
    monkeypatch.setattr(discovery, "CaptureCache", lambda: None)  # no cache: same circuit
    plain = discovery.run(loaded, (clean, cf), cfg, store=tmp_path / "b")
    assert seen and all(c is None for c in seen)
    assert plain.circuit.groups == res.circuit.groups


@pytest.mark.slow  # a bench subprocess (~10 s)
def test_bench_runs_on_a_tiny_shape():
    """The bench's code path (the one ``--device cuda --shape 7b`` runs) on a tiny CPU shape:
    every step's table row, fast = naive."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(root / "bench" / "path_patching.py"), "--shape",
                          "tiny", "-n", "4", "--naive-senders", "3"], capture_output=True,
                         text=True, check=True, cwd=root,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}).stdout
    rows = [l for l in out.splitlines() if re.match(r"\| (vf|pt|pd|sr|kv) \|", l)]
    assert len(rows) == 5, out
    assert all(float(r.rstrip(" |").split("|")[-1].split()[0]) <= 1e-5 for r in rows), out
    assert "FLOP floor" in out


def test_options_and_configs_validate_and_key(tiny, tokenizer, tmp_path):
    """Options and configs say which field is wrong; execution fields stay out of the cache
    key; discovery runs without a store."""
    for bad, match in ((dict(impl="quick"), "impl"), (dict(batch_size=0), "batch_size"),
                       (dict(attention="fused"), "attention"), (dict(max_rows=0), "max_rows")):
        with pytest.raises(PathPatchingError, match=match):
            FastOptions(**bad)
    with pytest.raises(ValueError, match="z_threshold must be a finite number"):
        DiscoveryConfig(z_threshold=float("nan"))
    a = DiscoveryConfig(chain="paper", batch_size=3, impl="naive", max_rows=7)
    assert a.cache_key() == DiscoveryConfig(chain="paper").cache_key()
    assert a.cache_key() != DiscoveryConfig(chain="paper", seed=1).cache_key()
    assert "batch_size" not in a.cache_key() and a.cache_key()["sizes"] == [20, 5, 10, 5]
    loaded = _sharpen(tiny)
    clean, cf = _prompts(tokenizer, n=3)
    res = discovery.run(loaded, (clean, cf), DiscoveryConfig(sizes=(2, 1, 1, 1), chain="paper",
                                                             truncate=True))
    assert len(res.circuit.groups["value_fetcher"].heads) == 2
    with pytest.raises(PathPatchingError, match="without their counterfactuals"):
        discovery.run(loaded, (clean, None), DiscoveryConfig(chain="paper"), store=tmp_path)
    s = path_patching_scores(loaded, clean, cf, PatchRequest("last", senders=[(0, 1), (2, 3)]))
    assert float(s.se[0, 1]) > 0 and float(s.se[1, 0]) == 0 and float(s.mean[1, 0]) == 0


def test_hybrid_unscored_heads_are_nan_in_both_chains(tokenizer, tmp_path):
    """The one hybrid scorer: an eligible head outside the candidates is NaN (not scored), a
    head that cannot reach the receivers is 0 — in the paper chain and the automatic one."""
    from circuitdiff.methods.discovery.steps import Context, Step, score_step

    loaded = _deep_tiny(tokenizer)
    clean, cf = _prompts(tokenizer, n=4, boxes=3)
    from circuitdiff.core.runs import RunFolder

    cfg = DiscoveryConfig(method="hybrid", hybrid_k=3, chain="paper")
    ctx = Context.open(loaded, RunFolder(tmp_path), cfg, (clean, cf), False, None)
    eligible = torch.zeros(6, 4, dtype=torch.bool)
    eligible[:3] = True
    for paper in (True, False):
        step = Step(0, f"pt{paper}", "last", "q", [(3, 1), (3, 2)], 1, eligible,
                    dict(ctx.base), desc="t", paper=paper)
        got = score_step(ctx, step)
        assert int(torch.isfinite(got.scores[:3]).sum()) == 3  # the 3 candidates
        assert bool((got.scores[3:] == 0).all())
        assert bool(torch.isnan(got.scores[:3]).sum() == 9)
        assert bool((got.se[~torch.isfinite(got.scores)] == 0).all())
