"""The organism recipe's gates: a phase advances only on measured accuracy, and a recipe whose
binding never forms stops with a failure that names the stage and the measured value."""

from __future__ import annotations

import json
import re

import pytest
import torch

from circuitdiff.organisms.config import Gate, ModelSpec, Phase, Recipe, StageSpec, Targets
from circuitdiff.organisms.phases import GateTracker, train_phases
from circuitdiff.organisms.race import race_winner
from circuitdiff.organisms.recipe import RecipeFailed, train_all

TINY = ModelSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2)


def test_gate_needs_consecutive_probes_at_threshold():
    t = GateTracker(Gate(boxes=2, threshold=0.9, consecutive=2))
    assert [t.update(a) for a in (0.5, 0.95, 0.8, 0.92, 0.93)] == [False, False, False, False, True]


def test_phase_advances_only_when_the_probe_crosses_the_threshold():
    from circuitdiff.organisms.data import build_tokenizer
    from circuitdiff.organisms.models import make_model

    tok = build_tokenizer()
    model = make_model(tok, TINY, 0)
    script = iter([0.1, 0.5, 0.91, 0.2, 0.95, 0.96, 0.99, 0.99])  # passes at the 6th bind probe
    seen = []

    def probe(_model, boxes):
        if boxes == 2:
            seen.append(boxes)
            return next(script)
        return 0.0

    phases = (Phase("bind", (0, 1), 0.0, steps=20, lr=1e-3,
                    gate=Gate(boxes=2, threshold=0.9, consecutive=2, every=1)),
              Phase("grow", (0, 1, 1), 0.1, steps=2, lr=1e-3))
    records = train_phases(model, tok, phases, 0, probe, progress=False)
    bind, grow = records
    assert bind["passed"] is True and bind["passed_at"] == 6 and bind["steps"] == 6
    assert [p["acc2"] for p in bind["probes"]] == [0.1, 0.5, 0.91, 0.2, 0.95, 0.96]
    assert grow["steps"] == 2 and grow["passed"] is None


def test_progress_probes_run_every_show_every_steps_and_at_the_phase_end():
    """``show_every``: the 7-box probe the bind gate does not read runs at every ``show_every``-th
    step and at the probe that ends the phase; the gate still reads its own probe every time."""
    from circuitdiff.organisms.data import build_tokenizer
    from circuitdiff.organisms.models import make_model

    tok = build_tokenizer()
    calls = []

    def probe(_model, boxes):
        calls.append(boxes)
        return 0.95 if boxes == 2 and len([c for c in calls if c == 2]) >= 6 else 0.1

    bind = Phase("bind", (0, 1), 0.0, steps=20, lr=1e-3, show_every=4,
                 gate=Gate(boxes=2, threshold=0.9, consecutive=2, every=1))
    (record,) = train_phases(make_model(tok, TINY, 0), tok, (bind,), 0, probe, progress=False)
    assert record["passed_at"] == 7  # the 2-box probe reads 0.95 from step 6 on
    assert [p["step"] for p in record["probes"] if "acc7" in p] == [4, 7]
    assert [p["step"] for p in record["probes"] if "acc2" in p] == list(range(1, 8))
    assert calls.count(7) == 2


def test_phase_whose_gate_already_holds_is_skipped():
    """``check_at_start``: extend runs no steps when grow already reached the 7-box range, and
    runs (probing as usual) when it did not."""
    from circuitdiff.organisms.data import build_tokenizer
    from circuitdiff.organisms.models import make_model

    tok = build_tokenizer()
    reach = Gate(boxes=7, threshold=0.55, every=1, required=False)
    phases = (Phase("grow", (0, 1, 1), 0.1, steps=3, lr=1e-3, gate=reach),
              Phase("extend", (0, 1, 1, 1), 0.1, steps=4, lr=1e-3,
                    gate=Gate(boxes=7, threshold=0.55, every=2, required=False,
                              check_at_start=True)))
    for acc7, extend_steps in ((0.6, 0), (0.3, 4)):
        model = make_model(tok, TINY, 0)
        grow, extend = train_phases(model, tok, phases, 0,
                                    lambda _m, boxes: acc7 if boxes == 7 else 1.0,
                                    progress=False)
        assert grow["steps"] == (1 if acc7 >= 0.55 else 3)
        assert extend["steps"] == extend_steps
        assert [p["step"] for p in extend["probes"]] == ([0] if acc7 >= 0.55 else [0, 2, 4])
        assert extend["passed"] is (acc7 >= 0.55)
        assert extend["passed_at"] == (0 if acc7 >= 0.55 else None)

# (a) lr 0: the model never leaves chance, so the bind gate can never pass and grow never runs;
# (b) a grow floor nothing reaches: every attempt stalls at the floor step
NEVER_BINDS = ((Phase("bind", (0, 1), 0.0, steps=4, lr=0.0,
                      gate=Gate(boxes=2, threshold=0.9, every=2)),
                Phase("grow", (0, 1, 1), 0.1, steps=2, lr=1e-3)),
               r"base phase 'bind': 2-box accuracy 0\.\d+ < 0\.9 after 4 steps .*2 attempts",
               [4])
GROW_STALLS = ((Phase("bind", (0, 1), 0.0, steps=4, lr=1e-3,
                      gate=Gate(boxes=2, threshold=0.0, every=2)),
                Phase("grow", (0, 1, 1), 0.1, steps=10, lr=1e-3,
                      gate=Gate(boxes=7, threshold=0.6, every=2, required=False, floor=1.01,
                                floor_at=4))),
               r"base phase 'grow': 7-box accuracy 0\.\d+ < 1\.01 at step 4 \(stalled\) .*2 attempts",
               [2, 4])


@pytest.mark.parametrize("race", [1, pytest.param(2, marks=pytest.mark.slow)],
                         ids=["in-process", "raced"])
@pytest.mark.parametrize("phases, message, steps", [NEVER_BINDS, GROW_STALLS],
                         ids=["bind-never-passes", "grow-stalls"])
def test_base_that_fails_its_gate_is_retried_then_fails_loudly(tmp_path, phases, message, steps,
                                                               race):
    """A base whose bind never passes, or whose grow stalls under its floor, is retrained from
    the next sub-seed(s); when every attempt fails the recipe stops with the stage and the
    measured value, and writes no model. Raced, each attempt races two fresh sub-seeds."""
    recipe = Recipe(model=TINY, base_phases=phases, base_attempts=2, probe_n=8, bind_race=race)
    with pytest.raises(RecipeFailed, match=message):
        train_all(tmp_path, seed=0, progress=False, recipe=recipe, eval_n=8, threads=1)
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["ok"] is False and phases[len(steps) - 1].name in summary["failures"][0]
    base = summary["attempts"]["base"]
    assert [a["sub_seed"] for a in base] == ([1, 101] if race == 1 else [1, 201])
    if race == 2:
        assert [[lane["sub_seed"] for lane in a["race"]] for a in base] == [[1, 101], [201, 301]]
        # a bind nobody passes has no winner; a tie (both pass at step 2) goes to lane 0
        assert [[lane["won"] for lane in a["race"]] for a in base] == (
            [[False, False]] * 2 if len(steps) == 1 else [[True, False]] * 2)
        assert ("raced" in summary["failures"][0]) is (len(steps) == 1)
    for attempt in base:  # phases after the failed one never ran
        assert [p["steps"] for p in attempt["phases"]] == steps
        assert attempt["phases"][-1]["stalled_at"] == (4 if len(steps) == 2 else None)
    assert not (tmp_path / "base").exists() and not (tmp_path / "lora").exists()


def test_race_winner_is_decided_on_step_counts_not_on_arrival():
    """The lane that passed at the fewest steps wins (the lower lane on a tie), but only once no
    slower-running lane can still pass at fewer steps; -1 when every lane ended unpassed."""
    assert race_winner([300, 200], [300, None], [False, False]) is None  # lane 1 may pass at 200-300
    assert race_winner([300, 300], [300, None], [False, False]) == 0
    assert race_winner([300, 300], [None, 300], [False, False]) == 1
    assert race_winner([300, 200], [None, 200], [False, False]) == 1   # lane 0 was at 300, unpassed
    assert race_winner([200, 300], [None, 300], [False, False]) is None
    assert race_winner([300, 300], [300, 300], [False, False]) == 0    # tie: the lower lane
    assert race_winner([100, 300], [None, 300], [True, False]) == 1    # lane 0 ended unpassed
    assert race_winner([500, 500], [None, None], [True, True]) == -1
    assert race_winner([500, 400], [None, None], [True, False]) is None


@pytest.mark.slow  # two bind lanes to the gate (~3.5 min)
def test_raced_bind_hands_on_exactly_what_an_in_process_run_trains(tmp_path):
    """Oracle for the race: when lane 0 wins, the base (bind in a spawned one-thread lane, its
    weights and AdamW state handed back, grow here) is bit-identical to the base trained
    entirely in this process at one thread."""
    torch.set_num_threads(1)
    phases = (Phase("bind", (0, 1), 0.0, steps=6, lr=1e-3,
                    gate=Gate(boxes=2, threshold=0.0, every=3)),  # both lanes pass at step 3
              Phase("grow", (0, 1, 1), 0.1, steps=3, lr=1e-3))
    bases = {}
    for race in (1, 2):
        recipe = Recipe(model=TINY, base_phases=phases, probe_n=8, bind_race=race)
        train_all(tmp_path / str(race), seed=0, progress=False, recipe=recipe, eval_n=8,
                  threads=1, check_targets=False, scale=1.0)
        from circuitdiff.organisms.models import reload_model
        bases[race] = reload_model(tmp_path / str(race) / "base").state_dict()
        summary = json.loads((tmp_path / str(race) / "train_summary.json").read_text())
        (attempt,) = summary["attempts"]["base"]
        assert [p["steps"] for p in attempt["phases"]] == [3, 3]
    assert bases[1].keys() == bases[2].keys()
    assert all(torch.equal(bases[1][k], bases[2][k]) for k in bases[1])


@pytest.mark.slow  # three fine-tune attempts (~20 s)
def test_finetune_target_miss_is_retried_then_reported(tmp_path):
    # targets nothing can meet at this size: the base check is the first to say so
    recipe = Recipe(model=TINY, base_phases=(Phase("grow", (0, 1, 1), 0.1, steps=2, lr=1e-3),),
                    targets=Targets(base_min=0.0, base_max=1.0, finetune_gain=2.0),
                    stage_attempts=2, probe_n=8)
    with pytest.raises(RecipeFailed, match=r"full 7-box accuracy .* < base .* \+ 2\.0; 2 attempts"):
        train_all(tmp_path, seed=0, progress=False, recipe=recipe, eval_n=8, scale=0.01)
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["ok"] is False
    assert [a["sub_seed"] for a in summary["attempts"]["full"]] == [2, 102]
    # where it ran: trajectories differ across machines and library versions
    env = summary["environment"]
    assert env["versions"]["torch"] == torch.__version__
    assert env["cpu_count"] >= 1 and env["cpu"]


def test_targets_say_what_was_missed():
    t = Targets()
    assert t.missed("base", 0.6, None) is None
    assert "outside [0.5, 0.8]" in t.missed("base", 0.194, None)
    assert t.missed("lora", 0.75, 0.6) is None
    assert "< base 0.600 + 0.1" in t.missed("full", 0.65, 0.6)
    assert t.missed("chat", 0.63, 0.6) is None
    assert "within base" in t.missed("chat", 0.5, 0.6)


def test_phase_that_stalls_below_its_floor_ends_at_the_floor_step():
    """Grow's stall check: the first probe at or after ``floor_at`` under ``floor`` ends the phase
    as failed (``stalled_at``); at or above the floor the phase runs on to its cap."""
    from circuitdiff.organisms.data import build_tokenizer
    from circuitdiff.organisms.models import make_model

    tok = build_tokenizer()
    grow = (Phase("grow", (0, 1, 1), 0.1, steps=8, lr=1e-3,
                  gate=Gate(boxes=7, threshold=0.6, every=2, required=False,
                            floor=0.25, floor_at=3)),)
    for acc7, steps, stalled_at in ((0.2, 4, 4), (0.25, 8, None)):
        model = make_model(tok, TINY, 0)
        (record,) = train_phases(model, tok, grow, 0,
                                 lambda _m, boxes: acc7 if boxes == 7 else 1.0, progress=False)
        assert record["steps"] == steps and record["stalled_at"] == stalled_at
        assert record["passed"] is False
        assert [p["step"] for p in record["probes"]] == list(range(2, steps + 1, 2))


def test_only_the_first_probe_past_the_floor_step_can_stall():
    """A probe that drops under the floor after the floor step was passed does not stall the
    phase: the check is made once, at the first probe at or after ``floor_at``."""
    from circuitdiff.organisms.data import build_tokenizer
    from circuitdiff.organisms.models import make_model

    tok = build_tokenizer()
    grow = (Phase("grow", (0, 1, 1), 0.1, steps=8, lr=1e-3,
                  gate=Gate(boxes=7, threshold=0.6, every=2, required=False,
                            floor=0.25, floor_at=3)),)
    script = {2: 0.1, 4: 0.3, 6: 0.1, 8: 0.1}  # under the floor before and after step 4 only
    steps = iter(sorted(script))
    (record,) = train_phases(make_model(tok, TINY, 0), tok, grow, 0,
                             lambda _m, boxes: script[next(steps)] if boxes == 7 else 1.0,
                             progress=False)
    assert record["stalled_at"] is None and record["steps"] == 8
    assert [p["acc7"] for p in record["probes"]] == [0.1, 0.3, 0.1, 0.1]


def test_a_terminated_bind_lane_leaks_no_semaphore(tmp_path):
    """A losing lane is terminated; with ``lane_uses_thread_locks`` it leaves no named semaphore
    behind (without it Python warns of a leaked semaphore at exit)."""
    import subprocess
    import sys

    script = tmp_path / "lane.py"
    script.write_text('''
import multiprocessing as mp, sys, time

def lane(fix, ready):
    from tqdm.auto import tqdm
    if fix:
        from circuitdiff.organisms.race import lane_uses_thread_locks
        lane_uses_thread_locks()
    tqdm(range(3), disable=True)
    ready.set()
    time.sleep(120)

if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=lane, args=(sys.argv[1] == "1", ready), daemon=True)
    p.start()
    assert ready.wait(120)
    p.terminate()
    p.join()
''')
    runs = {fix: subprocess.run([sys.executable, str(script), fix], capture_output=True,
                                text=True, timeout=300) for fix in ("0", "1")}
    assert "leaked semaphore" in runs["0"].stderr  # the mechanism the fix is for
    assert runs["1"].returncode == 0 and "leaked semaphore" not in runs["1"].stderr


@pytest.mark.parametrize("make, field", [
    (lambda: Gate(boxes=2, threshold=float("nan")), "threshold"),
    (lambda: Gate(boxes=2, threshold=0.9, every=0), "every"),
    (lambda: Phase("bind", (0, 1), 0.0, steps=0, lr=1e-3), "steps"),
    (lambda: Phase("bind", (0, 1), float("inf"), steps=4, lr=1e-3), "other_weight"),
    (lambda: Targets(chat_band=float("nan")), "chat_band"),
    (lambda: Recipe(bind_race=0), "bind_race"),
], ids=["nan-threshold", "every-0", "steps-0", "inf-weight", "nan-band", "race-0"])
def test_recipe_settings_reject_impossible_values(make, field):
    """A NaN threshold compares false with everything and would silently never pass a gate; the
    settings refuse it (and zero steps or probes) with the field's name."""
    with pytest.raises(ValueError, match=field):
        make()


@pytest.mark.parametrize("make, message", [
    (lambda: StageSpec(steps=0, lr=1e-3), "StageSpec: steps must be >= 1, got 0"),
    (lambda: StageSpec(steps=10, lr=float("nan")), "StageSpec: lr must be a finite number"),
    (lambda: Phase("bind", (0, 1), 0.0, steps=10, lr=1e-3, batch_size=0),
     "Phase 'bind': batch_size must be >= 1, got 0"),
    (lambda: Phase("grow", (0, 1), float("inf"), steps=10, lr=1e-3),
     "Phase 'grow': other_weight must be a finite number"),
    (lambda: Gate(boxes=2, threshold=0.9, consecutive=0), "Gate: consecutive must be >= 1, got 0"),
])
def test_schedule_and_gate_settings_are_checked(make, message):
    """A stage's or a phase's schedule (one shared check) and a gate refuse counts below 1 and
    non-finite rates and weights, naming the owner and the field."""
    with pytest.raises(ValueError, match=re.escape(message)):
        make()
