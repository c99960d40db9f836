"""The study end to end on tiny saved models (base + LoRA adapter folder), and its resume."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

from circuitdiff.cli import main
from circuitdiff.study import STEPS, parse_steps, with_dependencies

from conftest import save_base_and_lora


@pytest.fixture(scope="module")
def four_layer_models(tokenizer, tmp_path_factory):
    """The four-group chain needs >= 4 layers: each group sits below its receivers."""
    return save_base_and_lora(tokenizer, tmp_path_factory.mktemp("models"), layers=4,
                              base_name="base4", lora_name="lora4")


def _study_args(base_dir, lora_dir, out, *extra):
    # --no-screenshot: the headless Chromium load of the report is tested once, in the slow
    # tier's organism study (tests/test_study_organisms.py) and tests/report/test_html.py
    return ["study", "--model", str(base_dir), "--model", str(lora_dir), "--out", str(out),
            "-n", "8", "--n-discovery", "6", "--n-mean", "8", "--random-draws", "2",
            "--sizes", "2,2,2,1", "--n-boxes", "3", "--batch-size", "8", "--chain", "paper",
            "--dcm-train", "8", "--no-screenshot", *extra]


@pytest.fixture(scope="module")
def whole_study(four_layer_models, tmp_path_factory):
    """One whole study (every step) on the tiny models, shared by the tests that rerun parts
    of it from a copy of its folder: (folder, its arguments, what it printed)."""
    base_dir, lora_dir = four_layer_models
    out = tmp_path_factory.mktemp("whole") / "study"
    args = _study_args(base_dir, lora_dir, out)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(args) == 0
    return out, args, printed.getvalue()


def _copy(study: Path, to: Path) -> Path:
    """A copy of a study folder: a rerun there resumes from the copied results."""
    shutil.copytree(study, to)
    return to


def test_study_end_to_end_and_resume(whole_study, four_layer_models, capsys):
    """The paper chain's study on random tiny models (the automatic chain would rightly find
    them at chance; see test_study_at_chance_says_no_circuit)."""
    base_dir, lora_dir = four_layer_models
    out, args, printed = whole_study
    assert "faithfulness" in printed.lower()
    assert not (out / "report.png").exists()  # --no-screenshot
    for f in ("report.md", "report.html", "summary.json", "faithfulness.json", "faithfulness.csv",
              "faithfulness.png", "discover/circuit.json", "discover/circuit_flow.png"):
        assert (out / f).exists(), f
    assert len(list((out / "knockout").glob("*.png"))) == 2  # one figure per model
    summary = json.loads((out / "summary.json").read_text())
    assert [r["model"] for r in summary["faithfulness"]] == [str(base_dir), str(lora_dir)]
    sizes = {g: len(v["heads"]) for g, v in summary["circuit"]["groups"].items()}
    assert sizes == {"value_fetcher": 2, "position_transmitter": 2, "position_detector": 2,
                     "structure_reader": 1}
    # every step ran (the paper chain beside itself is skipped with --chain paper), and a
    # verdict per fine-tune with all three claims
    assert summary["steps"] == [s for s in STEPS if s != "paper_chain"]
    assert set(summary["verdicts"]) == {str(lora_dir)}
    assert set(summary["verdicts"][str(lora_dir)]) == {"uses_base_circuit", "same_functions",
                                                       "gain_carried"}
    assert all(r["faithfulness_ci"] is None or len(r["faithfulness_ci"]) == 2
               for r in summary["faithfulness"])
    assert set(summary["timings"]) == set(summary["steps"]) - {"paper_chain"}
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    assert stamp
    assert main(args) == 0  # resumes: nothing recomputed, and it says so per step
    printed = capsys.readouterr().out
    assert printed.count("saved results reused") == len(summary["steps"])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == stamp


def test_study_recomputes_only_what_changed(whole_study, four_layer_models, tmp_path, capsys):
    base_dir, lora_dir = four_layer_models
    out = _copy(whole_study[0], tmp_path / "study")
    steps = ["--steps", "accuracy,faithfulness"]
    changed = _study_args(base_dir, lora_dir, out, *steps)
    changed[changed.index("--random-draws") + 1] = "3"
    assert main(changed) == 0
    printed = capsys.readouterr().out
    assert "[accuracy] saved results reused" in printed
    assert "[discover] saved results reused" in printed
    assert "[faithfulness] settings changed (evaluation.n_random 2 → 3)" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["timings"]["faithfulness"]["reused"] is False
    assert all(len(r["random"]) == 3 for r in summary["faithfulness"]
               if r["random_mean"] is not None)


def test_study_steps_choose_and_pull_dependencies(whole_study, four_layer_models, tmp_path,
                                                  capsys):
    base_dir, lora_dir = four_layer_models
    out = tmp_path / "ko"
    assert main(_study_args(base_dir, lora_dir, out, "--steps", "knockout")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == ["knockout"] and "faithfulness" not in summary
    assert not (out / "discover").exists()
    # the steps a step needs are named and run (here from the whole study's saved results)
    out2 = _copy(whole_study[0], tmp_path / "dcm")
    assert main(_study_args(base_dir, lora_dir, out2, "--steps", "functional")) == 0
    assert "(and discover, dcm, which they need)" in capsys.readouterr().out
    assert json.loads((out2 / "summary.json").read_text())["steps"] == [
        "discover", "dcm", "functional"]


def test_parse_steps():
    assert parse_steps(None) == STEPS and parse_steps("all") == STEPS
    assert parse_steps("cmap, accuracy") == ("accuracy", "cmap")
    with pytest.raises(ValueError, match="unknown step 'scna'; valid steps: accuracy, discover"):
        parse_steps("scna")
    assert with_dependencies(("cmap",)) == ("accuracy", "discover", "cmap")


def test_study_at_chance_says_no_circuit(four_layer_models, tmp_path, capsys):
    base_dir, _ = four_layer_models
    out = tmp_path / "chance"
    assert main(["study", "--model", str(base_dir), "--out", str(out), "-n", "8",
                 "--n-discovery", "6", "--n-mean", "8", "--n-boxes", "3", "--batch-size",
                 "8", "--no-screenshot"]) == 0
    assert "no circuit to find" in capsys.readouterr().out
    assert "no circuit to find" in (out / "report.md").read_text()


def test_study_accuracy_only(saved_models, tmp_path, capsys):
    base_dir, _ = saved_models
    out = tmp_path / "acc"
    assert main(["study", "--model", str(base_dir), "--accuracy-only", "--out", str(out),
                 "-n", "6", "--no-screenshot"]) == 0
    assert "7-box accuracy" in capsys.readouterr().out
    assert (out / "report.md").exists()


def test_python_api_runs_the_study_with_default_loading(tmp_path):
    """The API needs no loader: ``run_study(models, out=..., cfg=...)`` loads by spec."""
    from circuitdiff import StudyConfig, run_study
    from circuitdiff.methods.evaluation import EvalConfig

    lines = []
    s = run_study(["organism:base", "organism:full"], out=tmp_path / "api",
                  cfg=StudyConfig(evaluation=EvalConfig(n_prompts=20, n_mean=20),
                                  steps=("accuracy",), screenshot=False),
                  progress=False, log=lines.append)
    assert s["steps"] == ["accuracy"] and set(s["accuracy"]) == {"organism:base", "organism:full"}
    assert s["accuracy"]["organism:full"]["n"] == 20
    assert (tmp_path / "api" / "report.html").exists()
    assert any("organism:full: 7-box accuracy" in line for line in lines)


def test_study_on_a_circuit_the_user_brings(four_layer_models, tmp_path, capsys):
    """``--circuit FILE``: the study runs on that circuit instead of discovering one, and the
    report says where it came from."""
    from circuitdiff.core.circuit import Circuit, CircuitGroup

    base_dir, lora_dir = four_layer_models
    path = tmp_path / "mine.json"
    Circuit({"readers": CircuitGroup([(3, 0), (3, 1)], "last"),
             "movers": CircuitGroup([(1, 2)], "query_label")}, 4, 4, "mine").save(path)
    out = tmp_path / "given"
    assert main(_study_args(base_dir, lora_dir, out, "--steps", "faithfulness",
                            "--circuit", str(path))) == 0
    assert "the circuit is loaded from" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["circuit_source"] == f"loaded from {path}"
    assert {r["circuit"] for r in summary["faithfulness"]} == {"given_circuit"}
    assert not (out / "discover").exists()  # nothing discovered
    assert f"loaded from {path}" in (out / "report.md").read_text()
    assert all(len(r["random_faithfulness_ci"]) == 2 for r in summary["faithfulness"])
