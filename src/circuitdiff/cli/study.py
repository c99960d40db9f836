"""``circuitdiff study``: run the whole study (accuracy, discovery, faithfulness, own circuits,
knockout, DCM, CMAP, verdicts, report.html) on the embedded model organisms or on the given
models.

With no --model: the shipped organisms base, chat, lora, full (the first is the base whose
circuit is found). Results are cached in --out; a rerun resumes.
"""

from __future__ import annotations

from . import add_command
from . import LazyHelp, add_discovery_options, add_model_options, add_random_draw_options
from . import add_task_options, load_from_args, prompt_count


def _steps(text: str) -> tuple[str, ...]:
    import argparse

    from ..study import parse_steps

    try:
        return parse_steps(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _steps_help() -> str:
    from ..study import REGISTRY

    return ("comma-separated steps to run (default all; the steps they need run too, from saved "
            "results when there): " + "; ".join(f"{s.name}: {s.help}" for s in REGISTRY))


def register(sub) -> None:
    p = add_command(sub, "study", __doc__)
    add_model_options(p, multiple=True)
    add_task_options(p, n=200)
    p.add_argument("--out", default="runs/study", help="run folder (default runs/study)")
    add_discovery_options(
        p, chain="auto (default): the model's own circuit (positions and heads, sized to "
                 "--target), with the paper chain's circuit evaluated beside it; paper: only the "
                 "paper's four-group chain",
        sizes="paper chain: heads kept per group VF,PT,PD,SR (default 6,3,4,2 for the "
              "organisms; the paper used 20,5,10,5 on Llama-7B)", sizes_default="6,3,4,2")
    p.add_argument("--n-discovery", type=prompt_count, default=100, help="prompts for path patching")
    p.add_argument("--n-mean", type=prompt_count, default=200, help="mean-ablation prompts")
    add_random_draw_options(p, "random circuits of the same group sizes", default=5)
    p.add_argument("--steps", type=_steps, default=None, help=LazyHelp(_steps_help))
    p.add_argument("--circuit", default=None, metavar="FILE",
                   help="study this circuit (a circuit.json as `circuitdiff discover` writes) "
                        "instead of discovering one on the base; every other step and verdict "
                        "runs as usual")
    p.add_argument("--dcm-train", type=prompt_count, default=200,
                   help="DCM training prompts (validation and test are half of it each)")
    p.add_argument("--no-knockout", action="store_true", help="skip attention knockout")
    p.add_argument("--no-screenshot", action="store_true",
                   help="do not load the report in a headless Chromium to check it and save "
                        "report.png (done by default where Chromium is installed)")
    p.add_argument("--accuracy-only", action="store_true",
                   help="only measure accuracy of the first model")
    p.set_defaults(func=run)


def run(args) -> dict:
    from dataclasses import replace

    from ..core.model import default_model_spec
    from ..methods.discovery import DiscoveryConfig
    from ..methods.evaluation import EvalConfig
    from ..study import (ORGANISM_STUDY, StudyConfig, default_cmap, default_dcm,
                         default_own_discovery, run_study)

    models = args.model
    accuracy_only = args.accuracy_only
    if not models:
        default = default_model_spec()
        if default.startswith("organism:"):
            models = list(ORGANISM_STUDY)
        else:  # no organisms in this install: the pretrained fallback is at chance on the task
            models, accuracy_only = [default], True
    paper = DiscoveryConfig(n_prompts=args.n_discovery, sizes=args.sizes, n_boxes=args.n_boxes,
                            seed=args.seed + 100, batch_size=args.batch_size, truncate=True,
                            chain="paper")
    auto = DiscoveryConfig(n_prompts=args.n_discovery, n_boxes=args.n_boxes,
                           seed=args.seed + 100, batch_size=args.batch_size, chain="auto",
                           target=args.target, on_unreachable="keep-all")
    own = replace(default_own_discovery(), n_prompts=args.n_discovery,
                  n_boxes=args.n_boxes, seed=args.seed + 100, batch_size=args.batch_size,
                  target=args.target)
    steps = tuple(args.steps) if args.steps is not None else _steps("all")
    if accuracy_only:
        steps = ("accuracy",)
    if args.no_knockout:
        steps = tuple(x for x in steps if x != "knockout")
    if args.chain != "auto":
        steps = tuple(x for x in steps if x != "paper_chain")
    if not steps:
        raise ValueError("no step left to run (--steps knockout with --no-knockout?)")
    half = max(1, args.dcm_train // 2)
    cfg = StudyConfig(
        discovery=auto if args.chain == "auto" else paper,
        paper_discovery=paper if args.chain == "auto" else None,
        own_discovery=own if args.chain == "auto" else paper,
        evaluation=EvalConfig(n_prompts=args.n_prompts, seed=args.seed, n_boxes=args.n_boxes,
                              n_mean=args.n_mean, n_random=args.random_draws,
                              batch_size=args.batch_size),
        dcm=replace(default_dcm(), n_boxes=args.n_boxes, n_train=args.dcm_train, n_val=half,
                    n_test=half, seed=args.seed + 200, batch_size=args.batch_size),
        cmap=replace(default_cmap(), n_boxes=args.n_boxes, n_prompts=args.n_prompts,
                     seed=args.seed, batch_size=args.batch_size),
        steps=steps, screenshot=not args.no_screenshot)
    return run_study(models, lambda spec: load_from_args(args, spec=spec), args.out, cfg,
                     circuit=args.circuit)
