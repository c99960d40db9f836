"""Path patching on 1 and 2 torch.distributed ranks (gloo, CPU, one thread each): the speed-up
of dealing the senders to ranks, and where the rest goes.

One path-patching step per case, run back to back in one invocation: for each case and each
worker count the script re-launches itself under torch's elastic launcher (what ``torchrun
--standalone --nproc-per-node W`` does). Every rank measures, and rank 0 prints:

* ``capture`` — the clean and counterfactual captures (rank 0 computes them and hands them to
  the others) and pass 2's clean prefix states, which every rank computes for itself (a call
  scoring one sender, on a fresh capture cache);
* ``scoring`` — this rank's share of the senders (the same call on the warm cache, minus the
  gather), per rank, wall and (in brackets) the rank's CPU seconds: the slowest rank sets the
  pace, and CPU seconds show the split even where other load leaves the ranks short of cores;
* ``gather`` — the all-gather of the per-sample scores (timed alone, same tensor sizes);
* ``total`` — the whole call on a fresh cache, what a user waits for; speed-up = 1-rank total /
  2-rank total.

Cases: the organism ``organism:base`` (4 layers x 8 heads, GQA 2 kv) with k receivers at every
box's label (long suffix: scoring dominates), and a random Llama with Qwen2.5-0.5B's layer
shapes (24 layers x 14 heads, 2 kv heads, hidden 896, MLP 4864; a small word-level vocabulary,
few prompts) with q receivers at ``last`` (pass 2 is one token: the captures weigh more).

    python bench/workers.py [--cases organism,qwen] [-n N] [--batch-size B] [--boxes 3] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid

import torch

CASES = ("organism", "qwen")


def build(case: str):
    from circuitdiff.core.arch import resolve
    from circuitdiff.core.model import LoadedModel, load_model

    if case == "organism":
        return load_model("organism:base")
    from transformers import LlamaConfig, LlamaForCausalLM

    from circuitdiff.core.toy import word_level_tokenizer

    tok = word_level_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=896, intermediate_size=4864,
                      num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                      head_dim=64, max_position_embeddings=512, pad_token_id=0,
                      initializer_range=0.05)
    model = LlamaForCausalLM(cfg).eval()
    return LoadedModel(model, tok, resolve(model), "qwen2.5-0.5b-shape")


def request(case: str, arch):
    from circuitdiff.methods.path_patching import PatchRequest

    L = arch.n_layers
    if case == "organism":  # k of the last layer's heads at every label: suffix ~ whole prompt
        return PatchRequest("labels", [(L - 1, 0), (L - 1, 3), (L - 2, 5)], "k")
    return PatchRequest("last", [(L - 1, h) for h in (0, 5, 9)] + [(L - 4, 2), (L - 8, 7)], "q")


def child(args) -> None:
    from circuitdiff.core import distributed as d
    from circuitdiff.core.task import EntityTrackingTask, TaskConfig
    from circuitdiff.methods.path_patching import CaptureCache, FastOptions, path_patching_scores
    from circuitdiff.methods.path_patching.common import PatchRequest

    torch.set_num_threads(1)
    r = d.init()
    loaded = build(args.case)
    task = EntityTrackingTask(loaded.tokenizer, TaskConfig(n_boxes=args.boxes), seed=0)
    clean = task.sample(args.n)
    cf = task.corrupt(clean)
    req = request(args.case, loaded.arch)
    n_senders = len(req.resolve(loaded.arch).senders)
    opts = FastOptions(batch_size=args.batch_size or args.n)
    clock = time.perf_counter

    def timed(fn):
        d.barrier()
        t = clock()
        out = fn()
        return out, clock() - t

    path_patching_scores(loaded, clean[:1], cf[:1], req, opts)  # warm-up: first-call costs
    scores, total = timed(lambda: path_patching_scores(loaded, clean, cf, req, opts))
    cache = CaptureCache()
    one = PatchRequest(req.position, req.receivers, req.kind, [(0, 0)])
    _, capture = timed(lambda: path_patching_scores(loaded, clean, cf, one, opts, cache=cache))
    t, c = clock(), time.process_time()
    path_patching_scores(loaded, clean, cf, req, opts, cache=cache)  # no barrier: own pace
    warm, warm_cpu = clock() - t, time.process_time() - c
    local = torch.zeros(len(d.dealt(n_senders)), args.n)
    _, gather = timed(lambda: d.gather_dealt(local, n_senders))
    per_rank = d.concat_shares([{"rank": r.rank, "warm": warm, "warm_cpu": warm_cpu,
                                 "capture": capture,
                                 "gather": gather, "total": total}])
    if r.main:
        with open(args.result, "w") as f:
            json.dump({"case": args.case, "world": r.world, "senders": n_senders,
                       "arch": loaded.arch.describe(), "ranks": per_rank,
                       "checksum": float(scores.mean.double().abs().sum())}, f)


def launch(args, case: str, workers: int) -> dict:
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    result = f"/tmp/circuitdiff-bench-workers-{uuid.uuid4().hex[:8]}.json"
    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=workers,
                       run_id=uuid.uuid4().hex[:8], rdzv_backend="c10d",
                       rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2)
    os.environ["OMP_NUM_THREADS"] = "1"
    elastic_launch(cfg, entrypoint=sys.executable)(
        os.path.abspath(__file__), "--child", "--case", case, "-n", str(args.n), "--boxes",
        str(args.boxes), "--batch-size", str(args.batch_size or args.n), "--result", result)
    with open(result) as f:
        out = json.load(f)
    os.unlink(result)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--workers", default="1,2", help="worker counts (default 1,2)")
    ap.add_argument("-n", type=int, default=None,
                    help="prompts (default: 48 on the organism, 6 on the Qwen shape)")
    ap.add_argument("--boxes", type=int, default=3, help="boxes per prompt (default 3)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="prompts per batch (default: all in one). With at least as many "
                         "batches as ranks, each rank scores every sender on its share of the "
                         "batches; with fewer, the senders are dealt")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    cases = args.cases.split(",")
    bad = [c for c in cases if c not in CASES]
    if bad:
        ap.error(f"unknown cases {bad}; choose from {CASES}")
    counts = [int(w) for w in args.workers.split(",")]
    n_given = args.n
    print(f"{args.boxes} boxes per prompt, one CPU thread per rank, gloo; "
          f"{os.cpu_count()} cores on this machine")
    print("| case | ranks | senders | total s | speed-up | capture s (every rank) | "
          "scoring s per rank (its CPU s) | gather s | scores equal |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case in cases:
        args.n = n_given or (48 if case == "organism" else 6)
        base = None
        for w in counts:
            res = launch(args, case, w)
            ranks = sorted(res["ranks"], key=lambda x: x["rank"])
            total = max(x["total"] for x in ranks)
            capture = max(x["capture"] for x in ranks)
            gather = max(x["gather"] for x in ranks)
            scoring = [(max(0.0, x["warm"] - x["gather"]), x["warm_cpu"]) for x in ranks]
            base = base or (total, res["checksum"])
            same = "yes" if res["checksum"] == base[1] else f"differs {res['checksum'] - base[1]:.1e}"
            batches = -(-args.n // (args.batch_size or args.n))
            print(f"| {case} ({res['arch']}), {args.n} prompts in {batches} batch"
                  f"{'es' if batches > 1 else ''} | {w} | {res['senders']} | "
                  f"{total:.2f} | "
                  f"{base[0] / total:.2f}x | {capture:.2f} | "
                  f"{', '.join(f'{s:.2f} ({c:.2f})' for s, c in scoring)} | {gather:.3f} | {same} |",
                  flush=True)


if __name__ == "__main__":
    main()
