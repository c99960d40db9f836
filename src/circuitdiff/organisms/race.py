"""The bind race: several initialisations train the first base phase at once, in spawned
one-thread processes (lanes); the first to pass its gate, counted in steps, goes on."""

from __future__ import annotations

from pathlib import Path

import torch

from circuitdiff.organisms import data as D
from circuitdiff.organisms.config import ModelSpec, Phase
from circuitdiff.organisms.evaluate import accuracy
from circuitdiff.organisms.models import make_model
from circuitdiff.organisms.phases import train_phases


def race_winner(reached: list[int], passed_at: list[int | None], finished: list[bool]) -> int | None:
    """Which lane of a bind race has won, as soon as that is certain.

    The winner is the lane whose gate passed at the fewest steps (the lower lane on a tie), so
    the result does not depend on how fast each process happened to run. ``reached[i]``: the
    step of lane i's latest probe; ``passed_at[i]``: where its gate passed (None: not yet);
    ``finished[i]``: it ended without passing (cap or stall). Returns the lane, -1 when every lane
    finished without passing, None while a lane that could still pass earlier is behind.
    """
    passed = [(at, i) for i, at in enumerate(passed_at) if at is not None]
    if not passed:
        return -1 if all(finished) else None
    at, lane = min(passed)
    for j, r in enumerate(reached):
        if passed_at[j] is None and not finished[j] and r < at:
            return None  # lane j has not been probed at step ``at`` yet: it may still pass there
    return lane


def lane_uses_thread_locks() -> None:
    """Give tqdm a threading lock in a bind lane. A spawned process makes multiprocessing
    objects with named semaphores, and tqdm creates one for its lock; a lane that loses the race
    is terminated before it can unlink it, and Python then warns of a "leaked semaphore" at exit.
    A lane has no child processes, so a threading lock is all its bars need."""
    import threading

    from tqdm.auto import tqdm

    tqdm.set_lock(threading.RLock())


def _bind_lane(lane: int, sub_seed: int, model_spec: ModelSpec, phase: Phase, probe_n: int,
               probe_seed: int, stop_on_failure: bool, queue, state_path: str) -> None:
    """One lane of the bind race, in its own process at one torch thread: trains ``phase`` from
    the initialisation of ``sub_seed``, reports every probe, and saves its weights and optimizer
    state when the phase ends."""
    try:
        torch.set_num_threads(1)
        lane_uses_thread_locks()
        tok = D.build_tokenizer()
        model = make_model(tok, model_spec, sub_seed)
        probe = lambda m, boxes: accuracy(m, tok, probe_n, probe_seed, n_boxes=boxes)  # noqa: E731
        report = lambda record: queue.put(("probe", lane, record["probes"][-1],  # noqa: E731
                                           record["passed_at"]))
        opt: list = []
        (record,) = train_phases(model, tok, (phase,), sub_seed, probe, progress=False,
                                 stop_on_failure=stop_on_failure, on_probe=report,
                                 optimizer_out=opt)
        torch.save({"model": model.state_dict(), "optimizer": opt[0].state_dict()}, state_path)
        queue.put(("done", lane, record, None))
    except BaseException as e:  # the parent raises it
        import traceback
        queue.put(("error", lane, f"{type(e).__name__}: {e}\n{traceback.format_exc()}", None))


def race_bind(tokenizer, model_spec: ModelSpec, phase: Phase, sub_seeds: list[int], probe_n: int,
              probe_seed: int, progress: bool = True, stop_on_failure: bool = True):
    """Race several initialisations through the bind phase; keep the first to bind.

    Whether binding forms within the cap depends on the initialisation (measured: one never
    bound under six variations of the phase, while others bound at 1600-4100 steps), so a base
    attempt trains ``len(sub_seeds)`` of them at once, each in a spawned process at one torch
    thread (on this 2-core CPU two 1-thread processes do 1.4x the steps of one 2-thread
    process). The winner is chosen by :func:`race_winner` on step counts, never on wall time,
    and each lane runs at one thread, so the result is the same on any machine load or thread
    count. Returns ``(model, optimizer_state, record, lanes)``: the winner's model, AdamW state
    and phase record (when no lane passed: lane 0's, whose record says it failed), and one
    summary per lane.
    """
    import multiprocessing as mp
    import queue as queue_mod
    import tempfile

    from tqdm.auto import tqdm

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    n = len(sub_seeds)
    reached, passed_at, finished = [0] * n, [None] * n, [False] * n
    last: list[dict] = [{} for _ in range(n)]
    records: list[dict | None] = [None] * n
    with tempfile.TemporaryDirectory(prefix="circuitdiff-bind-") as tmp:
        paths = [str(Path(tmp) / f"lane{i}.pt") for i in range(n)]
        procs = [ctx.Process(target=_bind_lane, daemon=True,
                             args=(i, s, model_spec, phase, probe_n, probe_seed, stop_on_failure,
                                   q, paths[i]))
                 for i, s in enumerate(sub_seeds)]
        bar = tqdm(total=phase.steps, desc=f"base:{phase.name} race {sub_seeds}",
                   disable=not progress, mininterval=2.0)
        try:
            for p in procs:
                p.start()
            winner = None
            while winner is None or (winner >= 0 and records[winner] is None):
                try:
                    kind, lane, payload, at = q.get(timeout=5.0)
                except queue_mod.Empty:
                    dead = [i for i, p in enumerate(procs)
                            if p.exitcode not in (None, 0) and records[i] is None]
                    if dead:
                        raise RuntimeError(f"bind lane {dead[0]} (sub-seed {sub_seeds[dead[0]]}) "
                                           f"died with exit code {procs[dead[0]].exitcode}")
                    continue
                if kind == "error":
                    raise RuntimeError(f"bind lane {lane} (sub-seed {sub_seeds[lane]}) failed: "
                                       f"{payload}")
                if kind == "probe":
                    reached[lane], passed_at[lane], last[lane] = payload["step"], at, payload
                    bar.n = max(reached)
                    bar.set_postfix({f"s{sub_seeds[i]}": f"{last[i].get('acc2', 0):.2f}"
                                     for i in range(n)})
                else:  # done: a lane that did not pass has finished for good
                    records[lane] = payload
                    finished[lane] = not payload["passed"]
                    reached[lane] = max(reached[lane], payload["steps"])
                if winner is None:
                    winner = race_winner(reached, passed_at, finished)
            bar.close()
            lanes = [{"sub_seed": s, "steps": reached[i], "passed_at": passed_at[i],
                      "won": i == winner, "last_probe": last[i]}
                     for i, s in enumerate(sub_seeds)]
            winner = max(winner, 0)  # no lane passed: lane 0's failed phase goes on the record
            state = torch.load(paths[winner], weights_only=True)
        finally:
            started = [p for p in procs if p.pid is not None]
            for p in started:
                if p.is_alive():
                    p.terminate()
            for p in started:
                p.join(timeout=10)
            q.close()  # release the queue's feeder thread before the next race
            q.join_thread()
    model = make_model(tokenizer, model_spec, sub_seeds[winner])
    model.load_state_dict(state["model"])
    return model, state["optimizer"], records[winner], lanes


__all__ = ["lane_uses_thread_locks", "race_bind", "race_winner"]
