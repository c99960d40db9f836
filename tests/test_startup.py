"""Start-up: ``circuitdiff --help`` and argument errors import neither torch nor transformers
(issue 34: they answered in about 5 s, importing torch for a usage line). Run in fresh
interpreters, since this test process has torch imported already."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


#: the names ``circuitdiff`` exported before its exports became lazy (all must keep working)
EXPORTED = [
    "AccuracyConfig", "AccuracyResult", "AnalysisConfig", "Architecture", "ArchitectureError",
    "Circuit", "CircuitGroup", "DiscoveryConfig", "DiscoveryResult", "Edge", "EntityTrackingTask",
    "EvalConfig", "EvaluationResult", "FastOptions", "KnockoutConfig", "KnockoutCurve",
    "KnockoutResult", "LoadedModel", "ModelSpecError", "PatchRequest", "Prompt", "Read",
    "RunFolder", "Scores", "StopAfter", "StudyConfig", "TaskConfig", "TaskError", "Write",
    "accuracy", "answer_prob", "attribution_scores", "correct", "discovery", "encode",
    "encode_pair", "evaluate_accuracy", "evaluation", "intervene", "knockout", "knockout_curve",
    "last_logits", "load_model", "path_patching_scores", "resolve", "run_study", "run_with_edits"]


def _python(code: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_parser_and_bad_arguments_do_not_import_torch():
    proc = _python("""
import contextlib, io, sys
import circuitdiff.cli as c
c.build_parser()
bad = [["knockout", "-n", "-5"], ["discover", "--out", "x", "--z-threshold", "nan"],
       ["evaluate", "--circuit", "c.json", "--threshold", "inf"], ["study", "--random-draws", "-1"],
       ["eval", "--n-boxes", "1"], ["data", "-n", "100000000"], ["organisms", "train",
       "--scale", "nan"], ["cmap"], ["nonsense"]]
err = io.StringIO()
with contextlib.redirect_stderr(err):
    codes = [c.main(a) for a in bad]
assert codes == [2] * len(bad), (codes, err.getvalue())
assert len(err.getvalue().strip().splitlines()) == len(bad), err.getvalue()
heavy = [m for m in ("torch", "transformers", "peft", "matplotlib") if m in sys.modules]
assert not heavy, heavy
print("ok")
""")
    assert proc.stdout.strip() == "ok"


def test_help_does_not_import_torch():
    """``python -m circuitdiff --help`` (the module entry point), and each command's help."""
    proc = _python("""
import contextlib, io, runpy, sys
for argv in (["--help"], ["knockout", "--help"], ["eval", "--help"], ["--version"]):
    sys.argv = ["circuitdiff", *argv]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_module("circuitdiff", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            assert not e.code, e.code
    assert "circuitdiff" in out.getvalue()
assert "torch" not in sys.modules and "transformers" not in sys.modules
print("ok")
""")
    assert proc.stdout.strip() == "ok"


def test_lazy_exports_keep_every_name():
    """``import circuitdiff`` is light; every exported name still resolves (on first use)."""
    proc = _python(f"""
import sys
import circuitdiff
assert "torch" not in sys.modules
names = {EXPORTED!r}
assert set(names) <= set(circuitdiff.__all__)
for n in names:
    assert getattr(circuitdiff, n) is not None, n
from circuitdiff import Circuit, load_model, run_study, knockout, EvalConfig
from circuitdiff.methods import knockout as k
assert knockout is k and callable(knockout.run)
assert set(names) <= set(dir(circuitdiff))
try:
    circuitdiff.no_such_name
except AttributeError:
    pass
else:
    raise AssertionError("missing names must raise AttributeError")
print(len(names))
""")
    assert int(proc.stdout) == len(EXPORTED)


def test_heavy_helps_still_render():
    """The help texts computed on demand (study --steps, dcm --lambdas) render in full."""
    for argv, phrase in ((["study", "--help"], "paper_chain"), (["dcm", "--help"], "0.001")):
        proc = subprocess.run([sys.executable, "-m", "circuitdiff", *argv], capture_output=True,
                              text=True, timeout=120, env=ENV)
        assert proc.returncode == 0, proc.stderr
        assert phrase in " ".join(proc.stdout.split()), proc.stdout


def test_help_time(capsys):
    """Measured, not asserted (a loaded CI machine is slow): printed for the report."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "circuitdiff", "--help"], capture_output=True,
                   timeout=120, env=ENV, check=True)
    with capsys.disabled():
        print(f"\ncircuitdiff --help: {time.perf_counter() - start:.2f} s")
