"""Bind (the recipe's or a variant), then grow cut at step 500, at 1 thread; prints per sub-seed
the bind curve with 2/3/4-box probes, the probes at bind end, and grow's 7-box (and 3/4-box) probes.

Usage: python bind_variant.py {base,lr2e-3,cos,mix23,mix23g3} SUB[,SUB...]   (SUB: a sub-seed, or
I:D = initialisation from sub-seed I, documents from sub-seed D)
"""
import json, sys, time
from dataclasses import replace
import torch
from circuitdiff.organisms import data as D
from circuitdiff.organisms.train import Recipe, make_model, train_phases, accuracy
torch.set_num_threads(1)
variant, subs = sys.argv[1], [s for s in sys.argv[2].split(",")]
# a sub-seed "I:D" initialises the model from sub-seed I and draws the documents from sub-seed D
r = Recipe()
bind, grow, _ = r.base_phases
if variant == "mix23":
    bind = replace(bind, box_weights=(0, 1, 1, 0, 0, 0, 0))
elif variant == "lr2e-3":
    bind = replace(bind, lr=2e-3)
elif variant == "cos":
    bind = replace(bind, min_lr_frac=0.1)
elif variant == "mix23g3":
    bind = replace(bind, box_weights=(0, 1, 1, 0, 0, 0, 0), gate=replace(bind.gate, boxes=3, threshold=0.85))
grow = replace(grow, gate=replace(grow.gate, floor=1.01, floor_at=500))  # always end at 500
tok = D.build_tokenizer()
for sub in subs:
    extra = []
    def probe(m, b):
        a = accuracy(m, tok, r.probe_n, r.probe_seed, n_boxes=b)
        if b == 7:
            extra.append({k: accuracy(m, tok, r.probe_n, r.probe_seed, n_boxes=k) for k in (3, 4)})
        return a
    init, data = (int(x) for x in (sub.split(":") * 2)[:2])
    model = make_model(tok, r.model, init)
    t0 = time.time()
    recs = train_phases(model, tok, (bind, grow), data, probe, progress=False)
    b = recs[0]
    nb = len(b["probes"])
    end = {**{k: v for k, v in b["probes"][-1].items()}, **extra[nb - 1]}
    out = {"variant": variant, "sub": sub, "bind_steps": b["steps"], "bind_passed": b["passed"],
           "bind_end": end, "bind_curve": [(p["step"], p["acc2"], e[3], e[4]) for p, e in zip(b["probes"], extra) if p["step"] % 500 == 0 or p is b["probes"][-1]],
           "s": round(time.time() - t0)}
    if len(recs) > 1:
        g = recs[1]["probes"]
        out["grow7"] = [(p["step"], p["acc7"]) for p in g]
        out["grow34"] = extra[nb:]
    print(json.dumps(out), flush=True)
