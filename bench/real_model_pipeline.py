"""Scan + discover + evaluate on the real Qwen2.5-Coder-0.5B at n 100, timed step by step.

    python bench/real_model_pipeline.py --out runs/qwen [--threads 2]

Runs the two commands a user runs (``circuitdiff discover``, whose automatic chain starts with
the position scan, then ``circuitdiff evaluate`` on held-out prompts) as subprocesses, and
prints the wall time of each and of the discovery's phases (``discovery.json``'s ``timings``:
validate, means, scan, edges, naming, sizing). The settings are the ones the README's "A real
model" section reports; the run folder resumes, so time a fresh ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MODEL = "qwen2.5-coder-0.5b"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/qwen")
    ap.add_argument("--threads", default="2")
    ap.add_argument("-n", default="100")
    args = ap.parse_args()
    out = Path(args.out)
    steps = {
        "discover": ["discover", "--model", MODEL, "-n", args.n, "--n-validate", args.n,
                     "--n-mean", args.n, "--n-scan", "50", "--scan-exact", "8",
                     "--scan-min-drop", "0.2", "--sizes", "8,4,4,4",
                     "--out", str(out / "discover")],
        "evaluate": ["evaluate", "--model", MODEL, "--circuit", str(out / "discover" / "circuit.json"),
                     "-n", args.n, "--n-mean", args.n, "--random-draws", "5", "--seed", "1",
                     "--out", str(out / "evaluate")],
    }
    times = {}
    for name, argv in steps.items():
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "circuitdiff", *argv, "--threads",
                               args.threads], text=True)
        times[name] = round(time.perf_counter() - start, 1)
        if proc.returncode:
            sys.exit(f"{name} failed (exit {proc.returncode})")
    phases = json.loads((out / "discover" / "discovery.json").read_text()).get("timings", {})
    total = sum(times.values())
    print(f"\n{MODEL}, n {args.n}, {args.threads} threads")
    for name, t in times.items():
        print(f"  {name:9s} {t:7.1f} s")
        if name == "discover":
            for k, v in phases.items():
                print(f"    {k:9s} {v:7.1f} s")
    print(f"  total     {total:7.1f} s ({total / 60:.1f} min)")
    (out / "timings.json").write_text(json.dumps({"steps": times, "discover_phases": phases,
                                                  "total_s": total}, indent=2))


if __name__ == "__main__":
    main()
