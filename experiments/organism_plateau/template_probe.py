"""Fast probe: does binding emerge? token-level generator, weighted answer loss."""
import argparse, math, random, time, json, sys
import torch
from circuitdiff.organisms import data as D
from transformers import LlamaConfig, LlamaForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=3000)
ap.add_argument("--bs", type=int, default=64)
ap.add_argument("--lr", type=float, default=3e-3)
ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--hidden", type=int, default=128)
ap.add_argument("--heads", type=int, default=8)
ap.add_argument("--kv", type=int, default=2)
ap.add_argument("--boxes", default="2,3")       # boxes sampled uniformly from this list
ap.add_argument("--grow", type=int, default=0)  # if >0: every `grow` steps add next box count
ap.add_argument("--queries", type=int, default=4)
ap.add_argument("--w_other", type=float, default=0.1)
ap.add_argument("--variant", default="v0")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--every", type=int, default=250)
ap.add_argument("--wd", type=float, default=0.0)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--nobj", type=int, default=0)
ap.add_argument("--init", type=float, default=0.02)
a = ap.parse_args()
torch.set_num_threads(a.threads)
tok = D.build_tokenizer()
V = tok.get_vocab()
def w(x): return V[x]
OBJ = [w(" " + o) for o in D.OBJECTS]
if a.nobj: OBJ = OBJ[:a.nobj]
LAB = [w(" " + l) for l in D.LABELS]
BOS, PAD = tok.bos_token_id, tok.pad_token_id
The, the, is_, in_, Box, comma, dot, contains = w("The"), w(" the"), w(" is"), w(" in"), w(" Box"), w(","), w("."), w(" contains")
lpar, rpar = w(" ("), w(")")
colon = w(" :")

def gen(rng, k, nq, variant):
    objs = rng.sample(OBJ, k); labs = rng.sample(LAB, k)
    ids = [BOS]; wt = [0.0]
    def add(t, weight): ids.append(t); wt.append(weight)
    for i, (o, l) in enumerate(zip(objs, labs)):
        add(The if i == 0 else the, a.w_other); add(o, a.w_other); add(is_, a.w_other); add(in_, a.w_other); add(Box, a.w_other); add(l, a.w_other)
        if variant == "recency":   # restate object after label: (apple)
            add(lpar, a.w_other); add(o, 1.0); add(rpar, a.w_other)
        add(comma if i < k - 1 else dot, a.w_other)
    for _ in range(nq):
        i = rng.randrange(k)
        if variant == "short" and rng.random() < 0.5:
            add(labs[i], a.w_other); add(colon, a.w_other); add(objs[i], 1.0); add(dot, a.w_other)
        else:
            add(Box, a.w_other); add(labs[i], a.w_other); add(contains, a.w_other); add(the, a.w_other); add(objs[i], 1.0); add(dot, a.w_other)
    return ids, wt

def batch(rng, n, ks, variant, nq):
    seqs = [gen(rng, rng.choice(ks), nq, variant) for _ in range(n)]
    T = max(len(s[0]) for s in seqs)
    ids = torch.full((n, T), PAD); wts = torch.zeros(n, T); m = torch.zeros(n, T, dtype=torch.long)
    for j, (s, ww) in enumerate(seqs):
        ids[j, :len(s)] = torch.tensor(s); wts[j, :len(s)] = torch.tensor(ww); m[j, :len(s)] = 1
    return ids, wts, m

cfg = LlamaConfig(vocab_size=len(tok), hidden_size=a.hidden, intermediate_size=3 * a.hidden,
                  num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv,
                  max_position_embeddings=512, tie_word_embeddings=False, initializer_range=a.init,
                  pad_token_id=PAD, bos_token_id=BOS)
torch.manual_seed(a.seed)
model = LlamaForCausalLM(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.98), weight_decay=a.wd)

@torch.no_grad()
def acc(k, n=256):
    rng = random.Random(1000 + k)
    ids, wts, m = batch(rng, n, [k], "v0", 1)
    model.eval()
    lg = model(input_ids=ids, attention_mask=m).logits
    model.train()
    pos = (wts == 1.0).float().argmax(1)   # answer position
    pred = lg[torch.arange(n), pos - 1].argmax(-1)
    return (pred == ids[torch.arange(n), pos]).float().mean().item()

rng = random.Random(a.seed)
ks = [int(x) for x in a.boxes.split(",")]
t0 = time.time(); ema = None
for step in range(a.steps):
    if a.grow and step and step % a.grow == 0 and ks[-1] < 7: ks.append(ks[-1] + 1)
    ids, wts, m = batch(rng, a.bs, ks, a.variant, a.queries)
    lr = a.lr * min(1.0, (step + 1) / 100)
    for g in opt.param_groups: g["lr"] = lr
    lg = model(input_ids=ids, attention_mask=m).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1), reduction="none").view(ids.shape[0], -1)
    wt = wts[:, 1:]
    loss = (ce * wt).sum() / wt.sum()
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    ans = (ce * (wt == 1.0)).sum().item() / (wt == 1.0).sum().item()
    ema = ans if ema is None else 0.97 * ema + 0.03 * ans
    if (step + 1) % a.every == 0:
        print(f"step {step+1} t {time.time()-t0:.0f}s ansloss {ema:.3f} ks {ks[-1]} acc2 {acc(2):.2f} acc3 {acc(3):.2f} acc7 {acc(7):.2f}", flush=True)
