"""The bad-input catalogue: every entry is one line on stderr naming the problem, exit code 2,
and nothing left in ``--out``. Plus two runs on one run folder end cleanly with one result set."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from circuitdiff.cli import main


def _truncate(src: Path, dst: Path, n_bytes: int) -> Path:
    with src.open("rb") as f:
        dst.write_bytes(f.read(n_bytes))
    return dst


@pytest.fixture()
def corrupt_folder(saved_models, tmp_path):
    base_dir, _ = saved_models
    bad = tmp_path / "corrupt"
    shutil.copytree(base_dir, bad)
    weights = next(bad.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return bad


@pytest.fixture()
def gguf_file(smollm2_path):
    return Path(smollm2_path)


def _run(argv, capsys):
    capsys.readouterr()  # drop what fixtures printed
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def _assert_bad(rc, err, phrase, out: Path | None = None):
    assert rc == 2
    assert len(err) == 1, err  # one line
    assert phrase in err[0], err[0]
    if out is not None:
        assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


CATALOGUE = [
    # (id, argv builder(ctx) -> argv, phrase)
    ("data-negative-n", lambda c: ["data", "-n", "-5", "--out", c["out"]], "at least 1"),
    ("knockout-negative-n", lambda c: ["knockout", "-n", "-5", "--out", c["out"]], "at least 1"),
    ("data-1-box", lambda c: ["data", "--n-boxes", "1", "--out", c["out"]], "between 3 and 25"),
    ("data-2-boxes", lambda c: ["data", "--n-boxes", "2", "--out", c["out"]], "between 3 and 25"),
    ("data-26-boxes", lambda c: ["data", "--n-boxes", "26", "--out", c["out"]], "absent"),
    ("knockout-reversed-layers", lambda c: ["knockout", "--layers", "3-1", "-n", "4",
                                            "--out", c["out"]], "write it low-high"),
    ("knockout-no-op-edge", lambda c: ["knockout", "--edge", "correct_object:last", "-n", "4",
                                       "--out", c["out"]], "blocks nothing"),
    ("device-gpu", lambda c: ["eval", "--device", "gpu", "-n", "4"], "unknown device 'gpu'"),
    ("adapter-on-adapter", lambda c: ["eval", "--model", "organism:lora", "--adapter",
                                      c["lora"], "-n", "4"], "is itself a LoRA adapter"),
    ("typo-organism", lambda c: ["eval", "--model", "organsm:base", "-n", "4"],
     "did you mean organism:base"),
    ("unknown-organism", lambda c: ["eval", "--model", "organism:bse", "-n", "4"],
     "unknown organism"),
    ("corrupt-safetensors", lambda c: ["eval", "--model", c["corrupt"], "-n", "4"],
     "truncated or corrupted"),
    ("out-is-a-file", lambda c: ["knockout", "-n", "4", "--out", c["file"]], "is a file"),
    ("circuit-groups-list", lambda c: ["evaluate", "--circuit", c["groups_list"], "--model",
                                       "organism:base", "--out", c["out"]], '"groups" must map'),
    ("circuit-json-array", lambda c: ["evaluate", "--circuit", c["array"], "--model",
                                      "organism:base", "--out", c["out"]], "the JSON is a list"),
    ("circuit-unknown-role", lambda c: ["evaluate", "--circuit", c["bad_role"], "--model",
                                        "organism:base", "--out", c["out"]], "unknown role"),
    ("study-negative-n", lambda c: ["study", "-n", "-5", "--out", c["out"]], "at least 1"),
    ("study-n-mean-0", lambda c: ["study", "--n-mean", "0", "--out", c["out"]], "n_mean"),
    ("out-read-only", lambda c: ["data", "-n", "4", "--out", "/proc/circuitdiff-test"],
     "not writable"),
    ("study-unknown-step", lambda c: ["study", "--steps", "discover,scna", "--out", c["out"]],
     "unknown step 'scna'; valid steps: accuracy, discover"),
    ("study-out-read-only", lambda c: ["study", "--out", "/proc/circuitdiff-study"],
     "not writable"),
    ("study-dcm-train-0", lambda c: ["study", "--dcm-train", "0", "--out", c["out"]],
     "at least 1"),
]


@pytest.mark.parametrize("case", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input(case, tmp_path, capsys, saved_models, corrupt_folder):
    _, build, phrase = case
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("not a folder")
    circuits = {"groups_list": '{"n_layers": 4, "n_heads": 8, "groups": [["1.0"]]}',
                "array": "[1, 2]",
                "bad_role": '{"n_layers": 4, "n_heads": 8, "groups": {"a": {"position": '
                            '"nowhere", "heads": ["1.0"]}}}'}
    for name, text in circuits.items():
        (tmp_path / f"{name}.json").write_text(text)
    ctx = {"out": str(tmp_path / "out"), "lora": str(saved_models[1]),
           **{name: str(tmp_path / f"{name}.json") for name in circuits},
           "corrupt": str(corrupt_folder), "file": str(a_file)}
    rc, err = _run(build(ctx), capsys)
    _assert_bad(rc, err, phrase, tmp_path / "out")
    assert a_file.read_text() == "not a folder"


@pytest.mark.parametrize("n_bytes", [1024, 20_000_000], ids=["1KB", "20MB"])
def test_truncated_gguf(gguf_file, tmp_path, capsys, n_bytes):
    bad = _truncate(gguf_file, tmp_path / "bad.gguf", n_bytes)
    rc, err = _run(["eval", "--model", str(bad), "-n", "4"], capsys)
    _assert_bad(rc, err, "truncated")


def test_unreachable_hub_id_fails_at_once(monkeypatch, capsys):
    import time

    import circuitdiff.core.specs as specs

    monkeypatch.setattr(specs, "hub_reachable", lambda timeout=3.0: False)
    start = time.perf_counter()
    rc, err = _run(["eval", "--model", "someone/no-such-model-xyz", "-n", "4"], capsys)
    _assert_bad(rc, err, "cannot be reached")
    assert "organism:base" in err[0]
    assert time.perf_counter() - start < 10
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.undo()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert specs.hub_reachable() is False


@pytest.mark.slow  # two CLI processes racing (~15 s)
def test_two_runs_on_one_folder_end_cleanly(saved_models, tmp_path):
    """Started together on one --out: the second waits for the lock, then resumes from the
    first's results; both exit 0 and the folder holds one result set and no temp files."""
    base_dir, _ = saved_models
    out = tmp_path / "shared"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "circuitdiff", "knockout", "--model", str(base_dir),
           "--n-boxes", "3", "-n", "6", "--out", str(out), "--quiet"]
    procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    results = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert not [r for r in results if r.endswith(".tmp")], results
    assert sum(r.endswith("curves.json") for r in results) == 1, results


@pytest.mark.slow  # two CLI processes, one waiting (~15 s)
def test_a_run_waits_for_the_lock(saved_models, tmp_path):
    """While another run holds the folder, a new run waits (says so, writes nothing) and then
    finishes once the folder is free."""
    import time

    from circuitdiff.core.runs import open_run_folder

    base_dir, _ = saved_models
    out = tmp_path / "held"
    cmd = [sys.executable, "-m", "circuitdiff", "knockout", "--model", str(base_dir),
           "--n-boxes", "3", "-n", "4", "--out", str(out), "--quiet"]
    with open_run_folder(out):
        proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stderr=subprocess.PIPE, text=True)
        time.sleep(8)
        assert proc.poll() is None  # still waiting
        assert not list(out.rglob("*.json"))
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 0, err
    assert "waiting for it to finish" in err
    assert list(out.rglob("curves.json"))


def test_lock_refuses_when_asked_not_to_wait(tmp_path):
    from circuitdiff.core.runs import RunFolderError, open_run_folder

    with open_run_folder(tmp_path / "r"):
        with pytest.raises(RunFolderError, match="another circuitdiff run"):
            with open_run_folder(tmp_path / "r", wait=False):
                pass
    with open_run_folder(tmp_path / "r", wait=False):  # released after the first block
        pass


def test_version_and_common_options(capsys):
    assert main(["--version"]) == 0 and "circuitdiff" in capsys.readouterr().out
    from circuitdiff.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        opts = p._option_string_actions
        if name != "organisms":
            assert {"--threads", "--json", "--quiet"} <= set(opts), name
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help text"
