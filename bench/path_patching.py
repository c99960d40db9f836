"""Path patching: naive oracle vs the fast exact path, same process, same data.

Default (CPU): a random Llama with the paper's head grid (32 layers x 32 heads, head_dim 4,
hidden 128, GQA 8 kv heads), a word-level tokenizer, 7-box prompts, 50 samples, and one full
group: the Value Fetcher step (receiver = logits at last) or, with ``--step pt``, the Position
Transmitter step (receiver = q of 20 VF heads at last). The naive path costs exactly the same per
sender (one or two full forwards of every sample), so by default it is timed on
``--naive-senders`` senders spread over all layers and scaled to the full group
(``--naive-senders 0`` runs all of them); both are checked to agree on those senders.

    OMP_NUM_THREADS=1 python bench/path_patching.py [--step vf|pt] [-n 50]

``--device cuda --shape 7b``: random-init Llama-7B shape in bf16, 300 samples, the four groups at
20/5/10/5 with the fast path (``--all-groups`` does the same on CPU), then the chosen step fast vs
naive (naive on ``--naive-senders`` senders) for the ratio. Random weights have no real chain, so
the groups' receivers are paper-shaped (see :func:`paper_like_receivers`).
"""

from __future__ import annotations

import argparse
import time

import torch

from circuitdiff.core.toy import word_level_tokenizer


def build(shape: str, device: str, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from circuitdiff.core.arch import resolve
    from circuitdiff.core.model import LoadedModel

    if shape == "7b":
        cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                          max_position_embeddings=2048, pad_token_id=0)
        dtype = torch.bfloat16
    else:
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256,
                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                          head_dim=4, max_position_embeddings=256, pad_token_id=0,
                          initializer_range=0.1)
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


STEPS = ("vf", "pt", "pd", "sr")


def paper_like_receivers() -> list[list[tuple[int, int]]]:
    """Receivers of the four steps on a 32x32 grid: logits, 20 VF heads (layers 14-29), 5 PT
    heads (11-19), 10 PD heads (1-13) — the paper's robust heads, topped up with seeded picks."""
    from circuitdiff.core.circuit import parse_head

    g = torch.Generator().manual_seed(0)

    def group(robust: str, lo: int, hi: int, k: int) -> list[tuple[int, int]]:
        heads = [parse_head(h) for h in robust.split()]
        while len(heads) < k:
            h = (int(torch.randint(lo, hi + 1, (1,), generator=g)),
                 int(torch.randint(0, 32, (1,), generator=g)))
            if h not in heads:
                heads.append(h)
        return heads[:k]
    vf = group("15.13 21.3 24.5 20.14 18.8", 14, 29, 20)
    pt = group("14.27 11.23 12.23 19.12 13.0", 11, 19, 5)
    pd = group("10.3 13.14 9.2 9.7 11.23", 1, 13, 10)
    return [[], vf, pt, pd]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default="small", choices=["small", "7b"])
    ap.add_argument("--step", default="vf", choices=STEPS,
                    help="which group's step to compare (receivers as in paper_like_receivers)")
    ap.add_argument("--all-groups", action="store_true",
                    help="also time discovery over the four groups (implied by 7b)")
    ap.add_argument("-n", type=int, default=None, help="samples (default 50; 300 for 7b)")
    ap.add_argument("--naive-senders", type=int, default=64,
                    help="senders the naive path is timed on (0 = all)")
    ap.add_argument("--batch-size", type=int, default=None)
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)

    from circuitdiff.methods.discovery import PAPER_CHAIN
    from circuitdiff.methods.path_patching import all_heads, path_patching_scores
    from circuitdiff.core.task import EntityTrackingTask, TaskConfig

    tok = word_level_tokenizer()
    loaded = build(args.shape, args.device, len(tok))
    loaded.tokenizer = tok
    arch = loaded.arch
    n = args.n or (300 if args.shape == "7b" else 50)
    bs = args.batch_size or (32 if args.shape == "7b" else 50)
    task = EntityTrackingTask(tok, TaskConfig(n_boxes=7), seed=0)
    clean = task.sample(n)
    cf = task.corrupt(clean)
    print(f"{arch.describe()}, {args.device}, {n} samples, 7 boxes, "
          f"{len(tok(clean[0].text)['input_ids'])} tokens per prompt")

    heads = all_heads(arch)
    k = args.naive_senders or len(heads)
    pick = torch.randperm(len(heads), generator=torch.Generator().manual_seed(0))[:k]
    subset = [heads[i] for i in sorted(pick.tolist())]  # spread over layers and heads

    if args.shape == "7b" or args.all_groups:
        # random weights give no real chain (its top groups may all sit in layer 0), so each
        # step's receivers are paper-shaped: the robust heads of REFERENCE.md plus seeded picks
        # from the layers the paper reports; the cost of a step depends on where they sit
        recv = paper_like_receivers()
        total = 0.0
        for (group, position, kind), receivers in zip(PAPER_CHAIN, recv):
            _sync(args.device)
            t = time.perf_counter()
            path_patching_scores(loaded, clean, cf, position, receivers, kind or "q",
                                 batch_size=bs, progress=True, desc=group)
            _sync(args.device)
            dt = time.perf_counter() - t
            total += dt
            print(f"  fast {group} @ {position} ({len(receivers) or 'logits'} receivers): "
                  f"{dt:.1f} s")
        print(f"fast, four groups 20/5/10/5: {total:.1f} s")
    i = STEPS.index(args.step)
    group, position, kind = PAPER_CHAIN[i]
    step = (position, paper_like_receivers()[i], kind or "q")
    _sync(args.device)
    t = time.perf_counter()
    fast_vf = path_patching_scores(loaded, clean, cf, *step, batch_size=bs)
    _sync(args.device)
    t_vf = time.perf_counter() - t


    _sync(args.device)
    t = time.perf_counter()
    naive = path_patching_scores(loaded, clean, cf, *step, senders=subset, impl="naive",
                                 batch_size=bs, progress=False)
    _sync(args.device)
    t_naive = (time.perf_counter() - t) * len(heads) / len(subset)
    idx = torch.tensor(subset)
    diff = float((naive[idx[:, 0], idx[:, 1]] - fast_vf[idx[:, 0], idx[:, 1]]).abs().max())
    scale = float(fast_vf.abs().max())
    label = f"{args.step.upper()} ({group} @ {position}, {len(step[1]) or 'logits'} receivers)"
    how = "measured" if len(subset) == len(heads) else \
        f"measured on {len(subset)} senders, x{len(heads) / len(subset):g}"
    print(f"{label} step, {len(heads)} senders x {n} samples")
    print(f"  naive: {t_naive:8.1f} s  ({how})")
    print(f"  fast:  {t_vf:8.2f} s")
    print(f"  ratio: {t_naive / t_vf:8.1f} x")
    print(f"  max |fast - naive| over the {len(subset)} checked senders: {diff:.2e} "
          f"(scores up to {scale:.3f})")


if __name__ == "__main__":
    main()
