"""Every ``circuitdiff …`` command in README.md's fenced code blocks runs as written on the
shipped organisms (with small counts and a temporary working folder), in README order, so that
a command reading an earlier one's output (``dcm --circuit runs/study/discover/circuit.json``)
finds it. The ones that cannot run here are skipped by an explicit rule with its reason."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

#: commands left out, by a substring of the command line, each with why; every rule must
#: match a README command (a stale rule fails the test)
SKIP = {
    # the quick start installs packages and runs the whole default study (minutes); the study
    # on the organisms is the slow tier's tests/test_study_organisms.py, the install is CI's
    "pip install": "installs packages, then the whole default study",
    # a placeholder for the reader's own GGUF file; GGUF loading is tested on SmolLM2/Gemma-3
    # (tests/core, the slow tier) and on the real Qwen GGUF (the real_model tier)
    "path/to/model.gguf": "a placeholder path to the reader's own GGUF file",
    # the torchrun / --workers examples: 8 ranks on CUDA GPUs and 7B hub models; the same code
    # under 2 gloo ranks is tests/methods/test_distributed_methods.py
    "--device cuda": "needs CUDA GPUs and 7B models from the hub",
    # the real Qwen2.5-Coder-0.5B (six chunk packages, minutes to an hour per command on a CPU):
    # every method on it is the real_model tier's tests/test_real_model.py
    "qwen2.5-coder-0.5b": "the real Qwen GGUF, minutes per command; the real_model tier",
    # a 70B hub id spread over GPUs by accelerate; offloading is tested on a tiny model in
    # tests/methods/test_distributed_methods.py
    "meta-llama/": "a 70B model from the hub, over several GPUs",
}

#: small counts per command (a flag already on the line gets the value; otherwise it is added).
#: The discovery counts are tests/methods/test_auto_chain.py's, with which the organism's
#: lookback is found.
SMALL = {
    "eval": {"-n": "20"},
    "data": {"-n": "20"},
    "scan": {"-n": "20", "--n-mean": "20"},
    "discover": {"-n": "48", "--n-validate": "80", "--n-mean": "60", "--seed": "5"},
    "evaluate": {"-n": "20", "--n-mean": "20", "--random-draws": "2"},
    "knockout": {"-n": "20"},
    "study": {"-n": "20", "--n-discovery": "48", "--n-mean": "20", "--random-draws": "2",
              "--dcm-train": "20", "--no-screenshot": None},
    # DCM's masks need ~100 training prompts to move (at 40 none is selected, nothing to patch)
    "dcm": {"--n-train": "100", "--n-val": "50", "--n-test": "20", "--random-draws": "2"},
    "cmap": {"-n": "20", "--random-draws": "2", "--bootstrap": "50"},
}


def readme_commands(text: str) -> list[str]:
    """Every command line (continuations joined) in the README's non-Python fenced blocks
    that invokes circuitdiff, in order."""
    out, block, lang = [], None, ""
    for line in text.splitlines():
        if line.startswith("```"):
            if block is None:
                block, lang = [], line[3:].strip()
            else:
                if lang != "python":
                    out += _join_lines(block)
                block = None
            continue
        if block is not None:
            block.append(line)
    return [c for c in out if re.search(r"(^|\s|-m )circuitdiff(\s|$)", c)]


def _join_lines(lines: list[str]) -> list[str]:
    joined, cur = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        joined.append(cur + line)
        cur = ""
    return [j.strip() for j in joined if j.strip() and not j.strip().startswith("#")]


def skip_reason(command: str) -> str | None:
    hits = [reason for key, reason in SKIP.items() if key in command]
    return hits[0] if hits else None


def with_small_counts(command: str) -> list[str]:
    """The command's argv, `circuitdiff` replaced by this Python's ``-m circuitdiff`` and the
    counts made small."""
    argv = shlex.split(command, comments=True)
    assert argv[0] == "circuitdiff", command
    sub = argv[1]
    for flag, value in SMALL.get(sub, {}).items():
        if value is None:
            if flag not in argv:
                argv.append(flag)
        elif flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return [sys.executable, "-m", "circuitdiff", *argv[1:], "--quiet"]


def test_every_readme_command_is_run_or_skipped_for_a_reason():
    """The extraction itself (quick): every command either runs here (its subcommand has small
    counts) or matches a skip rule, and every skip rule still matches a README command."""
    commands = readme_commands(README.read_text())
    assert len(commands) >= 15
    used = set()
    for c in commands:
        reason = skip_reason(c)
        if reason is not None:
            used |= {k for k in SKIP if k in c}
            continue
        argv = shlex.split(c, comments=True)
        assert argv[0] == "circuitdiff", f"not runnable as written: {c}"
        assert argv[1] in SMALL, f"no small counts for {argv[1]!r}: {c}"
        assert not re.search(r"[\[\]…]|SPEC|path/to", " ".join(argv)), f"a placeholder in: {c}"
    assert used == set(SKIP), f"skip rules that match no README command: {set(SKIP) - used}"
    # the sections' own commands are all here
    run = {shlex.split(c, comments=True)[1] for c in commands if skip_reason(c) is None}
    assert run == {"eval", "data", "scan", "discover", "evaluate", "knockout", "study", "dcm",
                   "cmap"}


@pytest.mark.slow  # ~15 commands, two discoveries and the study's on the organisms (minutes)
def test_readme_commands_run_as_written(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    for c in readme_commands(README.read_text()):
        if skip_reason(c) is not None:
            continue
        proc = subprocess.run(with_small_counts(c), cwd=tmp_path, capture_output=True, text=True,
                              timeout=900, env=env)
        assert proc.returncode == 0, f"{c}\n{proc.stderr[-3000:]}"
    assert (tmp_path / "runs" / "study" / "discover" / "circuit.json").exists()
    assert (tmp_path / "runs" / "dcm" / "functional.json").exists()
    assert list((tmp_path / "runs" / "cmap").rglob("result.json"))
