"""Seconds per base-training step (grow-phase documents, batch 32) at 1 and 2 threads.

Not part of the package: tells how fast this machine runs the organism recipe. Three alternating
repetitions of 10 optimizer steps per thread count, in one process; prints the medians.

    python experiments/organism_ft_robustness/steprate.py
"""
import statistics
import time

import torch

from circuitdiff.organisms import data as D
from circuitdiff.organisms.config import Recipe
from circuitdiff.organisms.losses import answer_cue_ids
from circuitdiff.organisms.models import make_model
from circuitdiff.organisms.stages import train_step
tok = D.build_tokenizer()
r = Recipe()
ph = r.base_phases[1]
m = make_model(tok, r.model, 1)
params = [p for p in m.parameters()]
opt = torch.optim.AdamW(params, lr=1e-3)
cue = answer_cue_ids(tok)
res = {1: [], 2: []}
for rep in range(3):
    for t in (1, 2):
        torch.set_num_threads(t)
        t0 = time.time()
        for s in range(10):
            docs = D.base_corpus(ph.batch_size, s, box_weights=ph.box_weights, gap_frac=ph.gap_frac)
            train_step(m, tok, opt, params, docs, cue, ph.other_weight, 1e-3)
        res[t].append((time.time() - t0) / 10)
    print(rep, {k: round(v[-1], 3) for k, v in res.items()}, flush=True)
print("median s/step", {k: round(statistics.median(v), 3) for k, v in res.items()})
