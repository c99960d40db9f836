"""The methods under torchrun (gloo, 2 CPU ranks): every rank's share, gathered, equals one
process's result — path patching (fast, naive, attribution), the scan, ablation variants, and
the CLI's discover / scan / evaluate / study; a killed rank is named and the rerun resumes; a
model split over devices by accelerate scores like the whole one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import add_lora, save_base_and_lora, tiny_llama

SRC = str(Path(__file__).resolve().parents[2] / "src")
TESTS = str(Path(__file__).resolve().parents[1])


def _env(**extra) -> dict:
    path = os.pathsep.join([SRC, TESTS, str(Path(__file__).parent),
                            os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "TQDM_DISABLE": "1",
            **extra}


def _torchrun(script: Path, *args, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=_env(**env))


def _cli(*argv, workers: int = 1, timeout: int = 600, **env) -> subprocess.CompletedProcess:
    extra = ["--workers", str(workers)] if workers > 1 else []
    return subprocess.run([sys.executable, "-m", "circuitdiff", *map(str, argv), *extra],
                          capture_output=True, text=True, timeout=timeout, env=_env(**env))


# -- the methods themselves, two ranks against one process -------------------------------------
METHODS = textwrap.dedent('''
    import sys, torch
    torch.set_num_threads(1)
    from circuitdiff.core import distributed as d
    d.init()
    from test_distributed_methods import compute_all
    out = compute_all()
    if d.is_main():
        torch.save(out, sys.argv[1])
''')


def _tiny_lora():
    from circuitdiff.core.arch import resolve
    from circuitdiff.core.model import LoadedModel
    from circuitdiff.core.toy import word_level_tokenizer

    tok = word_level_tokenizer()
    m = add_lora(tiny_llama(len(tok), layers=4))
    return LoadedModel(m, tok, resolve(m), "tiny-lora", adapter="random-lora")


def compute_all() -> dict[str, torch.Tensor]:
    """Every split computation on a tiny GQA + LoRA model (run on each rank, or in one process)."""
    from circuitdiff.core.task import EntityTrackingTask, TaskConfig
    from circuitdiff.methods.ablation import compute_means, variant_correct
    from circuitdiff.methods.path_patching import (FastOptions, PatchRequest, attribution_scores,
                                                   path_patching_scores)
    from circuitdiff.methods.scan import position_scan

    loaded = _tiny_lora()
    task = EntityTrackingTask(loaded.tokenizer, TaskConfig(n_boxes=3), seed=3)
    clean = task.sample(7)
    cf = task.corrupt(clean)
    out = {}
    requests = {"logits": PatchRequest("last"),
                "q": PatchRequest("last", [(3, 0), (2, 1)], "q"),
                "v_labels": PatchRequest("labels", [(3, 2), (2, 3)], "v")}
    for name, req in requests.items():
        # batch_size 4: two prompt batches, one per rank; 8: one batch, the senders are dealt
        for impl, bs in (("fast", 4), ("naive", 4), ("fast", 8)):
            s = path_patching_scores(loaded, clean, cf, req, FastOptions(impl=impl, batch_size=bs,
                                                                         max_rows=64))
            out[f"{name}_{impl}{bs}_mean"], out[f"{name}_{impl}{bs}_se"] = s.mean, s.se
        out[f"{name}_attribution"] = attribution_scores(loaded, clean, cf, req, batch_size=3)
    # the scan and ablation variants on the trained organism (a random model is at chance)
    from circuitdiff.core.model import load_model

    base = load_model("organism:base")
    task = EntityTrackingTask(base.tokenizer, TaskConfig(), seed=11)
    prompts = task.sample(12)
    means = compute_means(base, task.sample(12, seed=12))
    scan = position_scan(base, prompts, means, ["last", "labels", "query_label"], batch_size=8,
                         max_rows=20)
    out["scan"] = torch.tensor(scan.accuracy)
    L, H = base.arch.n_layers, base.arch.n_heads
    gen = torch.Generator().manual_seed(0)
    variants = [{"last": torch.rand(L, H, generator=gen) > 0.3} for _ in range(5)]
    out["variants"] = variant_correct(base, prompts, means, variants, keep_other_positions=True,
                                      batch_size=8, max_rows=16)
    assert 0 < out["variants"].float().mean() < 1
    return out


def test_methods_on_two_ranks_equal_one_process(tmp_path):
    script = tmp_path / "methods.py"
    script.write_text(METHODS)
    proc = _torchrun(script, tmp_path / "two.pt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = torch.load(tmp_path / "two.pt")
    torch.set_num_threads(1)
    one = compute_all()
    assert set(one) == set(two)
    for k in one:
        if one[k].dtype == torch.bool:
            assert torch.equal(one[k], two[k]), k
            continue
        assert one[k].abs().sum() > 0, k  # something was scored
        if "fast" in k:
            # which senders share a stacked forward differs between 1 and 2 ranks, the
            # per-sender math does not: measured max |diff| 0 (bit-identical) on CPU float32;
            # the bound leaves room for a BLAS whose rounding depends on the batch size
            assert torch.allclose(one[k], two[k], atol=1e-6, rtol=0), (
                k, float((one[k] - two[k]).abs().max()))
        else:  # one sender (naive), one batch (attribution), one cell at a time: exact
            assert torch.equal(one[k], two[k]), (k, float((one[k] - two[k]).abs().max()))


# -- the CLI under two ranks against one process ----------------------------------------------
def _saved(folder: Path) -> dict:
    """Every saved result of a run folder: JSON results and safetensors tensors by path."""
    from safetensors.torch import load_file

    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.suffix == ".safetensors":
            out[rel] = load_file(p)
        elif p.suffix == ".json" and p.name != "run.json":
            d = json.loads(p.read_text())
            out[rel] = d.get("result", d) if isinstance(d, dict) else d
    return out


def _same(a, b, path: str = "") -> None:
    """Equal structures; floats (and tensors) within 1e-6."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            _same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype, path
        if a.is_floating_point():
            assert torch.allclose(a, b, atol=1e-6, rtol=0, equal_nan=True), (
                path, float((a - b).abs().nan_to_num().max()))
        else:
            assert torch.equal(a, b), path
    elif isinstance(a, float) and isinstance(b, float):
        assert (a != a and b != b) or abs(a - b) <= 1e-6, (path, a, b)
    else:
        assert a == b, (path, a, b)


DISCOVER = ["discover", "--model", "organism:lora", "-n", "8", "--sizes", "2,2,2,1", "--chain",
            "paper", "--method", "hybrid", "--compare-exact", "--n-mean", "8", "--n-validate", "8",
            "--no-heatmaps", "--truncate"]


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


def _one_and_two(tmp_path: Path, name: str, *argv) -> tuple[dict, dict]:
    """The saved results of ``argv`` run as one process and as two ranks (``--workers 2``)."""
    for workers in (1, 2):
        _ok(_cli(*argv, "--out", tmp_path / f"{name}{workers}", workers=workers))
    one, two = _saved(tmp_path / f"{name}1"), _saved(tmp_path / f"{name}2")
    assert one, name
    _same(one, two, name)
    return one, two


# the organisms are tiny GQA models (8 query heads, 2 kv heads), organism:lora a LoRA adapter
@pytest.mark.slow  # CLI runs under 2 ranks and 1 process
def test_cli_discover_on_two_ranks_equals_one_process(tmp_path):
    one, _ = _one_and_two(tmp_path, "discover", *DISCOVER)
    assert any(k.startswith("exact_") for k in one) and "circuit.json" in one


@pytest.mark.slow  # CLI runs under 2 ranks and 1 process
def test_cli_scan_on_two_ranks_equals_one_process(tmp_path):
    one, _ = _one_and_two(tmp_path, "scan", "scan", "--model", "organism:lora", "-n", "16",
                          "--n-mean", "16")
    acc = torch.tensor(one["scan.json"]["accuracy"])
    assert acc.min() < acc.max()  # some cells matter, some do not


@pytest.mark.slow  # CLI runs under 2 ranks and 1 process
def test_cli_evaluate_on_two_ranks_equals_one_process(tmp_path):
    from circuitdiff.core.circuit import Circuit, CircuitGroup

    circuit = tmp_path / "circuit.json"
    Circuit({"vf": CircuitGroup([(l, h) for l in (1, 2, 3) for h in range(8)], "last"),
             "pd": CircuitGroup([(l, h) for l in (0, 1) for h in range(0, 8, 2)], "query_label")},
            4, 8, "organism").save(circuit)
    _one_and_two(tmp_path, "evaluate", "evaluate", "--circuit", circuit, "--model",
                 "organism:base", "--model", "organism:lora", "-n", "16", "--n-mean", "16",
                 "--random-draws", "2", "--keep-other-positions", "--completeness",
                 "--n-halves", "1", "--minimality")
    faith = json.loads((tmp_path / "evaluate1" / "faithfulness.json").read_text())
    assert any(r["circuit_accuracy"] > 0 for r in faith)  # not all at chance


#: makes rank 1 of a ``--workers`` run die (exit code 9) when it starts its second exact
#: path-patching call: by then rank 0 has saved the first step (rank 1 got past rank 0's
#: cache decision for the second step, which rank 0 makes after saving the first)
DIE = textwrap.dedent('''
    import os
    if os.environ.get("RANK") == "1" and os.environ.get("DIE_AT_CALL"):
        import circuitdiff.methods.path_patching as pkg
        import circuitdiff.methods.path_patching.exact as exact
        import circuitdiff.methods.discovery.steps as steps
        orig, calls = exact.path_patching_scores, []

        def dying(*a, **k):
            calls.append(1)
            if len(calls) >= int(os.environ["DIE_AT_CALL"]):
                os._exit(9)
            return orig(*a, **k)
        pkg.path_patching_scores = exact.path_patching_scores = dying
        steps.path_patching_scores = dying
''')


@pytest.mark.slow  # torchrun with a rank killed, then a rerun (~30 s)
def test_killed_rank_is_named_and_the_rerun_resumes(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(DIE)
    argv = ["discover", "--model", "organism:lora", "-n", "8", "--sizes", "2,2,2,1", "--chain",
            "paper", "--n-mean", "8", "--n-validate", "8", "--no-heatmaps", "--truncate"]
    out = tmp_path / "run"
    env = {"DIE_AT_CALL": "2", "PYTHONPATH": os.pathsep.join([str(site), SRC, TESTS])}
    proc = _cli(*argv, "--out", out, workers=2, **env)
    assert proc.returncode != 0
    assert "rank 1 of 2 failed (exit code 9)" in proc.stderr, proc.stderr[-3000:]
    first = out / "scores_value_fetcher.safetensors"
    assert first.exists() and not (out / "circuit.json").exists()
    stamp = first.stat().st_mtime_ns
    proc = _cli(*argv, "--out", out)  # one process resumes from what rank 0 saved
    _ok(proc)
    assert first.stat().st_mtime_ns == stamp
    ref = tmp_path / "ref"
    _ok(_cli(*argv, "--out", ref))
    _same(_saved(ref), _saved(out))


# -- big models: a model split by accelerate scores like the whole one -------------------------
def _offload_case(tmp_path):
    from accelerate import dispatch_model

    from circuitdiff.core.arch import resolve
    from circuitdiff.core.model import LoadedModel
    from circuitdiff.core.task import EntityTrackingTask, TaskConfig
    from circuitdiff.core.toy import word_level_tokenizer
    from circuitdiff.methods.path_patching import PatchRequest

    tok = word_level_tokenizer()
    whole = add_lora(tiny_llama(len(tok), layers=4))
    split = add_lora(tiny_llama(len(tok), layers=4))
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu",
                  "lm_head": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "cpu", "model.layers.3": "disk"}
    split.base_model.model = dispatch_model(split.base_model.model, device_map,
                                            offload_dir=str(tmp_path / "offload"))
    assert any(p.device.type == "meta" for p in split.parameters())  # really offloaded
    task = EntityTrackingTask(tok, TaskConfig(n_boxes=3), seed=3)
    clean = task.sample(5)
    requests = [PatchRequest("last"), PatchRequest("last", [(3, 0), (2, 1)], "q"),
                PatchRequest("labels", [(3, 2), (2, 3)], "v")]
    return (LoadedModel(whole, tok, resolve(whole), "whole"),
            LoadedModel(split, tok, resolve(split), "split"), clean, task.corrupt(clean), requests)


def test_offloaded_model_scores_like_the_whole_one(tmp_path):
    import warnings

    from circuitdiff.methods.path_patching import path_patching_scores

    whole, split, clean, cf, requests = _offload_case(tmp_path)
    for req in requests:
        ref = path_patching_scores(whole, clean, cf, req)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the fast path itself, no fallback
            got = path_patching_scores(split, clean, cf, req)
        assert ref.mean.abs().sum() > 0
        assert torch.allclose(ref.mean, got.mean, atol=1e-6, rtol=0)  # measured: 0
        assert torch.allclose(ref.se, got.se, atol=1e-6, rtol=0)


def test_model_over_several_gpus_falls_back_to_naive(tmp_path):
    from circuitdiff.core.arch import unwrap
    from circuitdiff.methods.path_patching import path_patching_scores

    whole, split, clean, cf, requests = _offload_case(tmp_path)
    inner = unwrap(split.model)
    inner.hf_device_map = {**inner.hf_device_map, "model.layers.2": 0, "model.layers.3": 1}
    req = requests[1]
    with pytest.warns(UserWarning, match="run on 2 devices.*using the naive path"):
        got = path_patching_scores(split, clean, cf, req)
    ref = path_patching_scores(whole, clean, cf, req)
    assert torch.allclose(ref.mean, got.mean, atol=1e-6, rtol=0)


# -- the study under two ranks ---------------------------------------------------------------
@pytest.mark.slow
def test_study_on_two_ranks_gives_the_same_verdicts(tmp_path):
    """The small settings of ``tests/test_study.py``, a base and its LoRA fine-tune."""
    from circuitdiff.core.toy import word_level_tokenizer

    base_dir, lora_dir = save_base_and_lora(word_level_tokenizer(), tmp_path, layers=4,
                                            base_name="base4", lora_name="lora4")
    args = ["study", "--model", base_dir, "--model", lora_dir, "-n", "8", "--n-discovery", "6",
            "--n-mean", "8", "--random-draws", "2", "--sizes", "2,2,2,1", "--n-boxes", "3",
            "--batch-size", "8", "--chain", "paper", "--dcm-train", "8"]
    summaries = []
    for workers in (1, 2):
        _ok(_cli(*args, "--out", tmp_path / f"study{workers}", workers=workers, timeout=1200))
        summaries.append(json.loads((tmp_path / f"study{workers}" / "summary.json").read_text()))
    one, two = summaries
    assert set(one["verdicts"]) == {str(lora_dir)}
    _same(one["verdicts"], two["verdicts"], "verdicts")
    _same(one["circuit"]["groups"], two["circuit"]["groups"], "circuit")
    _same(one["faithfulness"], two["faithfulness"], "faithfulness")
