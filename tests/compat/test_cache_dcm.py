"""Cache compatibility of DCM and functional patching: for equal settings, the file names, saved
settings and numbers are the ones the code before the one-method-shape change wrote (recorded on
these tiny models into ``cache_dcm_snapshot.json``).

One documented change: the found-a-function gate (issue 31) added two settings to the DCM key,
``bootstrap`` and ``confidence`` (a group's rows now carry ``found``/``reason``, so a group file
saved before it recomputes once). The rows also record the gate's calibration
(``random_found``/``random_draws``: how many random head sets the gate would accept); the key
is unchanged by it (the numbers it is made of are the same), and a file saved without them
reads back with the calibration "not measured". Every other setting, every name and every
number is as before; the test holds exactly that.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from circuitdiff.core.circuit import Circuit, CircuitGroup
from circuitdiff.core.pool import ModelPool
from circuitdiff.core.runs import RunFolder
from circuitdiff.methods import dcm
from snapshots import load_snapshot

torch.set_num_threads(1)
SNAPSHOT = load_snapshot("cache_dcm_snapshot.json")
#: the settings the gate added to the DCM key (defaults), the one change of the saved settings
GATE = {"bootstrap": 1000, "confidence": 0.95}


def _snap(folder: Path) -> dict:
    out = {}
    for p in sorted(folder.rglob("*.json")):
        d = json.loads(p.read_text())
        out[str(p.relative_to(folder))] = {"settings": d["settings"], "result": d["result"]}
    return out


def test_dcm_and_functional_cache_names_settings_and_numbers_unchanged(tiny, tiny_lora,
                                                                         tmp_path, monkeypatch):
    # the old code patched every non-empty selection: let every one count here too
    monkeypatch.setattr(importlib.import_module("circuitdiff.methods.dcm.run"), "found_gate",
                        lambda hits, cfg, label: (True, "", None, None))
    c = Circuit({"movers": CircuitGroup([(1, 0), (1, 3), (2, 2)], "last"),
                 "detectors": CircuitGroup([(0, 1), (0, 2)], "query_label"),
                 "readers": CircuitGroup([], "prev_query_label")}, 3, 4)
    cfg = dcm.DCMConfig(circuit=c, n_train=8, n_val=4, n_test=4, lambdas=(0.0001, 0.001),
                        lr=1.0, n_boxes=4, n_random=2, batch_size=4,
                        desiderata=("object_value", "position", "no_commas"))
    folder = RunFolder(tmp_path)
    res = dcm.run(tiny, None, cfg, store=folder)
    dcm.functional.run(ModelPool(["a", "b"], lambda s: {"a": tiny, "b": tiny_lora}[s]), None,
                       dcm.FunctionalConfig(res, cfg), store=folder)
    got = _snap(tmp_path)
    assert sorted(got) == sorted(SNAPSHOT)
    for name, old in SNAPSHOT.items():
        new = got[name]
        assert new["settings"] == {**old["settings"], **GATE}, name
        if name.startswith("functional/"):
            assert new["result"] == old["result"], name
            continue
        assert len(new["result"]) == len(old["result"])
        for n, o in zip(new["result"], old["result"]):
            assert {k: n[k] for k in o} == o, name
            assert set(n) - set(o) == {"found", "reason", "val_vs_no_patch", "val_vs_random",
                                       "random_found", "random_draws"}
