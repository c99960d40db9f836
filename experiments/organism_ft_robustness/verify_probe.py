"""Is the recipe's probe without an autograd graph bit-identical to the one with it?

Prints every batch whose last-position logits differ between the old probe (autograd on) and
``torch.no_grad()``, then the totals. Models: the base/lora/full/chat of each
``RUNS/seed{1..5}`` folder written by ``circuitdiff organisms train`` and four fresh
initialisations; at 1 and 2 threads; 2-, 4- and 7-box prompts (probe seed 1000, eval seed 0).

    python experiments/organism_ft_robustness/verify_probe.py RUNS
"""
import sys, torch
from pathlib import Path
from circuitdiff.organisms import data as D
from circuitdiff.organisms.config import Recipe
from circuitdiff.organisms.models import make_model, reload_model
from circuitdiff.core.task import EntityTrackingTask, TaskConfig, encode
tok = D.build_tokenizer()
def old_last(m, prompts):
    b = encode(prompts, tok, padding_side="left")
    return m(**b.model_inputs()).logits[torch.arange(len(b)), b.positions["last"]].detach(), b.answer_ids
def new_last(m, prompts):
    b = encode(prompts, tok, padding_side="left")
    with torch.no_grad():
        return m(**b.model_inputs()).logits[torch.arange(len(b)), b.positions["last"]]
def load(s, k):
    root = Path(sys.argv[1]) / f"seed{s}"
    if k != "lora":
        return reload_model(root / k)
    from peft import PeftModel
    return PeftModel.from_pretrained(reload_model(root / "base"), str(root / "lora"))
models = []
for s in range(1, 6):
    for k in ("base", "lora", "full", "chat"):
        models.append((f"s{s}/{k}", lambda s=s, k=k: load(s, k)))
for sub in (11, 21, 131, 321):
    models.append((f"init{sub}", lambda sub=sub: make_model(tok, Recipe().model, sub)))
bad = 0; total = 0; flips = 0
for threads in (1, 2):
    torch.set_num_threads(threads)
    for name, mk in models:
        m = mk().eval()
        for nb, seed, n in ((2, 1000, 200), (7, 1000, 200), (7, 0, 500), (4, 0, 250)):
            prompts = EntityTrackingTask(tok, TaskConfig(n_boxes=nb), seed=seed).sample(n, seed=seed)
            for i in range(0, n, 250):
                a, ans = old_last(m, prompts[i:i+250]); b = new_last(m, prompts[i:i+250])
                total += 1
                if not torch.equal(a, b):
                    bad += 1
                    print("differ", threads, name, nb, seed, float((a-b).abs().max()))
                flips += int((a.argmax(-1) != b.argmax(-1)).sum())
print(f"batches {total}, bitwise-different {bad}, argmax flips {flips}")
