"""``organisms.finetune`` on a tiny random Llama with the organisms' tokenizer: the
LoRA kind saves an adapter on the base spec that changes the outputs, the attention kind trains
the attention projections and nothing else, the record's hash is the saved file's, and the
minutes budget stops training; plus the ``organisms finetune`` command."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from circuitdiff.core.model import load_model
from circuitdiff.organisms.finetune import ATTENTION, FinetuneConfig, finetune

#: a short run: 2 steps of 2 documents, 4 evaluation prompts
SHORT = {"steps": 2, "batch_size": 2, "n_eval": 4}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    from conftest import save_tiny

    return str(save_tiny(tmp_path_factory.mktemp("ft") / "base"))


def _logits(loaded, text: str = "The apple sits in crate J . crate J has the") -> torch.Tensor:
    enc = loaded.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return loaded.model(**enc).logits


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_lora_saves_an_adapter_on_the_base_spec(base, tmp_path):
    out = tmp_path / "lora"
    rec = finetune(base, out, FinetuneConfig(kind="lora", lr=1e-2, **SHORT), progress=False)
    assert rec["steps_run"] == 2 and len(rec["losses"]) == 2
    assert json.loads((out / "finetune.json").read_text()) == rec
    assert rec["weights"] == "adapter_model.safetensors"
    assert rec["sha256"] == _sha256(out / "adapter_model.safetensors")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    assert 0 <= rec["accuracy_7box"]["before"] <= 1 and rec["accuracy_7box"]["n"] == 4

    tuned, plain = load_model(str(out)), load_model(base)
    assert tuned.spec == str(out)
    with_adapter = _logits(tuned)
    assert (with_adapter - _logits(plain)).abs().max() > 1e-4  # the adapter is not zero
    with tuned.adapter_disabled():
        assert torch.allclose(_logits(tuned), _logits(plain), atol=1e-6, rtol=0)


def test_lora_adapter_names_its_base_by_the_spec(tmp_path):
    """A spec that loads from another folder (an organism here; a GGUF checkpoint name in the
    shipped recipe) is what the adapter names, so the folder loads without --model BASE."""
    from circuitdiff.core.specs import adapter_base_of, identity

    out = tmp_path / "on_organism"
    finetune("organism:base", out, FinetuneConfig(kind="lora", steps=1, batch_size=2, n_eval=4),
             progress=False)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "organism:base"
    assert adapter_base_of(str(out)) == identity("organism:base")
    loaded = load_model(str(out))
    with loaded.adapter_disabled():
        assert torch.equal(_logits(loaded), _logits(load_model("organism:base")))


def test_attention_kind_changes_only_attention_weights(base, tmp_path):
    out = tmp_path / "attention"
    rec = finetune(base, out, FinetuneConfig(kind="attention", lr=1e-3, **SHORT), progress=False)
    assert rec["weights"] == "model.safetensors"
    assert rec["sha256"] == _sha256(out / "model.safetensors")
    tuned = dict(load_model(str(out)).model.named_parameters())
    plain = dict(load_model(base).model.named_parameters())
    assert tuned.keys() == plain.keys()
    attention = [n for n in plain if any(f".{m}." in n for m in ATTENTION)]
    assert len(attention) == 4 * 3  # q, k, v, o in each of the 3 layers
    assert rec["trained_parameters"] == sum(plain[n].numel() for n in attention)
    for name, p in plain.items():
        changed = not torch.equal(tuned[name], p)
        assert changed == (name in attention), name


def test_minutes_budget_stops_after_the_first_step(base, tmp_path):
    cfg = FinetuneConfig(kind="lora", steps=50, batch_size=2, n_eval=4, minutes=1e-6)
    rec = finetune(base, tmp_path / "short", cfg, progress=False)
    assert rec["steps_run"] == 1 and len(rec["losses"]) == 1


def test_cli_finetune_prints_one_summary_and_refuses_a_used_folder(base, tmp_path, capsys):
    from circuitdiff.cli import main

    out = tmp_path / "cli"
    argv = ["organisms", "finetune", "--base", base, "--kind", "lora", "--out", str(out),
            "--steps", "1", "--batch-size", "2", "--n-eval", "4", "--rank", "2"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lora: 1 steps in "), lines
    assert "7-box accuracy" in lines[0] and " -> " in lines[0]
    rec = json.loads((out / "finetune.json").read_text())
    assert rec["config"]["rank"] == 2 and rec["config"]["lr"] == 5e-4
    before = sorted(p.name for p in out.iterdir())
    assert main(argv) == 2  # the same --out again: refused, untouched
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not empty" in err[0], err
    assert sorted(p.name for p in out.iterdir()) == before
    # an adapter as --base: refused before anything loads or is written
    assert main([*argv[:2], "--base", str(out), *argv[4:6], "--out", str(tmp_path / "x")]) == 2
    assert "is a LoRA adapter" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_kinds_are_the_library_kinds():
    from circuitdiff.cli.organisms import FINETUNE_KINDS
    from circuitdiff.organisms.finetune import KINDS

    assert FINETUNE_KINDS == KINDS
