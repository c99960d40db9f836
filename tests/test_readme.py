"""The README's code runs as written: the Development section's example method."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _block_after(marker: str) -> str:
    text = README.read_text()
    at = text.index(marker)
    return re.search(r"```python\n(.*?)```", text[at:], re.S).group(1)


def test_the_example_method_runs_caches_and_resumes(tiny, tmp_path):
    ns: dict = {}
    exec(compile(_block_after("Adding a method is one module"), "README example", "exec"), ns)
    cfg = ns["ChanceGapConfig"](n_prompts=8, n_boxes=3)
    assert "batch_size" not in cfg.cache_key()
    first = ns["run"](tiny, None, cfg, store=tmp_path)
    assert -1 / 3 <= first.gap <= 2 / 3 and first.model == tiny.name
    saved = (tmp_path / "chance_gap.json").read_text()
    mtime = (tmp_path / "chance_gap.json").stat().st_mtime_ns
    again = ns["run"](tiny, None, ns["ChanceGapConfig"](n_prompts=8, n_boxes=3, batch_size=2),
                      store=tmp_path)
    assert again == first and (tmp_path / "chance_gap.json").read_text() == saved
    assert (tmp_path / "chance_gap.json").stat().st_mtime_ns == mtime  # loaded, not rewritten
