"""Plateau probe on a synthetic vocabulary: when does box-label binding emerge?

Sequences mimic the evaluation template with abstract tokens::

    <s> the o1 is in Box l1 , the d1 is on the table , ... Box lq [contains the] -> oq

(``--distractors`` adds unboxed objects; ``--no-post`` drops ``contains the`` so the query
label is the last token). Only the answer token is supervised. ``--schedule`` is a comma list
of ``until_step:boxes:distractors`` stages. ``--mimetic S`` initialises every q head as a copy
of its kv group's k head (std S), so that equal tokens attend to each other from step 0.

    OMP_NUM_THREADS=1 python synthetic_probe.py --schedule 6000:2:0 --lr 1e-3 --queries 1
"""
import argparse
import random
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("--schedule", default="6000:2:0")
ap.add_argument("--hidden", type=int, default=128)
ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--head-dim", type=int, default=16)
ap.add_argument("--rope-theta", type=float, default=10000.0)
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--init", type=float, default=0.02)
ap.add_argument("--mimetic", type=float, default=0.0)
ap.add_argument("--queries", type=int, default=1)
ap.add_argument("--no-post", action="store_true")
ap.add_argument("--batch", type=int, default=64)
args = ap.parse_args()
torch.set_num_threads(1)
sched = [tuple(map(int, s.split(":"))) for s in args.schedule.split(",")]
N_OBJ, N_LAB = 100, 26
F0 = N_OBJ + N_LAB + 5
V = 200
IS, IN, BOX, ON, TABLE, COMMA, CONT, THE, DOT = range(F0, F0 + 9)
cfg = LlamaConfig(vocab_size=V, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                  num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
                  max_position_embeddings=256, initializer_range=args.init,
                  head_dim=args.head_dim, rope_theta=args.rope_theta)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg)
if args.mimetic:
    with torch.no_grad():
        for layer in model.model.layers:
            at = layer.self_attn
            at.k_proj.weight.normal_(0, args.mimetic)
            kw = at.k_proj.weight.view(cfg.num_key_value_heads, args.head_dim, -1)
            qw = at.q_proj.weight.view(cfg.num_attention_heads, args.head_dim, -1)
            group = cfg.num_attention_heads // cfg.num_key_value_heads
            qw.copy_(kw.repeat_interleave(group, 0) + 0.02 * torch.randn_like(qw))
opt = torch.optim.AdamW(model.parameters(), lr=args.lr)


def batch(n, k, nd, nq):
    rows, targets = [], []
    for _ in range(n):
        objs = random.sample(range(3, 3 + N_OBJ), k + nd)
        labs = random.sample(range(3 + N_OBJ, 3 + N_OBJ + N_LAB), k)
        segs = [[THE, objs[i], IS, IN, BOX, labs[i]] for i in range(k)]
        segs += [[THE, objs[k + j], IS, ON, THE, TABLE] for j in range(nd)]
        random.shuffle(segs)
        s = [1]
        for sg in segs:
            s += sg + [COMMA]
        t = []
        for _ in range(nq):
            i = random.randrange(k)
            s += [BOX, labs[i]] + ([] if args.no_post else [CONT, THE])
            t.append(len(s))
            s += [objs[i], DOT]
        rows.append(s)
        targets.append(t)
    ids = torch.zeros(n, max(map(len, rows)), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, :len(r)] = torch.tensor(r)
    return ids, torch.tensor(targets)


@torch.no_grad()
def accuracy(k, nd):
    ids, tg = batch(256, k, nd, 1)
    pred = model(input_ids=ids).logits[torch.arange(256), tg[:, 0] - 1].argmax(-1)
    return (pred == ids[torch.arange(256), tg[:, 0]]).float().mean().item()


t0, ema = time.time(), None
for step in range(sched[-1][0]):
    k, nd = next((kk, dd) for until, kk, dd in sched if step < until)
    ids, tg = batch(args.batch, k, nd, args.queries)
    logits = model(input_ids=ids).logits
    b = torch.arange(args.batch)[:, None]
    loss = torch.nn.functional.cross_entropy(logits[b, tg - 1].reshape(-1, V), ids[b, tg].reshape(-1))
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
    if step % 250 == 0 or step == sched[-1][0] - 1:
        accs = [accuracy(kk, dd) for kk, dd in ((k, nd), (2, 0), (3, 0), (7, 0))]
        print(step, (k, nd), round(ema, 3), "acc now/2/3/7", [round(a, 2) for a in accs],
              f"{time.time() - t0:.0f}s", flush=True)
