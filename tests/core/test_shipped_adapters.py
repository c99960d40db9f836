"""Shipped adapter specs (``qwen2.5-coder-0.5b+lora``): the name loads its base plus the shipped
adapter, un-merged and named as the user named it, and every spec rule knows it. Exercised on a
tiny random Qwen2 and a LoRA adapter on it, registered under a test name (the registry is data)."""

from __future__ import annotations

import json

import pytest
import torch

import circuitdiff.core.specs as specs
from circuitdiff.core.model import ModelSpecError, load_model, load_tokenizer

NAME = "tiny-qwen2+lora"
IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(base folder, adapter folder): the adapter's config names the base by its path and the
    adapter folder holds no tokenizer (as ``organisms finetune --kind lora`` saves it)."""
    from conftest import add_lora, save_tiny, tiny_qwen2

    from circuitdiff.organisms.data import build_tokenizer

    root = tmp_path_factory.mktemp("shipped")
    tok = build_tokenizer()
    base = save_tiny(root / "base", family="qwen2", tokenizer=tok)
    lora = root / "lora"
    add_lora(tiny_qwen2(len(tok))).save_pretrained(lora)
    cfg = json.loads((lora / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path":
                                                          str(base)}))
    return base, lora


@pytest.fixture()
def registered(folders, monkeypatch):
    monkeypatch.setitem(specs.SHIPPED_ADAPTERS, NAME, folders[1])
    return folders


def _logits(loaded) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(input_ids=IDS).logits


def test_the_qwen_adapter_is_registered_in_the_package_data():
    from pathlib import Path

    import circuitdiff

    assert specs.SHIPPED_ADAPTERS["qwen2.5-coder-0.5b+lora"] == (
        Path(circuitdiff.__file__).parent / "data" / "qwen" / "lora")


def test_a_shipped_adapter_loads_its_base_plus_the_adapter(registered):
    base, lora = registered
    loaded = load_model(NAME)
    assert loaded.spec == NAME and loaded.adapter is None and loaded.name == NAME
    same = load_model(str(base), adapter=str(lora))
    plain = load_model(str(base))
    assert torch.equal(_logits(loaded), _logits(same))
    assert (_logits(loaded) - _logits(plain)).abs().max() > 1e-3  # the adapter is attached
    with loaded.adapter_disabled():  # un-merged: the base from the same weights
        assert torch.allclose(_logits(loaded), _logits(plain), atol=1e-6, rtol=0)
    assert load_model(NAME.upper()).spec == NAME.upper()  # case-insensitive, like chunked names
    # the adapter folder has no tokenizer: the base's
    assert load_tokenizer(NAME).get_vocab() == load_tokenizer(str(base)).get_vocab()


def test_every_spec_rule_knows_a_shipped_adapter(registered):
    from circuitdiff.core.validate import check_model_spec

    base, lora = registered
    assert specs.spec_folder(NAME) == lora.resolve()
    assert specs.identity(NAME) == str(lora.resolve()) == specs.identity(str(lora))
    assert specs.adapter_base_of(NAME) == str(base.resolve())
    assert specs.as_spec(str(lora.resolve())) == NAME
    assert specs.config_grid(NAME) == specs.config_grid(str(base))
    specs.check_resolvable(NAME)
    check_model_spec(NAME)
    with pytest.raises(ModelSpecError, match=f"pass --model {base} --adapter"):
        load_model(NAME, adapter=str(lora))


def test_an_absent_shipped_adapter_is_one_line(tmp_path, monkeypatch, capsys):
    from circuitdiff.cli import main

    monkeypatch.setitem(specs.SHIPPED_ADAPTERS, "gone+lora", tmp_path / "nowhere")
    for call in (load_model, specs.spec_folder, specs.check_resolvable):
        with pytest.raises(ModelSpecError, match="gone\\+lora is not shipped in this install"):
            call("gone+lora")
    capsys.readouterr()
    assert main(["eval", "--model", "gone+lora", "-n", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not shipped" in err[0], err


def test_models_list_names_shipped_adapters(registered, tmp_path, monkeypatch, capsys):
    from circuitdiff.cli import main

    base, lora = registered
    monkeypatch.setitem(specs.SHIPPED_ADAPTERS, "gone+lora", tmp_path / "nowhere")
    capsys.readouterr()
    assert main(["models", "list", "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert f"{NAME}: LoRA adapter on {base}, shipped in {lora}" in out
    assert "gone+lora: LoRA adapter, not shipped in this install" in out


def test_the_shipped_qwen_lora_is_what_its_record_says():
    """The shipped adapter's weights match the checksum its record and README give, and it
    names the chunked checkpoint as its base (so it loads offline with the six packages)."""
    import hashlib
    import json

    from circuitdiff.core.specs import SHIPPED_ADAPTERS

    folder = SHIPPED_ADAPTERS["qwen2.5-coder-0.5b+lora"]
    digest = hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()
    record = json.loads((folder / "finetune.json").read_text())
    assert record["sha256"] == digest and digest in (folder / "README.md").read_text()
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "qwen2.5-coder-0.5b" and cfg["r"] == 8
    assert (folder / "adapter_model.safetensors").stat().st_size < 8 << 20
