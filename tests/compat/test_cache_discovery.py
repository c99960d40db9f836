"""Cache compatibility of discovery (paper and automatic chain) and the position scan: for equal
settings, the file names and saved settings are the ones the code before the one-method-shape
change wrote (recorded into ``cache_discovery_snapshot.json``), so an old run folder resumes. One change on
purpose: the automatic chain's ``circuit.json`` gained the metadata ``rules``, ``scan_method``
and ``sizing`` (what ``auto`` resolved to and why); the cached pieces' settings are unchanged."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import tiny_llama
from snapshots import load_snapshot, saved_settings
from circuitdiff.core.arch import resolve
from circuitdiff.core.model import LoadedModel
from circuitdiff.core.task import EntityTrackingTask, TaskConfig

torch.set_num_threads(1)
#: paper chain on the sharpened 6-layer tiny model
PAPER = dict(sizes=(3, 2, 2, 1), chain="paper", compare_exact=True)
#: automatic chain on the shipped organism, as small as it runs
AUTO = dict(n_prompts=8, n_validate=24, n_mean=12, n_scan=12, seed=5, on_unreachable="keep-all")


def snap(folder: Path) -> dict:
    """Every file of ``folder`` (figures aside): its saved settings (cached results), the content
    of ``prompts.json``, the circuit's setting names, or None for a plain file."""
    return saved_settings(folder, lambda rel, d: d if rel == "prompts.json" else
                          sorted(d["settings"]) if rel == "circuit.json" else None)


def deep_tiny(tokenizer) -> LoadedModel:
    """The 6-layer tiny Llama with sharpened weights (heads with sizeable effects)."""
    m = tiny_llama(len(tokenizer), seed=3, layers=6, heads=4, kv_heads=2)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(3.0)
    return LoadedModel(m, tokenizer, resolve(m), "tiny-6")


def prompts(tokenizer, n: int = 4, boxes: int = 3):
    task = EntityTrackingTask(tokenizer, TaskConfig(n_boxes=boxes), seed=0)
    clean = task.sample(n)
    return clean, task.corrupt(clean)


SNAPSHOT = load_snapshot("cache_discovery_snapshot.json")


def test_paper_chain_cache_names_and_settings(tokenizer, tmp_path):
    from circuitdiff.methods import discovery
    from circuitdiff.methods.discovery import DiscoveryConfig

    for method in ("exact", "hybrid"):
        out = tmp_path / f"paper_{method}"
        discovery.run(deep_tiny(tokenizer), prompts(tokenizer),
                      DiscoveryConfig(**PAPER, method=method), store=out)
        assert snap(out) == SNAPSHOT[f"paper_{method}"], method
    out = tmp_path / "paper_task"
    discovery.run(deep_tiny(tokenizer), None, DiscoveryConfig(**PAPER, n_prompts=4, n_boxes=3),
                  store=out)
    assert snap(out) == SNAPSHOT["paper_task"]


def test_auto_chain_cache_names_and_settings(tmp_path):
    from circuitdiff.core.model import load_model
    from circuitdiff.methods import discovery
    from circuitdiff.methods.discovery import DiscoveryConfig

    base = load_model("organism:base")
    for method in ("exact", "hybrid"):
        out = tmp_path / f"auto_{method}"
        discovery.run(base, None, DiscoveryConfig(**AUTO, method=method), store=out)
        assert snap(out) == SNAPSHOT[f"auto_{method}"], method


def test_scan_cache_names_and_settings(tokenizer, tmp_path):
    from circuitdiff.methods import scan
    from circuitdiff.methods.scan import ScanConfig

    m = tiny_llama(len(tokenizer))
    tiny = LoadedModel(m, tokenizer, resolve(m), "tiny-llama")
    scan.run(tiny, None, ScanConfig(n_prompts=4, n_mean=4, n_boxes=3, roles=("last", "labels")),
             store=tmp_path / "scan")
    scan.run(tiny, None, ScanConfig(n_prompts=4, n_mean=4, n_boxes=3, seed=2),
             store=tmp_path / "scan_default")
    assert snap(tmp_path / "scan") == SNAPSHOT["scan"]
    assert snap(tmp_path / "scan_default") == SNAPSHOT["scan_default"]
    cfg = ScanConfig(n_prompts=4, n_mean=4, n_boxes=3, batch_size=2, max_rows=3)
    assert cfg.cache_key() == ScanConfig(n_prompts=4, n_mean=4, n_boxes=3).cache_key()
    # given prompts (not the config's sample) are part of the saved settings
    clean, _ = prompts(tokenizer, n=3)
    res = scan.run(tiny, clean, cfg, store=tmp_path / "given")
    assert res.n == 3 and res.settings["n_prompts"] == 3 and "prompts" in res.settings
    assert scan.run(tiny, clean, cfg).accuracy == res.accuracy  # no store: same numbers
