"""Bind (the recipe's or a variant), then grow cut at step 500, at 1 thread; prints per sub-seed
the bind curve with 2/3/4-box probes, the probes at bind end, and grow's 7-box (and 3/4-box) probes.

Usage: python bind_variant.py {base,lr2e-3,cos,mix23,mix23g3,vb25,init05,gateNN,mq2,mq234} SUB[,SUB...]   (SUB: a sub-seed, or
I:D = initialisation from sub-seed I, documents from sub-seed D)
"""
import json, sys, time
from dataclasses import replace
import torch
from circuitdiff.organisms import data as D
from circuitdiff.organisms.config import Recipe
from circuitdiff.organisms.evaluate import accuracy
from circuitdiff.organisms.models import make_model
from circuitdiff.organisms.phases import train_phases
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
elif variant == "vb25":  # a 0.25 share of bind's documents is variable binding (x = 5 ; print x -> 5)
    _base_corpus = D.base_corpus
    def _with_binding(n, seed, **kw):
        import random
        docs = _base_corpus(n, seed, **kw)
        if kw.get("box_weights") != bind.box_weights:
            return docs
        rng = random.Random(seed ^ 0x5EED)
        return [D._variable_binding(rng, rng.randint(2, 4), 1) if rng.random() < 0.25 else d
                for d in docs]
    D.base_corpus = _with_binding
elif variant.startswith("gate"):  # bind gate at 2-box accuracy 0.NN (e.g. gate07: 0.7), twice in a row
    bind = replace(bind, gate=replace(bind.gate, threshold=int(variant[4:]) / 10 ** (len(variant) - 5)))
elif variant in ("mq2", "mq234"):  # bind contexts query every box once (distinct order, no repeats)
    import random
    bind_weights = (0, 1) if variant == "mq2" else (0, 1, 1, 1)  # a tuple only bind uses
    bind = replace(bind, box_weights=bind_weights)
    _base_corpus = D.base_corpus
    def _all_boxes(n, seed, **kw):
        if kw.get("box_weights") != bind_weights:
            return _base_corpus(n, seed, **kw)
        rng, docs = random.Random(seed), []
        for _ in range(n):
            if rng.random() < 0.8:
                k = rng.choices(range(1, len(bind_weights) + 1), bind_weights)[0]
                gap = D._prose(rng, rng.randint(1, 3)) if rng.random() < kw.get("gap_frac", 0) else ""
                docs.append(D._tracking_eval_wording(rng, k, k, distinct=True, gap=gap))
            else:
                docs.append(D._prose(rng, rng.randint(2, 5)))
        return docs
    D.base_corpus = _all_boxes
cap = int(__import__("os").environ.get("BIND_CAP", bind.steps))
bind = replace(bind, steps=cap)
grow_to = int(__import__("os").environ.get("GROW_TO", 500))
grow = replace(grow, gate=replace(grow.gate, floor=1.01, floor_at=grow_to))  # always end at GROW_TO
tok = D.build_tokenizer()
for sub in subs:
    extra = []
    def probe(m, b):
        a = accuracy(m, tok, r.probe_n, r.probe_seed, n_boxes=b)
        if b == 7:
            extra.append({k: accuracy(m, tok, r.probe_n, r.probe_seed, n_boxes=k) for k in (3, 4)})
        return a
    init, data = (int(x) for x in (sub.split(":") * 2)[:2])
    if variant == "init05":  # initializer_range 0.05 instead of 0.02
        from transformers import LlamaForCausalLM
        from circuitdiff.organisms.models import set_seed
        m0 = make_model(tok, r.model, init)
        cfg = m0.config
        cfg.initializer_range = 0.05
        set_seed(init)
        model = LlamaForCausalLM(cfg)
    else:
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
