"""CMAP's cache names and saved settings, recorded from the code before the one-method change:
a run folder made then must resume (same file names, the same settings dicts).

The file names end in ``settings_digest(settings, 10)``, so equal names mean equal settings;
the literal dicts below make a difference readable when it fails. Changed on purpose since: a
direction's result is keyed with ``row_version`` 2 (the rows gained the null of "gain carried":
excess interval, random shares, rank, leave-one-out checks), so the two direction files have
new names and old ones recompute; and (issue 31's rank test) the key gained
``group_random_draws`` — the group rows may take fewer random draws than the whole circuit —
so every CMAP file has a new name and an old CMAP folder recomputes."""

from __future__ import annotations

import json

import pytest
import torch

from circuitdiff.core.circuit import Circuit, CircuitGroup
from circuitdiff.core.runs import RunFolder

from conftest import save_base_and_lora, tiny_llama
from snapshots import saved_settings

torch.set_num_threads(1)

#: relative names of every file a run wrote, per fine-tune kind (recorded from the old code)
NAMES = {
    "full": [
        "cmap/base-1405df__full-52e6d8-138f39131d.json",
        "cmap/full-52e6d8__base-1405df-35d883b2c4.json",
        "cmap/record/base-1405df-c2e8db6bf6.safetensors",
        "cmap/record/full-52e6d8-3e49da3ba1.safetensors",
    ],
    "lora": [
        "cmap/lora_adapter_off-16a870__lora_adapter_on-7f031d-a01bbb8d8e.json",
        "cmap/lora_adapter_on-7f031d__lora_adapter_off-16a870-eff72944f9.json",
        "cmap/record/lora_adapter_off-16a870-e59a5f3943.safetensors",
        "cmap/record/lora_adapter_on-7f031d-76e037cfbf.safetensors",
    ],
}
#: the settings of the forward direction's result on the LoRA pair (recorded from the old code)
LORA_FORWARD = {
    "circuit": {"edges": [], "groups": {
        "position_detector": {"heads": ["0.2"], "position": "query_label"},
        "structure_reader": {"heads": [], "position": "prev_query_label"},
        "value_fetcher": {"heads": ["2.0", "1.1"], "position": "last"}},
        "model": "tiny", "n_heads": 4, "n_layers": 3, "settings": {}},
    "cmap": {"bootstrap": 10, "bootstrap_seed": 0, "confidence": 0.95, "input": True,
             "n_boxes": 4, "n_prompts": 6, "per_head": False, "per_head_positions": None,
             "random_draws": 1, "group_random_draws": None, "random_seed": 0, "reverse": True,
             "seed": 0},
    "dtype": "torch.float32", "prompts": "217f6b7743cf479d",
    "source": "lora[adapter on]", "target": "lora[adapter off]"}
#: the plan a recording of that pair adds to the settings (with ``model``)
LORA_PLAN = {"input_sites": [["last", "k", [1, 2]], ["last", "q", [1, 2]], ["last", "v", [1, 2]],
                             ["query_label", "k", [0]], ["query_label", "q", [0]],
                             ["query_label", "v", [0]]],
             "layers": [0, 1, 2], "slots": ["last", "query_label"]}


def circuit() -> Circuit:
    return Circuit({"value_fetcher": CircuitGroup([(2, 0), (1, 1)], "last"),
                    "position_detector": CircuitGroup([(0, 2)], "query_label"),
                    "structure_reader": CircuitGroup([], "prev_query_label")}, 3, 4, "tiny")


def run_cmap(base: str, finetuned: str, out) -> None:
    """One CMAP run of the pair into ``out`` (the call shape of the current code)."""
    from circuitdiff.methods.cmap import CMAPConfig, run

    cfg = CMAPConfig(n_prompts=6, n_boxes=4, random_draws=1, bootstrap=10, batch_size=3,
                     max_rows=16, input=True, reverse=True, circuit=circuit())
    run([base, finetuned], None, cfg, store=RunFolder(out))



@pytest.mark.parametrize("kind", ["lora", "full"])
def test_cmap_cache_names_and_settings_are_the_old_ones(tmp_path, tokenizer, monkeypatch, kind):
    save_base_and_lora(tokenizer, tmp_path)
    if kind == "full":
        tiny_llama(len(tokenizer), seed=3).save_pretrained(tmp_path / "full")
        tokenizer.save_pretrained(tmp_path / "full")
    monkeypatch.chdir(tmp_path)  # relative specs: names free of the temporary path
    run_cmap("base", kind, tmp_path / "run")
    saved = saved_settings(tmp_path / "run")
    assert sorted(saved) == NAMES[kind]
    if kind == "lora":
        assert saved[NAMES["lora"][1]] == {**LORA_FORWARD, "row_version": 2}
        assert saved[NAMES["lora"][3]] == {**LORA_FORWARD, "model": "lora[adapter on]",
                                           "plan": LORA_PLAN}


def test_a_result_saved_before_units_resumes_with_units(tmp_path, tokenizer, monkeypatch):
    """Rows cached before ``n_units`` existed are read, not recomputed, and get their units
    from the circuit."""
    import circuitdiff.methods.cmap as cm

    save_base_and_lora(tokenizer, tmp_path)
    monkeypatch.chdir(tmp_path)
    run_cmap("base", "lora", tmp_path / "run")
    for name in NAMES["lora"][:2]:
        f = tmp_path / "run" / name
        saved = json.loads(f.read_text())
        for r in saved["result"]["rows"]:
            del r["n_units"]
        f.write_text(json.dumps(saved))
    monkeypatch.setattr(cm, "_direction", lambda *a, **k: pytest.fail("recomputed"))
    cfg = cm.CMAPConfig(n_prompts=6, n_boxes=4, random_draws=1, bootstrap=10, batch_size=3,
                        max_rows=16, input=True, reverse=True, circuit=circuit())
    res = cm.run(["base", "lora"], None, cfg, store=RunFolder(tmp_path / "run"))
    rows = {r.name: r.n_units for r in res.directions[0].rows}
    assert rows == {"value_fetcher": 2, "position_detector": 1, "structure_reader": 0,
                    "value_fetcher+position_detector": 3, "circuit": 3,
                    **{f"{g}:{c}": n for g, n in (("value_fetcher", 2), ("position_detector", 1))
                       for c in ("Q", "K", "V", "QK", "QKV")}}
