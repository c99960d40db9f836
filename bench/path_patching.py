"""Path patching: the naive oracle vs the fast exact path, same process, same data, reachable
senders only; measured speed-up next to the FLOP ratio, and the fast path's distance to the
machine's measured matmul throughput.

Default (CPU, one thread): a random Llama with the paper's head grid (32 layers x 32 heads,
head_dim 4, hidden 128, GQA 8 kv heads), a word-level tokenizer, 7-box prompts, 50 samples
(seed 0), and five steps with paper-shaped receivers (:func:`paper_like_receivers`):

* ``vf`` logits at last; ``pt`` q of 20 VF heads at last; ``pd`` v of 5 PT heads at query_label;
  ``sr`` v of 10 PD heads at prev_query_label (the paper chain);
* ``kv`` the automatic chain's k/v-at-an-early-role case: k of the 5 PT heads at ``labels``
  (every box's label, from the prompt's third token on: the suffix is nearly the whole prompt).

Only senders that can reach a receiver are scored (a sender at or above the last receiver
layer scores exactly 0; both paths skip it). The naive path costs the same per sender, so it is
timed on ``--naive-senders`` reachable senders spread over the layers and scaled; fast and naive
must agree on those to 1e-5.

FLOPs are counted from the shapes and every batch's positions (:func:`flop_counts`): the naive
path as its minimum (pass 1 up to the last receiver layer, pass 2 a full forward, logits at one
position); the fast path as what it runs (clean + counterfactual captures, one clean prefix
forward per suffix start, single-position pass 1, the suffix forward of pass 2 from each
sender's first reachable receiver layer). Attention counts causal query-key pairs.

    OMP_NUM_THREADS=1 python bench/path_patching.py [--steps vf,pt,pd,sr,kv] [-n 50]
    OMP_NUM_THREADS=1 python bench/path_patching.py --steps pd,sr --before /work/main/src

``--before SRC`` also times the fast path of the given steps with the package at ``SRC`` (an
older checkout's ``src``) against this checkout's, in child processes alternating new, old,
new, old (best of each), same data and threads.

``--device cuda --shape 7b``: random-init Llama-7B shape (32 x 32 heads, hidden 4096) in bf16,
300 samples, all steps; prints time per step, peak memory and the fraction of the FLOP floor
(FLOPs / measured bf16 matmul throughput). ``--shape tiny`` runs the same code path on a
2-layer model in seconds (a smoke check of the bench itself).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

STEPS = ("vf", "pt", "pd", "sr", "kv")


def build(shape: str, device: str, vocab: int, init_range: float = 0.1):
    from transformers import LlamaConfig, LlamaForCausalLM

    from circuitdiff.core.arch import resolve
    from circuitdiff.core.model import LoadedModel

    if shape == "7b":
        cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                          max_position_embeddings=2048, pad_token_id=0)
        dtype = torch.bfloat16 if device != "cpu" else torch.float32
    elif shape == "tiny":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=8, max_position_embeddings=256, pad_token_id=0,
                          initializer_range=0.1)
        dtype = torch.float32
    else:
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256,
                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                          head_dim=4, max_position_embeddings=256, pad_token_id=0,
                          initializer_range=init_range)
        dtype = torch.float32
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    return LoadedModel(model, None, resolve(model), f"random-{shape}")


def paper_like_receivers(n_layers: int = 32, n_heads: int = 32) -> dict[str, list]:
    """Receivers of each step: logits, 20 VF heads (layers 14-29), 5 PT heads (11-19), 10 PD
    heads (1-13) — the paper's robust heads topped up with seeded picks — scaled to other grids
    (``--shape tiny``). ``kv`` reuses the PT heads."""
    from circuitdiff.core.circuit import parse_head

    g = torch.Generator().manual_seed(0)

    def group(robust: str, lo: int, hi: int, k: int) -> list[tuple[int, int]]:
        scale = n_layers / 32
        lo, hi = max(1, int(lo * scale)), max(1, int(hi * scale))
        heads = [h for h in (parse_head(x) for x in robust.split())
                 if h[0] < n_layers and h[1] < n_heads] if n_layers == 32 else []
        k = min(k, (hi - lo + 1) * n_heads)
        while len(heads) < k:
            h = (int(torch.randint(lo, hi + 1, (1,), generator=g)),
                 int(torch.randint(0, n_heads, (1,), generator=g)))
            if h not in heads:
                heads.append(h)
        return heads[:k]
    vf = group("15.13 21.3 24.5 20.14 18.8", 14, 29, 20)
    pt = group("14.27 11.23 12.23 19.12 13.0", 11, 19, 5)
    pd = group("10.3 13.14 9.2 9.7 11.23", 1, 13, 10)
    return {"vf": [], "pt": vf, "pd": pt, "sr": pd, "kv": pt}


def step_spec(step: str, arch) -> tuple[str, list, str]:
    """(position, receivers, receiver kind) of a bench step."""
    recv = paper_like_receivers(arch.n_layers, arch.n_heads)[step]
    position, kind = {"vf": ("last", "q"), "pt": ("last", "q"), "pd": ("query_label", "v"),
                      "sr": ("prev_query_label", "v"), "kv": ("labels", "k")}[step]
    return position, recv, kind


def reachable(arch, receivers) -> list[tuple[int, int]]:
    end = max(l for l, _ in receivers) if receivers else arch.n_layers
    return [(l, h) for l in range(end) for h in range(arch.n_heads)]


# -- FLOPs -------------------------------------------------------------------------------------
def _layer_linear(arch, inter: int) -> int:
    """Multiply-adds x 2 of one decoder layer's projections and MLP, per token."""
    hid, H, kv, D = arch.hidden_size, arch.n_heads, arch.n_kv_heads, arch.head_dim
    return 2 * (hid * H * D + 2 * hid * kv * D + H * D * hid + 3 * hid * inter)


def _attn(arch, keys: torch.Tensor | int) -> float:
    """Attention FLOPs (scores and weighted values) for queries seeing ``keys`` keys each."""
    return 4.0 * arch.n_heads * arch.head_dim * float(torch.as_tensor(keys).sum())


def flop_counts(loaded, clean, cf, position, receivers, kind, senders, batch_size: int
                ) -> tuple[float, float]:
    """(naive FLOPs, fast FLOPs) of one step for ``senders``, from the shapes and each batch's
    padded length and role positions (see the module docstring)."""
    from circuitdiff.core.task import encode_pair
    from circuitdiff.methods.path_patching.common import role_positions

    arch = loaded.arch
    cfg = loaded.model.config
    inter, V = cfg.intermediate_size, cfg.vocab_size
    lin, L = _layer_linear(arch, inter), arch.n_layers
    hid = arch.hidden_size
    head = 2 * hid * V
    recv_layers = sorted({l for l, _ in receivers})
    last_recv = max(recv_layers) if recv_layers else L
    naive = fast = 0.0
    for i in range(0, len(clean), batch_size):
        bc, _ = encode_pair(clean[i:i + batch_size], cf[i:i + batch_size], loaded.tokenizer)
        B, T = bc.input_ids.shape
        p = role_positions(bc, position)
        P = p.shape[1]
        causal = torch.arange(1, T + 1)  # keys seen by each query of a full forward
        full = B * (T * lin * L + L * _attn(arch, causal))  # one forward, no logits
        # naive, per sender: pass 1 up to the last receiver layer, pass 2 full, logits at last
        per = B * (T * lin * last_recv + last_recv * _attn(arch, causal)) + full + B * head
        if not recv_layers:
            per = full + B * head
        naive += per * len(senders)
        # fast: clean and counterfactual captures (logits at last for the clean one)
        fast += 2 * full + B * head
        s = p.min(1).values
        if recv_layers:
            for sv in torch.unique(s).tolist():  # one clean prefix forward per suffix start
                fast += int((s == sv).sum()) / B * full + int((s == sv).sum()) * head
        for ls, _ in senders:
            if ls >= last_recv:
                continue
            # pass 1: sender's o_proj, then MLPs (and o_proj adds) up to the last receiver,
            # receiver projections at each receiver layer, on B*P rows
            rows = B * P
            o = 2 * arch.n_heads * arch.head_dim * hid
            mlp = 6 * hid * inter
            ends = last_recv if recv_layers else L
            units = arch.n_heads if kind == "q" else arch.n_kv_heads
            proj = 2 * hid * units * arch.head_dim
            fast += rows * (o + (ends - ls) * mlp + sum(proj for lr in recv_layers if lr > ls))
            if not recv_layers:
                fast += B * head
                continue
            first = min(lr for lr in recv_layers if lr > ls)
            layers = L - first
            for b in range(B):  # pass 2: suffix of sample b from its role's first token
                S = T - int(s[b])
                keys = torch.arange(int(s[b]) + 1, T + 1)
                fast += layers * (S * lin + _attn(arch, keys)) + head
    return naive, fast


def matmul_peak(device: str, dtype: torch.dtype) -> float:
    """Measured FLOP/s of a large square matmul (best of a few)."""
    n = 1024 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t = _clock()
        a @ b
        _sync(device)
        best = min(best, _clock() - t)
    return 2 * n ** 3 / best


#: the clock: CPU time of this process on a CPU (one thread: robust to other load on the
#: machine), wall time on a GPU
_clock = time.process_time


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _data(args, loaded):
    from circuitdiff.core.task import EntityTrackingTask, TaskConfig

    task = EntityTrackingTask(loaded.tokenizer, TaskConfig(n_boxes=7), seed=args.seed)
    clean = task.sample(args.n)
    return clean, task.corrupt(clean)


def _setup(args):
    from circuitdiff.core.toy import word_level_tokenizer

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    tok = word_level_tokenizer()
    loaded = build(args.shape, args.device, len(tok), args.init_range)
    loaded.tokenizer = tok
    return loaded


def time_fast(loaded, clean, cf, step: str, bs: int, device: str, **options):
    from circuitdiff.methods.path_patching import FastOptions, PatchRequest, path_patching_scores

    position, recv, kind = step_spec(step, loaded.arch)
    send = reachable(loaded.arch, recv)
    _sync(device)
    t = _clock()
    s = path_patching_scores(loaded, clean, cf, PatchRequest(position, recv, kind, send),
                             FastOptions(batch_size=bs, **options)).mean
    _sync(device)
    return s, _clock() - t


def child(args) -> None:
    """``--fast-only``: time the fast path of ``--steps`` with whatever package is on the path;
    one JSON line."""
    loaded = _setup(args)
    clean, cf = _data(args, loaded)
    out = {}
    for step in args.steps:
        s, dt = time_fast(loaded, clean, cf, step, args.batch_size, args.device)
        out[step] = {"s": dt, "checksum": float(s.double().abs().sum())}
    print(json.dumps(out))


def before_after(args, src: str) -> dict:
    """Fast-path times of ``args.steps`` with this checkout's package and with ``src``,
    alternating new, old, new, old in child processes; best of each."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "src")
    cmd = [sys.executable, os.path.abspath(__file__), "--fast-only", "--steps",
           ",".join(args.steps), "-n", str(args.n), "--seed", str(args.seed), "--device",
           args.device, "--shape", args.shape, "--batch-size", str(args.batch_size),
           "--threads", str(args.threads)]
    res: dict[str, dict[str, list]] = {"new": {}, "old": {}}
    for r in range(args.repeat):
        for label, path in (("new", os.path.abspath(here)), ("old", src)):
            env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(args.threads)}
            got = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            line = [x for x in got.stdout.splitlines() if x.startswith("{")][-1]
            for step, v in json.loads(line).items():
                res[label].setdefault(step, []).append(v)
                print(f"  [{label} run {r + 1}] {step}: {v['s']:.1f} s", flush=True)
    return res


#: the dense bf16 matmul peak assumed for the plan's expected time on CUDA (an H100/H200 SXM);
#: the plan prints the time at that peak and at 40 % of it
CUDA_BF16_PEAK = 989e12


def plan(args) -> dict:
    """FLOPs of every step (all reachable senders, from the shapes: the model is built on the
    meta device, no weights), the expected time and the expected peak memory."""
    from circuitdiff.core.toy import word_level_tokenizer

    tok = word_level_tokenizer()
    loaded = build(args.shape, "meta", len(tok), args.init_range)
    loaded.tokenizer = tok
    clean, cf = _data(args, loaded)
    arch, cfg = loaded.arch, loaded.model.config
    params = sum(p.numel() for p in loaded.model.parameters())
    width = 2 if args.shape == "7b" else 4  # bf16 on CUDA, float32 otherwise
    total = 0.0
    print(f"plan: {arch.describe()}, {params / 1e9:.2f} B parameters, {args.n} samples, "
          f"batch {args.batch_size}")
    for step in args.steps:
        position, recv, kind = step_spec(step, arch)
        send = reachable(arch, recv)
        _, f_fast = flop_counts(loaded, clean, cf, position, recv, kind, send, args.batch_size)
        total += f_fast
        print(f"  {step:>3} {position}+{kind if recv else 'logits'}: {len(send)} senders, "
              f"{f_fast / 1e12:.1f} TFLOP (fast path)")
    T = len(tok(clean[0].text)["input_ids"])
    B = min(args.batch_size, args.n)
    rows = 131072 if args.device.startswith("cuda") else 16384  # FastOptions.rows
    weights = params * width
    prefix_kv = 2 * arch.n_layers * B * arch.n_kv_heads * T * arch.head_dim * width
    captures = (4 * arch.n_layers * B * arch.n_heads * arch.head_dim
                + 2 * (arch.n_layers + 1) * B * arch.hidden_size) * 4
    acts = rows * (2 * arch.hidden_size + 2 * cfg.intermediate_size) * width
    peak = weights + prefix_kv + captures + acts
    print(f"  all steps: {total / 1e12:.1f} TFLOP; at {CUDA_BF16_PEAK / 1e12:.0f} TFLOP/s "
          f"(bf16 peak) {total / CUDA_BF16_PEAK:.1f} s, at 40 % of it "
          f"{total / (0.4 * CUDA_BF16_PEAK):.1f} s")
    print(f"  expected peak memory ~{peak / 2 ** 30:.1f} GiB: weights {weights / 2 ** 30:.1f}, "
          f"clean prefix KV {prefix_kv / 2 ** 30:.2f}, captures {captures / 2 ** 30:.2f}, one "
          f"stacked forward of {rows} rows {acts / 2 ** 30:.1f} (+ pass 2's attention scores, "
          f"capped at 30 % of free memory)")
    return {"tflop": total / 1e12, "peak_gib": peak / 2 ** 30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default="small", choices=["small", "7b", "tiny"])
    ap.add_argument("--steps", default=None, help=f"comma list of {','.join(STEPS)} (default "
                                                  f"all)")
    ap.add_argument("-n", type=int, default=None, help="samples (default 50; 300 for 7b)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init-range", type=float, default=0.1,
                    help="weight init std of the small shape (0.2: larger head effects, for "
                         "the exactness check; timings do not depend on it)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    ap.add_argument("--naive-senders", type=int, default=None,
                    help="reachable senders the naive path is timed on (0 = all; default 64, "
                         "8 for 7b)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--before", default=None, metavar="SRC",
                    help="also time the fast path with the package at SRC (old checkout's src)")
    ap.add_argument("--before-steps", default="pd,sr", help="steps timed by --before")
    ap.add_argument("--repeat", type=int, default=2, help="alternations for --before")
    ap.add_argument("--fast-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.steps = args.steps.split(",") if args.steps else list(STEPS)
    bad = [s for s in args.steps if s not in STEPS]
    if bad:
        ap.error(f"unknown steps {bad}; choose from {STEPS}")
    global _clock
    if args.device != "cpu":
        _clock = time.perf_counter
    args.n = args.n or (300 if args.shape == "7b" else 50)
    args.batch_size = args.batch_size or (32 if args.shape == "7b" else 50)
    if args.naive_senders is None:
        args.naive_senders = 8 if args.shape == "7b" else 64
    if args.fast_only:
        return child(args)
    if args.shape == "7b":
        plan(args)
        if not args.device.startswith("cuda"):
            print("bench/path_patching.py: the 7b shape needs a CUDA device (about 13 GiB of "
                  "bf16 weights and the TFLOPs above: hours on a CPU); run it with --device "
                  "cuda, or --shape tiny for a smoke check of the same code path on a CPU",
                  file=sys.stderr)
            sys.exit(2)

    from circuitdiff.methods.path_patching import FastOptions, PatchRequest, path_patching_scores

    loaded = _setup(args)
    arch = loaded.arch
    clean, cf = _data(args, loaded)
    dtype = next(loaded.model.parameters()).dtype
    peak = matmul_peak(args.device, dtype)
    T = len(loaded.tokenizer(clean[0].text)["input_ids"])
    print(f"{arch.describe()}, {args.device} ({args.threads} thread(s)), {dtype}, "
          f"{args.n} samples (seed {args.seed}), 7 boxes, ~{T} tokens per prompt, batch "
          f"{args.batch_size}; matmul peak {peak / 1e9:.1f} GFLOP/s")
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rows = []
    for step in args.steps:
        position, recv, kind = step_spec(step, arch)
        send = reachable(arch, recv)
        k = args.naive_senders or len(send)
        pick = torch.randperm(len(send), generator=torch.Generator().manual_seed(0))[:k]
        subset = [send[i] for i in sorted(pick.tolist())]
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        fast, t_fast = time_fast(loaded, clean, cf, step, args.batch_size, args.device)
        mem = torch.cuda.max_memory_allocated() / 2 ** 30 if args.device.startswith("cuda") \
            else float("nan")
        _sync(args.device)
        t = _clock()
        naive = path_patching_scores(loaded, clean, cf, PatchRequest(position, recv, kind, subset),
                                     FastOptions(impl="naive", batch_size=args.batch_size)).mean
        _sync(args.device)
        t_naive = (_clock() - t) * len(send) / len(subset)
        idx = torch.tensor(subset)
        diff = float((naive[idx[:, 0], idx[:, 1]] - fast[idx[:, 0], idx[:, 1]]).abs().max())
        f_naive, f_fast = flop_counts(loaded, clean, cf, position, recv, kind, send,
                                      args.batch_size)
        row = {"step": step, "position": position, "kind": kind if recv else "logits",
               "receivers": len(recv), "senders": len(send), "naive_s": t_naive,
               "fast_s": t_fast, "speedup": t_naive / t_fast, "flop_ratio": f_naive / f_fast,
               "fast_gflops": f_fast / 1e9, "achieved": f_fast / t_fast, "peak": peak,
               "max_abs_diff": diff, "scale": float(fast.abs().max()),
               "naive_on": len(subset), "peak_mem_gib": mem}
        rows.append(row)
        print(f"{step:>3} {position}+{row['kind']} ({len(recv) or 'logits'} receivers), "
              f"{len(send)} reachable senders: naive {t_naive:.1f} s (on {len(subset)}, "
              f"scaled), fast {t_fast:.2f} s, speed-up {row['speedup']:.1f}x, FLOP ratio "
              f"{row['flop_ratio']:.1f}x, fast {row['achieved'] / 1e9:.2f} GFLOP/s = "
              f"{100 * row['achieved'] / peak:.0f}% of matmul peak, |fast-naive| {diff:.1e}"
              + (f", peak mem {mem:.1f} GiB" if mem == mem else ""), flush=True)
    print("\n| step | role, receiver | senders | naive s | fast s | speed-up | FLOP ratio | "
          "speed-up / FLOP ratio | fast GFLOP/s (% of matmul peak) | "
          "max abs diff (max abs score) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['position']}, {r['kind']} | {r['senders']} | "
              f"{r['naive_s']:.1f} | {r['fast_s']:.2f} | {r['speedup']:.1f}x | "
              f"{r['flop_ratio']:.1f}x | {r['speedup'] / r['flop_ratio']:.2f} | "
              f"{r['achieved'] / 1e9:.2f} ({100 * r['achieved'] / r['peak']:.0f}%) | "
              f"{r['max_abs_diff']:.1e} ({r['scale']:.2g}) |")
    total = sum(r["fast_s"] for r in rows)
    floor = sum(r["fast_gflops"] for r in rows) * 1e9 / peak
    print(f"\nfast, all steps: {total:.1f} s; FLOP floor at the measured matmul peak "
          f"{floor:.1f} s ({100 * floor / total:.0f}% of it reached)")
    if args.before:
        print(f"\nbefore/after: fast path with {args.before} (old) vs this checkout (new)")
        args.steps = args.before_steps.split(",")
        res = before_after(args, args.before)
        for step in args.steps:
            new = min(v["s"] for v in res["new"][step])
            old = min(v["s"] for v in res["old"][step])
            same = abs(res["new"][step][0]["checksum"] - res["old"][step][0]["checksum"])
            print(f"| {step} | old {old:.1f} s | new {new:.1f} s | {old / new:.2f}x | "
                  f"|sum |score|| differs by {same:.1e} |")


if __name__ == "__main__":
    main()
