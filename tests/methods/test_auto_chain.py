"""Position-aware discovery on the shipped organism: the scan, the automatic chain (its q/k/v
edge scores at non-`last` roles equal the naive oracle's), sizing to a target, bad input, and
the discovered multi-position circuit evaluated from its JSON."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from circuitdiff.core.circuit import Circuit
from circuitdiff.core.model import load_model
from circuitdiff.core.task import EntityTrackingTask, TaskConfig, load_jsonl
from circuitdiff.methods import discovery
from circuitdiff.methods.discovery import auto, steps
from circuitdiff.methods.ablation import circuit_accuracy, compute_means
from circuitdiff.methods.discovery import (DiscoveryConfig, NoCircuitError, TargetUnreachable,
                                           significant_senders)
from circuitdiff.methods.faithfulness import evaluate_faithfulness, protocol_warning
from circuitdiff.methods.path_patching import FastOptions, PatchRequest, path_patching_scores
from circuitdiff.methods.scan import position_scan

torch.set_num_threads(1)

#: small but real: the organism's lookback is found with these
SMALL = dict(n_prompts=48, n_validate=80, n_mean=60, seed=5)


@pytest.fixture(scope="module")
def base():
    return load_model("organism:base")


@pytest.fixture(scope="module")
def fast_run(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("auto_fast")
    return out, discovery.run(base, None, DiscoveryConfig(**SMALL), store=out)


def test_auto_chain_edge_scores_equal_the_naive_oracle(base, fast_run):
    """Every edge the chain scored (q at last, k and v at multi-token context roles, GQA) has
    the scores the naive oracle gives for the same receivers, role and input kind."""
    out, fast = fast_run
    clean, _ = load_jsonl(out / "clean.jsonl")
    cf, _ = load_jsonl(out / "counterfactual.jsonl")
    kinds = {(e["kind"], e["role"]) for e in fast.edges_scored}
    assert ("q", "last") in kinds and ("v", "labels") in kinds and ("k", "labels") in kinds
    assert ("v", "separators") in kinds
    for e in fast.edges_scored:
        if e["kind"] == "logits":
            continue  # the logits edge is the paper chain's first step, tested elsewhere
        req = PatchRequest(e["role"], e["receivers"], e["kind"])
        # 6 prompts: the oracle runs one whole forward per (sender, prompt)
        naive = path_patching_scores(base, clean[:6], cf[:6], req,
                                     FastOptions(impl="naive", batch_size=6)).mean
        fast_6 = path_patching_scores(base, clean[:6], cf[:6], req,
                                      FastOptions(batch_size=6)).mean
        assert naive.abs().max() > 1e-3, e["edge"]
        assert (fast_6 - naive).abs().max() <= 1e-4, e["edge"]
    # and the chain's cached scores are that engine's scores on all its prompts
    e = next(e for e in fast.edges_scored if e["kind"] == "v")
    full = path_patching_scores(base, clean, cf,
                                PatchRequest(e["role"], e["receivers"], e["kind"])).mean
    assert torch.allclose(full, fast.scores[e["edge"]], atol=1e-6)


def test_auto_chain_finds_the_lookback(fast_run):
    out, res = fast_run
    c = res.circuit
    by_function = {g.function: g for g in c.groups.values()}
    reader = by_function["value reader @ last"]
    assert reader.position == "last"
    assert sum(l == 1 for l, _ in reader.heads) >= 6  # the layer-1 heads that read the value
    assert by_function["query-label mover @ last"].heads == [(0, 2)]
    assert by_function["object mover @ labels"].position == "labels"
    kinds = {(c.groups[e.sender].function if e.sender in c.groups else e.sender, e.kind)
             for e in c.edges}
    assert ("query-label mover @ last", "q") in kinds and ("object mover @ labels", "v") in kinds
    s = res.sizing
    assert s["faithfulness_paper"] >= 0.9 and s["unit_fraction"] <= 0.3
    curve = json.loads((out / "curve.json").read_text())
    grow = [c for c in curve["curve"] if c["step"] == "grow"]
    assert [c["units"] for c in grow[:2]] == [4, 8] and curve["target"] == 0.9
    assert (out / "scan.json").exists() and Circuit.load(out / "circuit.json").edges == c.edges


def test_discovered_json_evaluates_under_both_protocols(base, fast_run):
    out, _ = fast_run
    circuit = Circuit.load(out / "circuit.json")
    assert {"labels", "last"} <= set(circuit.positions())
    task = EntityTrackingTask(base.tokenizer, TaskConfig(), seed=77)  # held out from discovery
    prompts = task.sample(80)
    means = compute_means(base, task.sample(80, seed=78))
    row = evaluate_faithfulness(base, prompts, means, circuit, n_random=3)
    # small test settings (80 prompts to size, 80 to check): far above random, near the target
    assert row.faithfulness >= 0.7 and row.random_mean <= 0.1
    assert set(row.by_protocol) == {"paper", "keep-other-positions"}
    assert row.by_protocol["paper"]["circuit_accuracy"] == row.circuit_accuracy
    kept = circuit_accuracy(base, prompts, means, circuit, keep_other_positions=True).accuracy
    assert row.by_protocol["keep-other-positions"]["circuit_accuracy"] == kept


def test_resume_recomputes_nothing(base, fast_run, monkeypatch):
    out, res = fast_run
    def boom(*a, **k):
        raise AssertionError("recomputed a cached step")
    monkeypatch.setattr(steps, "path_patching_scores", boom)
    monkeypatch.setattr(auto, "scan_by_method", boom)
    monkeypatch.setattr(auto, "size_circuit", boom)
    again = discovery.run(base, None, DiscoveryConfig(**SMALL), store=out)
    assert again.circuit.to_dict() == res.circuit.to_dict()


def test_unreachable_target_stops_with_a_clear_message(base, fast_run, tmp_path):
    """With no context role traced (a scan threshold no ablation can reach), only heads at
    `last` are candidates: under the paper protocol the labels' copies are ablated, so the
    target cannot be reached — the run says so, with the numbers, and stops."""
    out, _ = fast_run
    for name in ("a", "b"):  # start from the cached scores and scan: only the sizing is redone
        shutil.copytree(out, tmp_path / name)
    blind = dict(SMALL, scan_min_drop=2.0)
    with pytest.raises(TargetUnreachable, match=r"target faithfulness 0.90 is unreachable: all "
                                                r"\d+ candidate heads .* reach 0\.\d\d, and keeping "
                                                r"every head at the circuit's roles \(last\) "
                                                r"reaches \d\.\d\d \(full model accuracy"):
        discovery.run(base, None, DiscoveryConfig(**blind), store=tmp_path / "a")
    kept = discovery.run(base, None, DiscoveryConfig(**blind, on_unreachable="keep-all"),
                         store=tmp_path / "b")
    assert "unreachable" in kept.sizing["message"] and kept.sizing["faithfulness_paper"] < 0.9
    grow = [c for c in kept.curve if c["step"] == "grow"]
    assert grow[-1]["units"] == kept.sizing["units"]  # every candidate was tried, then it stopped
    assert all(c["faithfulness"] < 0.9 for c in grow)
    assert set(kept.circuit.positions()) == {"last"}


def test_model_at_chance_has_no_circuit(tiny, tmp_path, capsys):
    with pytest.raises(NoCircuitError, match="no circuit to find"):
        discovery.run(tiny, None, DiscoveryConfig(n_prompts=4, n_validate=20, n_mean=20,
                                                  n_boxes=3), store=tmp_path / "d")


def test_cli_discover_reports_bad_target_and_at_chance(tokenizer, tiny, tmp_path, capsys):
    from circuitdiff.cli import main

    folder = tmp_path / "model"
    tiny.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert main(["discover", "--model", str(folder), "--out", str(tmp_path / "r"), "-n", "4",
                 "--n-boxes", "3", "--n-validate", "20", "--n-mean", "20"]) == 2
    assert "no circuit to find" in capsys.readouterr().err
    assert main(["discover", "--model", str(folder), "--out", str(tmp_path / "r"),
                 "--target", "1.5"]) == 2
    assert "target faithfulness must be in (0, 1]" in capsys.readouterr().err


def test_scan_cells_equal_direct_ablation(base, tmp_path):
    task = EntityTrackingTask(base.tokenizer, TaskConfig(), seed=11)
    prompts = task.sample(40)
    means = compute_means(base, task.sample(40, seed=12))
    res = position_scan(base, prompts, means, ["labels", "last", "prev_query_label+1"],
                        max_rows=50)  # several chunks
    L, H = base.arch.n_layers, base.arch.n_heads
    for layer, role in ((0, "labels"), (1, "last"), (0, "prev_query_label+1")):
        keep = torch.ones(L, H, dtype=torch.bool)
        keep[layer] = False
        direct = circuit_accuracy(base, prompts, means, {role: keep},
                                  keep_other_positions=True).accuracy
        assert res.accuracy[layer][res.roles.index(role)] == direct
    assert res.accuracy[1][res.roles.index("last")] < res.baseline - 0.2  # the reader's layer


def test_cli_scan(tmp_path, capsys):
    from circuitdiff.cli import main

    out = tmp_path / "scan"
    assert main(["scan", "--model", "organism:base", "--out", str(out), "-n", "24",
                 "--n-mean", "24"]) == 0
    text = capsys.readouterr().out
    assert "labels" in text and "separators" in text and "n=24" in text
    saved = json.loads((out / "scan.json").read_text())["result"]
    assert len(saved["accuracy"]) == 4 and "prefix" in saved["roles"]
    assert (out / "scan.png").stat().st_size > 0
    assert main(["scan", "--model", "organism:base", "--out", str(out), "--role", "lables"]) == 2
    assert "the task defines: last, query_label" in capsys.readouterr().err


def test_significance_and_protocol_warning():
    scores = torch.tensor([[-0.5, -0.02, 0.3], [0.0, 0.0, 0.0]])
    se = torch.tensor([[0.01, 0.01, 0.01], [0.0, 0.0, 0.0]])
    eligible = torch.tensor([[True, True, True], [False, False, False]])
    # -0.02 is 2 standard errors: not significant at z = 3, significant at z = 1.5 but then
    # below a tenth of the best score (-0.05)
    assert significant_senders(scores, se, eligible, 3.0, 0.01) == [(0, 0)]
    assert significant_senders(scores, se, eligible, 1.5, 0.01) == [(0, 0)]
    assert significant_senders(scores, se, eligible, 1.5, 0.01, best_fraction=0.01) == \
        [(0, 0), (0, 1)]
    assert significant_senders(scores, se, eligible, 3.0, 0.01, best_fraction=0.01) == [(0, 0)]
    assert significant_senders(-scores.abs() * 0, se, eligible, 3.0, 0.01) == []
    unscored = scores.clone()  # a hybrid's eligible head outside its candidates: NaN
    unscored[0, 2] = float("nan")
    assert significant_senders(unscored, se, eligible, 3.0, 0.01) == [(0, 0)]
    both = lambda a, b: {"paper": {"faithfulness": a},  # noqa: E731
                         "keep-other-positions": {"faithfulness": b}}
    assert protocol_warning(both(0.9, 0.8)) == ""
    assert "protocols disagree: faithfulness 0.02" in protocol_warning(both(0.02, 0.9))
