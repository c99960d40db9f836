"""The study end to end on tiny saved models (base + LoRA adapter folder), and its resume."""

from __future__ import annotations

import json

import pytest

from circuitdiff.cli import main

from conftest import save_base_and_lora


@pytest.fixture()
def four_layer_models(tokenizer, tmp_path):
    """The four-group chain needs >= 4 layers: each group sits below its receivers."""
    return save_base_and_lora(tokenizer, tmp_path, layers=4, base_name="base4",
                              lora_name="lora4")


def test_study_end_to_end_and_resume(four_layer_models, tmp_path, capsys):
    """The paper chain's study on random tiny models (the automatic chain would rightly find
    them at chance; see test_study_at_chance_says_no_circuit)."""
    base_dir, lora_dir = four_layer_models
    out = tmp_path / "study"
    args = ["study", "--model", str(base_dir), "--model", str(lora_dir), "--out", str(out),
            "-n", "8", "--n-discovery", "6", "--n-mean", "8", "--random-draws", "2",
            "--sizes", "2,2,2,1", "--n-boxes", "3", "--batch-size", "8", "--chain", "paper"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "faithfulness" in printed.lower()
    for f in ("report.md", "summary.json", "faithfulness.json", "faithfulness.csv",
              "discover/circuit.json", "knockout/knockout.png"):
        assert (out / f).exists(), f
    summary = json.loads((out / "summary.json").read_text())
    assert [r["model"] for r in summary["faithfulness"]] == [str(base_dir), str(lora_dir)]
    sizes = {g: len(v["heads"]) for g, v in summary["circuit"]["groups"].items()}
    assert sizes == {"value_fetcher": 2, "position_transmitter": 2, "position_detector": 2,
                     "structure_reader": 1}
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    assert stamp
    assert main(args) == 0  # resumes: nothing recomputed
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == stamp


def test_study_at_chance_says_no_circuit(four_layer_models, tmp_path, capsys):
    base_dir, _ = four_layer_models
    out = tmp_path / "chance"
    assert main(["study", "--model", str(base_dir), "--out", str(out), "-n", "8",
                 "--n-discovery", "6", "--n-mean", "8", "--n-boxes", "3", "--batch-size",
                 "8"]) == 0
    assert "no circuit to find" in capsys.readouterr().out
    assert "no circuit to find" in (out / "report.md").read_text()


def test_study_accuracy_only(saved_models, tmp_path, capsys):
    base_dir, _ = saved_models
    out = tmp_path / "acc"
    assert main(["study", "--model", str(base_dir), "--accuracy-only", "--out", str(out),
                 "-n", "6"]) == 0
    assert "7-box accuracy" in capsys.readouterr().out
    assert (out / "report.md").exists()
