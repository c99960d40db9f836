"""Cache compatibility of evaluation and knockout: for equal settings, the file names and saved
settings are the ones the code before the one-method-shape change wrote (recorded on these tiny
models into ``cache_eval_snapshot.json``), so an old run folder resumes. (Changed on purpose since: faithfulness rows are
row_version 3, with an interval per random draw; old rows recompute.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_llama
from snapshots import load_snapshot, saved_settings
from circuitdiff.core.arch import resolve
from circuitdiff.core.circuit import Circuit, CircuitGroup
from circuitdiff.core.model import LoadedModel

torch.set_num_threads(1)
SNAPSHOT = load_snapshot("cache_eval_snapshot.json")


def _config_json(rel: str, d):
    """The content of a run's ``config.json`` (recorded whole), None for another plain JSON."""
    return d if rel.endswith("config.json") else None



@pytest.fixture()
def patched_cli(tokenizer, monkeypatch):
    """The evaluate and knockout commands on in-process tiny models ("a", "b")."""
    import circuitdiff.cli.evaluate as ce
    import circuitdiff.cli.knockout as ck

    m = tiny_llama(len(tokenizer))
    m2 = tiny_llama(len(tokenizer), seed=1)
    models = {"a": LoadedModel(m, tokenizer, resolve(m), "tiny-llama"),
              "b": LoadedModel(m2, tokenizer, resolve(m2), "tiny-other")}
    monkeypatch.setattr(ce, "load_from_args", lambda args, spec=None: models[spec])
    monkeypatch.setattr(ck, "load_from_args", lambda args, spec=None: models["a"])
    monkeypatch.setattr("circuitdiff.core.model.load_tokenizer", lambda spec: tokenizer)
    # "a" and "b" are no model folders: skip the pre-load check of their files
    monkeypatch.setattr("circuitdiff.core.validate.check_model_spec", lambda *a, **k: None)
    return models


def _circuit(groups) -> Circuit:
    return Circuit({n: CircuitGroup(hs, pos) for n, (pos, hs) in groups.items()}, 3, 4, "tiny")


def test_evaluate_cache_names_and_settings_unchanged(patched_cli, tmp_path):
    from circuitdiff.cli import main

    _circuit({"vf": ("last", [(2, 1), (1, 3)]), "pd": ("query_label", [(0, 2)])}).save(
        tmp_path / "c1.json")
    _circuit({"vf": ("last", [(2, 2)])}).save(tmp_path / "c 2.json")
    ev = tmp_path / "ev"
    assert main(["evaluate", "--circuit", str(tmp_path / "c1.json"), "--circuit",
                 str(tmp_path / "c 2.json"), "--model", "a", "--model", "b", "--n-boxes", "4",
                 "-n", "6", "--n-mean", "6", "--random-draws", "2", "--out", str(ev),
                 "--completeness", "--n-halves", "1", "--minimality", "--threshold", "0.02"]) == 0
    got = saved_settings(ev, _config_json)
    got["evaluate/config.json"]["circuits"] = [Path(c).name
                                               for c in got["evaluate/config.json"]["circuits"]]
    assert sorted(got) == sorted(SNAPSHOT["evaluate"])
    for name, settings in SNAPSHOT["evaluate"].items():
        assert got[name] == settings, name


def test_knockout_cache_names_and_settings_unchanged(patched_cli, tmp_path):
    from circuitdiff.cli import main

    ko = tmp_path / "ko"
    assert main(["knockout", "--n-boxes", "4", "-n", "4", "--edge", "last:correct_object",
                 "--edge", "random", "--layers", "0,2", "--out", str(ko), "--seed", "3"]) == 0
    assert saved_settings(ko) == SNAPSHOT["knockout"]
    ko2 = tmp_path / "ko2"
    assert main(["knockout", "--n-boxes", "4", "-n", "4", "--edge", "labels:objects",
                 "--out", str(ko2)]) == 0
    assert saved_settings(ko2) == SNAPSHOT["knockout_all_layers"]
