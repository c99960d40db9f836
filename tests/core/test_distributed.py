"""Ranks under torchrun (gloo, 2 CPU processes): shares, ordered gathers, rank-0-only writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from circuitdiff.core.distributed import Ranks, share

SCRIPT = textwrap.dedent('''
    import json, os, sys, torch
    from circuitdiff.core import distributed as d
    from circuitdiff.core.runs import RunFolder
    r = d.init()
    out = sys.argv[1]
    mine = d.share(7)
    got = d.gather_cat(torch.arange(7)[mine.start:mine.stop] * 10)
    calls = []
    if r.rank == 1:  # rank 0 has saved by now: a rank deciding on its own would skip compute()
        import time; time.sleep(3)
    folder = RunFolder(out + "/run")
    res = folder.cached("x.json", {"a": 1}, lambda: calls.append(1) or {"rank0": d.decide(r.rank)})
    again = folder.cached("x.json", {"a": 1}, lambda: calls.append(1) or {"rank0": -1})
    t = folder.cached_tensors("t.safetensors", {"b": 2}, lambda: {"v": d.gather_cat(torch.ones(len(mine)))})
    from circuitdiff.core.runs import atomic_write_text
    atomic_write_text(f"{out}/written_by_rank{r.rank}.txt", "x")
    d.barrier()
    with open(f"{out}/rank{r.rank}.json", "w") as f:
        json.dump({"world": r.world, "got": got.tolist(), "res": res, "again": again,
                   "calls": len(calls), "t": t["v"].tolist()}, f)
''')


def test_shares_cover_the_range_in_rank_order():
    for n in (0, 1, 5, 7, 64):
        for world in (1, 2, 3, 8):
            parts = [share(n, Ranks(r, world)) for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_two_gloo_ranks_gather_in_order_and_only_rank0_writes(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--standalone", str(script), str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    for r in (r0, r1):
        assert r["world"] == 2
        assert r["got"] == [0, 10, 20, 30, 40, 50, 60]        # rank order, whole range
        assert r["res"] == r["again"] == {"rank0": 0}          # rank 0's value everywhere
        assert r["calls"] == 1                                 # computed once, then the cache
        assert r["t"] == [1.0] * 7
    saved = json.loads((tmp_path / "run" / "x.json").read_text())
    assert saved["result"] == {"rank0": 0}
    assert (tmp_path / "written_by_rank0.txt").exists()
    assert not (tmp_path / "written_by_rank1.txt").exists()
    leftovers = [p.name for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]
    assert not leftovers
