"""Rebuild data/study_summary.json from a study run folder:

    PYTHONPATH=src python tests/report/data/make_study_summary.py RUN_FOLDER tests/report/data/study_summary.json

Built from the run's cached step results (the run was cut by its 900 s limit inside the
CMAP step: organism:lora's direction had finished, organism:full's had not)."""
import json, sys, types
from pathlib import Path
from circuitdiff import study as S
from circuitdiff.methods.verdicts import VerdictRules, verdicts
from circuitdiff.core.stats import difference_interval
src = Path(sys.argv[1])
results = {p.stem: json.loads(p.read_text())["result"] for p in (src / "steps").glob("*.json")}
base, fts = "organism:base", ["organism:chat", "organism:lora", "organism:full"]
acc = results["accuracy"]
rules = VerdictRules()
cm = {}
for spec in ("organism:chat", "organism:lora"):
    gap = acc[spec]["accuracy"] - acc[base]["accuracy"]
    ci = difference_interval(acc[spec]["hits"], acc[base]["hits"], rules.bootstrap, rules.seed,
                             rules.confidence)
    if ci is not None and ci[0] <= 0:
        cm[spec] = {"skipped": f"no significant gain over the base to explain (accuracy gap "
                               f"{gap:+.2f} [{ci[0]:.2f}, {ci[1]:.2f}], n={acc[spec]['n']}); "
                               f"CMAP skipped", "gap": gap, "gap_ci": ci}
        continue
    f = next((src / "cmap").glob("organism_lora_adapter_on-*.json"))
    d = json.loads(f.read_text())["result"]
    cm[spec] = {"base": base, "finetuned": spec, "circuit": results["discover"]["circuit"],
                "config": {}, "n": d["n"], "directions": [d], "warnings": [], "seconds": 0.0}
results["cmap"] = cm
s = {"models": [base, *fts], "steps": list(S.STEPS),
     "config": {"discovery": {"n_prompts": 100, "seed": 100},
                "evaluation": {"n_boxes": 7, "n_prompts": 200, "seed": 0}}}
s.update(S._collect(types.SimpleNamespace(results=results)))
s["verdicts"] = verdicts(results, base, fts, rules, S.AUTO_CIRCUIT)

def strip(o):
    if isinstance(o, dict):
        return {k: strip(v) for k, v in o.items() if not k.endswith("hits")}
    if isinstance(o, list):
        return [strip(v) for v in o]
    return o
s = strip(s)
def trim(c):
    c["settings"] = {k: v for k, v in c["settings"].items() if k not in ("candidates", "extra_candidates")}
for key in ("circuit", "paper_circuit"):
    trim(s[key])
for d in s.get("own_circuits", {}).values():
    if "circuit" in d: trim(d["circuit"])
for r in s["cmap"].values():
    if "circuit" in r: r["circuit"] = {"note": "the base circuit (see 'circuit')"}
out = Path(sys.argv[2])
out.write_text(json.dumps(s, indent=1) + "\n")
print(out, out.stat().st_size, sorted(s))
