"""The bind phase alone on one sub-seed with another batch size; prints its 2-box probes (JSON).

Usage: python bind_probe.py SUB_SEED BATCH CAP   (2 threads; stop 25 tried 141 128 2500)
"""
import json, sys, time
from dataclasses import replace
import torch
from circuitdiff.organisms import data as D
from circuitdiff.organisms.config import Recipe
from circuitdiff.organisms.evaluate import accuracy
from circuitdiff.organisms.models import make_model
from circuitdiff.organisms.phases import train_phases
torch.set_num_threads(2)
sub_seed, batch, cap = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
r = Recipe()
bind = replace(r.base_phases[0], batch_size=batch, steps=cap)
tok = D.build_tokenizer()
model = make_model(tok, r.model, sub_seed)
probe = lambda m, b: accuracy(m, tok, r.probe_n, r.probe_seed, n_boxes=b)
t0 = time.time()
(rec,) = train_phases(model, tok, (bind,), sub_seed, probe, progress=False)
out = {"sub_seed": sub_seed, "batch": batch, "cap": cap, "passed_at": rec["passed_at"], "steps": rec["steps"],
       "seconds": round(time.time() - t0, 1), "acc2": [(p["step"], p["acc2"]) for p in rec["probes"]]}
print(json.dumps(out))
