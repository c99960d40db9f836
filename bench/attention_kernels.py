"""Why SR-like path-patching steps stay attention-bound on a CPU: the attention variants pass 2
could use, at the bench's pass-2 shape, against the linear layers of the same rows.

Pass 2 of a step whose receivers sit early in the prompt (SR: ``prev_query_label``) runs every
sender's suffix (~27 tokens of 53 on the bench data) through every layer above its first
receiver. Its linear layers already run near the machine's matmul peak; what is left is the
attention over (prefix + suffix) keys, whose cost on a CPU is per score (an exp and a mask per
query-key pair), not per FLOP, when heads are small (the bench's head_dim 4). This script times,
in one process on one thread, one layer's worth of:

* ``fused (folded)``: what pass 2 runs on a CPU (``_tiled_attention``): one fused
  ``scaled_dot_product_attention`` call, the ``g`` query heads of a kv head folded into one block,
  a boolean mask;
* ``math``: matmul, softmax, matmul (the package's plain ``_attend``);
* ``split``: the prefix (shared by all senders, no mask) and the own suffix (causal) attended
  apart and merged by log-sum-exp (``_shared_prefix_attention``'s GPU path);
* ``compiled math`` (``--compile``): the math variant through ``torch.compile`` (inductor C++);
* the linear layers of the same rows (q, k, v, o, gate, up, down) and the matmul peak.

    OMP_NUM_THREADS=1 python bench/attention_kernels.py [--rows 16384] [--compile]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from circuitdiff.methods.path_patching.exact import _attend


def best_of(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=16384, help="suffix rows of one pass-2 chunk "
                                                           "(sender x sample x token)")
    ap.add_argument("--suffix", type=int, default=27, help="suffix tokens (S)")
    ap.add_argument("--prefix", type=int, default=26, help="prefix tokens (s)")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=256)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd math")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    S, s, H, kv, D = args.suffix, args.prefix, args.heads, args.kv_heads, args.head_dim
    g, T = H // kv, s + S
    NB = max(1, args.rows // S)  # stacked (sender, sample) rows
    Bg = 2                       # samples sharing one suffix start (the prefix is theirs)
    N = max(1, NB // Bg)
    NB = N * Bg
    scale = D ** -0.5
    q = torch.randn(NB, kv, g * S, D)
    k = torch.randn(NB, kv, T, D)
    v = torch.randn(NB, kv, T, D)
    k[:, :, :s] = k[:Bg, :, :s].repeat(N, 1, 1, 1)  # the prefix is the same for every sender
    v[:, :, :s] = v[:Bg, :, :s].repeat(N, 1, 1, 1)
    t = torch.arange(S)
    allowed = torch.cat([torch.ones(S, s, dtype=torch.bool), t[None, :] <= t[:, None]], 1)
    mask = allowed.repeat(g, 1)[None, None]                     # [1, 1, g*S, T]
    bias = torch.where(mask, 0.0, float("-inf"))

    def fused():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    def math(q=q, k=k, v=v, bias=bias):
        return _attend(q, k, v, bias, False, scale, fused=False)[0]

    kp, vp = k[:Bg, :, :s].contiguous(), v[:Bg, :, :s].contiguous()
    ks, vs = k[:, :, s:].contiguous(), v[:, :, s:].contiguous()

    def split():  # the shared-prefix path's arithmetic, with the fused kernel where it applies
        qp = q.view(N, Bg, kv, g * S, D).permute(1, 2, 0, 3, 4).reshape(Bg, kv, N * g * S, D)
        op, lp = _attend(qp, kp, vp, None, False, scale, fused=True)    # prefix: shared keys
        op = op.view(Bg, kv, N, g * S, D).permute(2, 0, 1, 3, 4).reshape(NB, kv, g * S, D)
        lp = lp.view(Bg, kv, N, g * S).permute(2, 0, 1, 3).reshape(NB, kv, g * S)
        qs = q.view(NB, kv, g, S, D).reshape(NB, H, S, D)                # own suffix: causal
        ke = ks[:, :, None].expand(NB, kv, g, S, D).reshape(NB, H, S, D)
        ve = vs[:, :, None].expand(NB, kv, g, S, D).reshape(NB, H, S, D)
        os_, ls = _attend(qs, ke, ve, None, True, scale, fused=True)
        os_, ls = os_.reshape(NB, kv, g * S, D), ls.reshape(NB, kv, g * S)
        both = torch.logaddexp(lp, ls)
        return op * torch.exp(lp - both)[..., None] + os_ * torch.exp(ls - both)[..., None]

    ref = fused()
    variants = [("fused (folded), what pass 2 runs", fused), ("math", math), ("split", split)]
    if args.compile:
        t0 = time.time()
        cm = torch.compile(math, dynamic=False)
        cm()
        print(f"(torch.compile took {time.time() - t0:.0f} s)")
        variants.append(("compiled math", cm))
    scores = NB * H * S * T
    print(f"one layer of one pass-2 chunk: {NB} (sender, sample) rows x {S} suffix tokens, "
          f"{H} heads ({kv} kv), head_dim {D}, {T} keys: {scores / 1e6:.1f} M query-key scores")
    base = None
    for name, fn in variants:
        err = float((fn() - ref).abs().max())
        dt = best_of(fn)
        base = base or dt
        print(f"  attention {name:34s} {dt * 1e3:7.1f} ms  {dt / scores * 1e9:5.2f} ns/score  "
              f"{base / dt:4.2f}x of fused  |diff| {err:.1e}")
    rows = NB * S
    x = torch.randn(rows, args.hidden)
    xi = torch.randn(rows, args.intermediate)
    lin = [("q", x, H * D), ("k", x, kv * D), ("v", x, kv * D), ("gate", x, args.intermediate),
           ("up", x, args.intermediate)]
    total_t = total_f = 0.0
    for name, inp, out in lin + [("o", torch.randn(rows, H * D), args.hidden),
                                 ("down", xi, args.hidden)]:
        w = torch.randn(out, inp.shape[1])
        dt = best_of(lambda: F.linear(inp, w))
        total_t += dt
        total_f += 2 * rows * inp.shape[1] * out
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    peak = 2 * 1024 ** 3 / best_of(lambda: a @ b, 5)
    print(f"  linear layers of the same rows          {total_t * 1e3:7.1f} ms  "
          f"{total_f / total_t / 1e9:5.1f} GFLOP/s = {100 * total_f / total_t / peak:.0f}% of the "
          f"matmul peak ({peak / 1e9:.1f} GFLOP/s, 1024^2 fp32)")
    print(f"  attention (fused) / linear layers: {base / total_t:.2f}")


if __name__ == "__main__":
    main()
