"""``circuitdiff`` command line: a thin layer over the Python API, one module per command."""

from __future__ import annotations

import argparse
import importlib
import sys

#: command modules; each defines ``register(subparsers)`` which sets ``func`` on its parser
#: (``accuracy`` registers the ``eval`` command)
COMMANDS = ("study", "data", "accuracy", "discover", "evaluate", "knockout", "cmap", "organisms")


def add_model_options(p: argparse.ArgumentParser, multiple: bool = False) -> None:
    """--model/--adapter/--device/--dtype/--device-map, shared by every command that loads one."""
    if multiple:
        p.add_argument("--model", action="append", required=False, metavar="SPEC",
                       help="model spec (repeatable): organism:NAME, HF folder or hub id, "
                            "a .gguf file, or an adapter folder")
    else:
        p.add_argument("--model", metavar="SPEC", default=None,
                       help="organism:NAME, HF folder or hub id, a .gguf file, or an adapter folder "
                            "(default: the embedded default model)")
        p.add_argument("--adapter", default=None, help="peft LoRA adapter folder to attach")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device-map", default=None, help="accelerate device_map, e.g. auto")


def add_task_options(p: argparse.ArgumentParser, n: int = 500) -> None:
    p.add_argument("--n-boxes", type=int, default=7, help="boxes per prompt (default 7)")
    p.add_argument("-n", "--n-prompts", type=int, default=n, help=f"prompts (default {n})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)


def load_from_args(args, spec: str | None = None, adapter: str | None = None):
    from ..core.model import default_model_spec, load_model

    spec = spec or getattr(args, "model", None) or default_model_spec()
    return load_model(spec, adapter if adapter is not None else getattr(args, "adapter", None),
                      device=args.device, dtype=args.dtype, device_map=args.device_map)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="circuitdiff",
        description="Find the circuit behind entity tracking and compare fine-tuned models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..core.arch import ArchitectureError
    from ..core.interventions import InterventionError
    from ..core.model import ModelSpecError
    from ..core.task import TaskError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ModelSpecError, TaskError, ArchitectureError, InterventionError, FileNotFoundError,
            ValueError) as e:
        print(f"circuitdiff {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"circuitdiff {args.command}: interrupted; saved results are kept and a rerun "
              f"resumes from them", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
