"""The outer splits under torchrun (gloo, 2 CPU ranks): the evaluation's (model, circuit) pairs,
DCM's groups and CMAP's directions — each rank computes its share alone, the pieces are gathered
in a fixed order, and the result and the run folder equal one process's. A piece cached by an
earlier run is reused whichever rank it falls to (rank 0 hands its saved files out first)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from test_distributed_methods import _torchrun

#: the per-piece wall times and the other volatile fields, left out of the comparison
VOLATILE = {"seconds", "run"}

SPLIT = textwrap.dedent('''
    import json, sys, torch
    from pathlib import Path
    torch.set_num_threads(1)
    from circuitdiff.core import distributed as d
    r = d.init()
    from test_distributed_split import compute_split, tamper
    out = Path(sys.argv[1])
    first = compute_split(out)
    d.barrier()
    if r.main:
        tamper(out)  # marks pieces that fall to rank 1 in the saved folder
    d.barrier()
    again = compute_split(out)
    if r.main:
        torch.save({"first": first, "again": again}, out / "results.pt")
''')


PIECES = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path
    from circuitdiff.core import distributed as d
    from circuitdiff.core.runs import RunFolder, split_pieces
    r = d.init()
    out = Path(sys.argv[1])
    folder = RunFolder(out / "run")
    # a piece an earlier run saved (every rank calls: rank 0 decides): it falls to rank 1
    folder.cached("p/4.json", {"i": 4}, lambda: {"i": 4, "by": "earlier run"})
    calls, seen = [], []

    def piece(i, store):
        inner = d.share(10)  # alone: the whole range, no collective
        return store.cached(f"p/{i}.json", {"i": i}, lambda: calls.append(i) or {
            "i": i, "by": os.environ["RANK"], "inner": [inner.start, inner.stop]})

    got = split_pieces(folder, 5, piece, cached_under=["p/"],
                       then=lambda i, v: seen.append(i))
    d.barrier()
    with open(out / f"rank{r.rank}.json", "w") as f:
        json.dump({"got": got, "calls": calls, "seen": seen}, f)
''')


def test_pieces_split_in_order_rank0_writes_and_cached_pieces_reach_any_rank(tmp_path):
    """split_pieces on 2 gloo ranks, no model: contiguous shares computed alone, gathered in
    order on both ranks, ``then`` in order after the gather, rank 1's new piece saved by rank
    0, and a piece saved earlier read by rank 1 from rank 0's snapshot (not recomputed)."""
    script = tmp_path / "pieces.py"
    script.write_text(PIECES)
    proc = _torchrun(script, tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    want = [{"i": i, "by": "0" if i < 3 else "1", "inner": [0, 10]} for i in range(4)]
    want.append({"i": 4, "by": "earlier run"})
    assert r0["got"] == r1["got"] == want
    assert r0["calls"] == [0, 1, 2] and r1["calls"] == [3]
    assert r0["seen"] == r1["seen"] == list(range(5))
    for i in range(5):
        saved = json.loads((tmp_path / "run" / "p" / f"{i}.json").read_text())
        assert saved["result"] == want[i]


def _organism_circuits():
    from circuitdiff.core.circuit import Circuit, CircuitGroup

    return {"c1": Circuit({"vf": CircuitGroup([(l, h) for l in (1, 2, 3) for h in range(8)],
                                              "last"),
                           "pd": CircuitGroup([(l, h) for l in (0, 1) for h in range(0, 8, 2)],
                                              "query_label")}, 4, 8),
            "c2": Circuit({"vf": CircuitGroup([(l, h) for l in (2, 3) for h in range(6)],
                                              "last")}, 4, 8)}


def _plain(d):
    """``d`` without its volatile fields (wall times), recursively."""
    if isinstance(d, dict):
        return {k: _plain(v) for k, v in d.items() if k not in VOLATILE}
    if isinstance(d, list):
        return [_plain(v) for v in d]
    return d


def compute_split(out: Path) -> dict:
    """Evaluation (2 models x 2 circuits, completeness, minimality), DCM (2 groups) and CMAP
    (both directions) on the organisms (tiny GQA models, a LoRA fine-tune), and the study's
    per-model steps, each cached in its own run folder under ``out``: run on every rank, or in
    one process."""
    from circuitdiff.core.pool import ModelPool
    from circuitdiff.core.runs import RunFolder
    from circuitdiff.methods import cmap, dcm, evaluation
    from circuitdiff.methods.cmap import CMAPConfig
    from circuitdiff.methods.dcm import DCMConfig
    from circuitdiff.methods.evaluation import AnalysisConfig, EvalConfig

    from circuitdiff.core.model import load_model

    res = {}
    # the organisms (tiny trained GQA models, a LoRA fine-tune): a random model is at chance
    ecfg = EvalConfig(n_prompts=12, n_mean=12, n_random=2, batch_size=8, max_rows=16,
                      keep_other_positions=True, circuits=_organism_circuits(),
                      analyses=AnalysisConfig(completeness=True, n_halves=1, minimality=True))
    ev = evaluation.run(ModelPool(["organism:base", "organism:lora"]), None, ecfg,
                        store=RunFolder(out / "evaluate"))
    res["evaluate"] = ev.to_dict()
    lora = load_model("organism:lora")
    dcfg = DCMConfig(circuit=ecfg.circuits["c1"], n_train=8, n_val=4, n_test=4,
                     lambdas=(0.01, 0.1), n_random=2, batch_size=4, epochs=1)
    res["dcm"] = dcm.run(lora, None, dcfg, store=RunFolder(out / "dcm")).to_dict()
    ccfg = CMAPConfig(n_prompts=12, random_draws=2, bootstrap=50, batch_size=6, max_rows=40,
                      circuit=ecfg.circuits["c1"], reverse=True)
    res["cmap"] = cmap.run(lora, None, ccfg, store=RunFolder(out / "cmap")).to_dict()
    res["study"] = study_steps(out / "study", ecfg.circuits["c1"])
    return _plain(res)


def study_steps(out: Path, circuit) -> dict:
    """The study's per-model steps (accuracy, knockout; CMAP per fine-tune) on the base and two
    fine-tunes, on a given circuit (nothing discovered)."""
    from circuitdiff.core.model import load_model
    from circuitdiff.core.runs import RunFolder
    from circuitdiff.methods.cmap import CMAPConfig
    from circuitdiff.methods.evaluation import EvalConfig
    from circuitdiff.study.config import StudyConfig
    from circuitdiff.study.runner import StudyRun
    from circuitdiff.study.steps import STEP_BY_NAME

    cfg = StudyConfig(evaluation=EvalConfig(n_prompts=40, n_mean=8), knockout_prompts=6,
                      cmap=CMAPConfig(n_prompts=12, random_draws=2, bootstrap=50))
    st = StudyRun(["organism:base", "organism:lora", "organism:full"], load_model,
                  RunFolder(out), cfg, False, lambda line: None, (circuit, "given"))
    for name in ("accuracy", "discover", "knockout", "cmap"):
        STEP_BY_NAME[name].run(st)
    return st.results


#: the pieces rank 1 computes with 2 ranks (the second half of each contiguous split): the run
#: folder, its files, and the field ``tamper`` marks in their saved result
TAMPERED = [("evaluate", "evaluate/*lora*/c2.json", "full"),
            ("dcm", "dcm/*/pd.json", "no_patch"),
            ("cmap", "cmap/*__*.json", "source_accuracy")]
MARK = 123.0


def tamper(out: Path) -> None:
    """Write ``MARK`` into the saved pieces of ``TAMPERED`` (DCM: its first row; CMAP: the
    base -> fine-tune direction), settings left alone, so a rerun reads them back as marked."""
    from circuitdiff.methods.cmap import REVERSE

    for folder, pattern, field in TAMPERED:
        for p in (out / folder).glob(pattern):
            saved = json.loads(p.read_text())
            result = saved["result"]
            assert saved["_settings_digest"]  # a cached piece, read back by its settings
            if isinstance(result, list):
                result = result[0]
            elif result.get("direction", REVERSE) != REVERSE:
                continue
            result[field] = MARK
            p.write_text(json.dumps(saved))


def _saved(folder: Path) -> dict:
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.suffix == ".json":
            out[rel] = _plain(json.loads(p.read_text()))
        elif p.suffix == ".safetensors":
            from safetensors.torch import load_file

            out[rel] = load_file(p)
        elif p.is_file():
            out[rel] = p.read_bytes()
    return out


def _equal(a, b, path=""):
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            _equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, (path, a, b)  # bit-identical: each piece's math is one process's


@pytest.mark.slow  # two torchrun ranks computing everything twice, then one process (~70 s)
def test_evaluation_dcm_cmap_split_over_two_ranks_equal_one_process(tmp_path):
    script = tmp_path / "split.py"
    script.write_text(SPLIT)
    two_dir, one_dir = tmp_path / "two", tmp_path / "one"
    proc = _torchrun(script, two_dir, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = torch.load(two_dir / "results.pt")
    saved_two = _saved(two_dir)  # after the tampering
    torch.set_num_threads(1)
    one = compute_split(one_dir)
    # every piece computed, gathered in order: the results and the saved folders are identical
    assert len(one["evaluate"]["rows"]) == 4 and len(one["cmap"]["directions"]) == 2
    assert len({r["circuit_accuracy"] for r in one["evaluate"]["rows"]}) > 1  # not all at chance
    assert {r["group"] for r in one["dcm"]["rows"]} == {"vf", "pd"}
    assert one["cmap"]["directions"][0]["source_accuracy"] > 0
    assert set(one["study"]["knockout"]) == {"organism:base", "organism:lora", "organism:full"}
    assert [("skipped" in one["study"]["cmap"][s]) for s in ("organism:lora", "organism:full")
            ] == [False, False]  # both fine-tunes patched: one on each rank
    _equal(one, two["first"])
    tamper(one_dir)
    _equal(_saved(one_dir), {k: v for k, v in saved_two.items() if k != "results.pt"})
    # the rerun reads every piece from the folder, rank 1's share from rank 0's snapshot
    again = two["again"]
    assert [r["full"] == MARK for r in again["evaluate"]["rows"]] == [False] * 3 + [True]
    assert next(r for r in again["dcm"]["rows"] if r["group"] == "pd")["no_patch"] == MARK
    assert [d["source_accuracy"] for d in again["cmap"]["directions"]][1] == MARK
    assert again["dcm"]["rows"][0] == one["dcm"]["rows"][0]
