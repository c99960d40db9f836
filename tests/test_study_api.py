"""``run_study`` from Python behaves as the CLI does: ``progress=False`` prints nothing (no
progress bar, transformers' weight-loading bars included) and the CLI's thread rule applies."""

from __future__ import annotations

import os

import torch


def test_run_study_progress_false_is_silent_and_sets_the_thread_rule(tmp_path, capfd,
                                                                    monkeypatch):
    from circuitdiff import StudyConfig, run_study
    from circuitdiff.core.model import default_threads
    from circuitdiff.methods.evaluation import EvalConfig

    torch.set_num_threads(2)
    s = run_study(["organism:base"], out=tmp_path / "quiet",
                  cfg=StudyConfig(evaluation=EvalConfig(n_prompts=10, n_mean=10),
                                  steps=("accuracy",)),
                  progress=False, log=lambda line: None)
    assert s["accuracy"]["organism:base"]["n"] == 10
    out, err = capfd.readouterr()
    assert out == "" and "Loading weights" not in err and "it/s" not in err, (out, err)
    # the organisms are small: one thread, as `circuitdiff study` would set
    assert torch.get_num_threads() == 1
    # a model over 20M parameters gets every core (one rank on this machine)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_threads(torch.nn.Linear(10_000, 2_001)) == max(1, os.cpu_count() or 1)
