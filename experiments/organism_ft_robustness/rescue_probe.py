"""Replay a sub-seed's bind + grow to its stall (2 threads: the recipe's float path), then run each
rescue phase from that state (documents from sub-seed + 7, not the recipe's stream).

Usage: python rescue_probe.py SUB_SEED FLOOR_AT FLOOR VARIANT[,VARIANT...]   (stop 26: 41 500 0.2
extend_as_is,six_lr1e-3)
"""
import json, sys, time, copy
from dataclasses import replace
import torch
from circuitdiff.organisms import data as D
from circuitdiff.organisms.config import EVAL_BOXES, Gate, Phase, Recipe
from circuitdiff.organisms.evaluate import accuracy
from circuitdiff.organisms.models import make_model
from circuitdiff.organisms.phases import train_phases
torch.set_num_threads(2)
sub_seed, floor_at, floor = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
r = Recipe()
bind, grow, extend = r.base_phases
grow = replace(grow, gate=replace(grow.gate, floor=floor, floor_at=floor_at))
tok = D.build_tokenizer()
model = make_model(tok, r.model, sub_seed)
probe = lambda m, b: accuracy(m, tok, r.probe_n, r.probe_seed, n_boxes=b)
t0 = time.time()
recs = train_phases(model, tok, (bind, grow), sub_seed, probe, progress=False)
def short(rec, key):
    return [(p["step"], p.get(key)) for p in rec["probes"] if p["step"] % 100 == 0 or p is rec["probes"][-1]]
print(json.dumps({"sub_seed": sub_seed, "bind": [recs[0]["steps"], short(recs[0], "acc2")[-4:]],
                  "grow": [r_["steps"] for r_ in recs[1:]], "grow7": short(recs[1], "acc7") if len(recs) > 1 else None,
                  "stalled_at": recs[-1]["stalled_at"], "s": round(time.time() - t0)}), flush=True)
if recs[-1]["stalled_at"] is None:
    sys.exit(0)
state = copy.deepcopy(model.state_dict())
reach = Gate(boxes=EVAL_BOXES, threshold=0.6, every=50, required=False)
variants = {
    "extend_as_is": replace(extend, gate=reach, steps=1000),
    "extend_lr1e-3": replace(extend, gate=reach, lr=1e-3, warmup=50, steps=1000),
    "six_lr1e-3": Phase("six", (0, 1, 1, 1, 1, 1, 0), other_weight=0.1, steps=1000, lr=1e-3, warmup=50,
                        fresh_optimizer=True, gate=reach, gap_frac=0.25),
}
for name in sys.argv[4].split(","):
    model.load_state_dict(state)
    t0 = time.time()
    (rec,) = train_phases(model, tok, (variants[name],), sub_seed + 7, probe, progress=False)
    print(json.dumps({"variant": name, "steps": rec["steps"], "passed_at": rec["passed_at"],
                      "acc7": [(p["step"], p["acc7"]) for p in rec["probes"]],
                      "final_eval500": accuracy(model, tok, 500, 0), "s": round(time.time() - t0)}), flush=True)
