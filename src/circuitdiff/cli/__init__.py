"""``circuitdiff`` command line: a thin layer over the Python API, one module per command.

Every command gets ``--threads``, ``--json`` and ``--quiet``; every command that writes a run
folder gets ``--out`` (default ``runs/<command>``), checked and locked before any work starts
(:func:`circuitdiff.core.runs.open_run_folder`). A command's ``run(args)`` returns a JSON-able
dict (its result; printed by ``--json``) or an exit code. Bad input is one line on stderr and exit
code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import sys

#: command modules; each defines ``register(subparsers)`` which sets ``func`` on its parser
#: (``accuracy`` registers the ``eval`` command)
COMMANDS = ("study", "data", "accuracy", "discover", "scan", "evaluate", "knockout",
            "organisms", "dcm", "cmap", "models")
#: models below this many parameters run faster on one thread on a shared 2-core CPU (their
#: ops are too small to split; measured, see bench/threads.py and the README "Threads")


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``prog: error: ...``) and exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        # "argument --threshold: must be ..." reads as "--threshold must be ..."
        message = re.sub(r"^argument ([^:]+): must ", r"\1 must ", message)
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``, with a one-line message otherwise."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {v}")
        return v
    parse.__name__ = f"int>={minimum}"
    return parse


#: argparse types for counts
positive_int = _int_at_least(1)
nonnegative_int = _int_at_least(0)
#: most prompts one option may ask for (a larger set is generated for minutes, then killed)
MAX_PROMPTS = 100_000


def prompt_count(text: str) -> int:
    """An argparse type: a prompt count, 1 to :data:`MAX_PROMPTS`."""
    v = positive_int(text)
    if v > MAX_PROMPTS:
        raise argparse.ArgumentTypeError(f"at most {MAX_PROMPTS} prompts per run, got {v}; split "
                                         f"a larger set over several --seed values")
    return v


def box_count(text: str) -> int:
    """An argparse type: boxes per prompt, 2 (one binding to tell from another) to 26 (the
    labels A..Z); the exact upper bound is checked against the task's labels before any work."""
    v = _int_at_least(2)(text)
    if v > 26:
        raise argparse.ArgumentTypeError(f"at most 26 boxes (one label each), got {v}")
    return v


def finite_float(text: str, minimum: float | None = None, above: float | None = None,
                 maximum: float | None = None) -> float:
    """An argparse type: a finite number (NaN and inf are refused), optionally in a range."""
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    if minimum is not None and v < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum:g}, got {v:g}")
    if above is not None and v <= above:
        raise argparse.ArgumentTypeError(f"must be greater than {above:g}, got {v:g}")
    if maximum is not None and v > maximum:
        raise argparse.ArgumentTypeError(f"must be at most {maximum:g}, got {v:g}")
    return v


def float_in(minimum: float | None = None, maximum: float | None = None,
             above: float | None = None):
    """An argparse type: a finite number in the given range."""
    def parse(text: str) -> float:
        return finite_float(text, minimum=minimum, above=above, maximum=maximum)
    parse.__name__ = "number"
    return parse


class LazyHelp(str):
    """Help text computed only when ``--help`` is printed (argparse formats help with ``%``), so
    building the parser imports nothing heavy."""

    def __new__(cls, make):
        obj = super().__new__(cls, "(help)")
        obj._make = make
        return obj

    def __mod__(self, params):
        return self._make() % params


def add_command(sub, name: str, doc: str) -> argparse.ArgumentParser:
    """The subcommand ``name`` with its texts from its module's docstring (one source): the
    first paragraph, after ``"``circuitdiff NAME``: "``, is the one-line help of the command
    list; the paragraphs after it are the description of ``circuitdiff NAME --help``."""
    first, _, rest = doc.strip().partition("\n\n")
    summary = " ".join(first.split()).split(": ", 1)[-1].rstrip(".")
    description = "\n\n".join(" ".join(par.split()) for par in rest.split("\n\n") if par.strip())
    return sub.add_parser(name, help=summary, description=description or None)


def add_model_options(p: argparse.ArgumentParser, multiple: bool = False) -> None:
    """--model/--adapter/--device/--dtype/--device-map, shared by every command that loads one."""
    if multiple:
        p.add_argument("--model", action="append", required=False, metavar="SPEC",
                       help="model spec (repeatable): organism:NAME, HF folder or hub id, "
                            "a .gguf file, or a LoRA adapter folder (loads its base plus the "
                            "adapter, un-merged)")
    else:
        p.add_argument("--model", metavar="SPEC", default=None,
                       help="organism:NAME, HF folder or hub id, a .gguf file, or an adapter folder "
                            "(default: the embedded default model)")
        p.add_argument("--adapter", default=None, help="peft LoRA adapter folder to attach")
    add_device_options(p)


def add_device_options(p: argparse.ArgumentParser, computes: str = "the model computes") -> None:
    """--device/--dtype/--device-map: where and in which dtype the loaded model(s) run
    (``computes``: the subject of the --dtype help, e.g. "the models compute")."""
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help=f"dtype {computes} in (default float32)")
    p.add_argument("--device-map", default=None, help="accelerate device_map, e.g. auto")


def add_circuit_option(p: argparse.ArgumentParser, multiple: bool = False) -> None:
    """--circuit: the circuit file(s) a command works on (required; repeatable with
    ``multiple``, where every circuit is evaluated on every model)."""
    if multiple:
        p.add_argument("--circuit", action="append", required=True, metavar="JSON",
                       help="circuit file (repeatable: every circuit is evaluated on every model)")
    else:
        p.add_argument("--circuit", required=True, metavar="JSON", help="circuit file")


def add_random_draw_options(p: argparse.ArgumentParser, draws: str, seed: str | None = None,
                            default: int = 10) -> None:
    """--random-draws (and --random-seed when ``seed`` is given): the random head sets a
    circuit's result is compared with. ``draws``/``seed`` say what they are for the command; the
    defaults are appended."""
    p.add_argument("--random-draws", type=nonnegative_int, default=default,
                   help=f"{draws} (default {default})")
    if seed is not None:
        p.add_argument("--random-seed", type=int, default=0, help=f"{seed} (default 0)")


def add_max_rows_option(p: argparse.ArgumentParser, variants: str = "variants",
                        default: int = 256) -> None:
    """--max-rows: rows per forward when a method stacks its intervention ``variants``."""
    p.add_argument("--max-rows", type=positive_int, default=default,
                   help=f"rows per forward when {variants} are stacked (default {default})")


#: the scoring methods of the scan and of discovery (``methods.scan.SCAN_METHODS``,
#: ``methods.discovery.config.METHODS``; spelled here so parsing imports no method)
METHOD_CHOICES = ("auto", "exact", "attribution", "hybrid")


def add_scan_method_options(p: argparse.ArgumentParser, method_flag: str, exact_flag: str,
                            what: str = "") -> None:
    """The position scan's method and how many cells a hybrid scan measures exactly, as
    ``scan --method/--n-exact`` and ``discover --scan-method/--scan-exact`` take them."""
    p.add_argument(method_flag, default="auto", choices=METHOD_CHOICES,
                   help=f"{what}auto (default: exact up to 160 heads, hybrid above; the rule is "
                        f"printed), every cell exact, attribution only (one forward+backward per "
                        f"batch), or attribution then the {exact_flag} most damaging cells exact")
    p.add_argument(exact_flag, type=positive_int, default=16,
                   help="cells a hybrid scan measures exactly (16)")


def add_discovery_options(p: argparse.ArgumentParser, chain: str, sizes: str,
                          sizes_default: str | None = None) -> None:
    """--chain/--target/--sizes: which discovery chain finds the circuit and how it is sized
    (``chain``/``sizes``: the command's help for them; ``sizes_default``: --sizes' default)."""
    p.add_argument("--chain", default="auto", choices=["auto", "paper"], help=chain)
    p.add_argument("--target", type=float_in(), default=0.9,
                   help="auto chain: faithfulness to reach on held-out prompts (default 0.9)")
    p.add_argument("--sizes", default=sizes_default, help=sizes)


def add_task_options(p: argparse.ArgumentParser, n: int = 500, boxes=None) -> None:
    """--n-boxes/-n/--seed/--batch-size: the task and how its prompts are batched (``boxes``:
    the type of --n-boxes, default :func:`box_count`)."""
    p.add_argument("--n-boxes", type=boxes or box_count, default=7, help="boxes per prompt (default 7)")
    p.add_argument("-n", "--n-prompts", type=prompt_count, default=n,
                   help=f"prompts (default {n})")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="prompts per forward (default 32)")


def add_out_option(p: argparse.ArgumentParser, command: str, what: str = "run folder") -> None:
    """--out with the rule every command shares: default ``runs/<command>``."""
    p.add_argument("--out", default=f"runs/{command}",
                   help=f"{what} (default runs/{command}); results are saved as they are made and "
                        f"a rerun resumes from them")


def _add_common_options(p: argparse.ArgumentParser) -> None:
    have = p._option_string_actions  # noqa: SLF001 - only to avoid redefining an option
    if "--threads" not in have:
        p.add_argument("--threads", type=positive_int, default=None,
                       help="torch CPU threads (default: 1 for models under 20M parameters, "
                            "else every core, shared among the ranks on one machine)")
    if "--json" not in have:
        p.add_argument("--json", action="store_true",
                       help="print only the result, as one JSON object")
    if "--quiet" not in have:
        p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    if "--workers" not in have:
        p.add_argument("--workers", type=positive_int, default=None,
                       help="run as N torch.distributed ranks on this machine (the same as "
                            "torchrun --nproc-per-node N circuitdiff ...); each rank takes its "
                            "share of the parallel work, rank 0 writes the results")


def set_threads(args, loaded=None) -> None:
    """Apply ``--threads``, or the default rule once the model is known."""
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    elif loaded is not None:
        from ..core.model import default_threads

        torch.set_num_threads(default_threads(loaded.model))


def load_from_args(args, spec: str | None = None, adapter: str | None = None):
    """Load the model the options name (``spec`` overrides ``--model``) and set the threads."""
    from ..core.model import default_model_spec, load_model

    spec = spec or getattr(args, "model", None) or default_model_spec()
    if isinstance(spec, list):
        spec = spec[0]
    loaded = load_model(spec, adapter if adapter is not None else getattr(args, "adapter", None),
                        device=args.device, dtype=args.dtype, device_map=args.device_map)
    set_threads(args, loaded)
    return loaded


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = Parser(prog="circuitdiff",
                    description="Find the circuit behind entity tracking and compare fine-tuned "
                                "models.")
    parser.add_argument("--version", action="version", version=f"circuitdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    for p in sub.choices.values():
        _add_common_options(p)
        for action in p._subparsers._group_actions if p._subparsers else ():  # noqa: SLF001
            for q in action.choices.values():  # nested commands (organisms list|train)
                _add_common_options(q)
    return parser


def _launch_workers(args, argv: list[str]) -> int:
    """Re-run this command as ``args.workers`` local ranks under torch's elastic launcher (what
    ``torchrun --standalone --nproc-per-node N`` does); a rank that fails is named."""
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    rest, skip = [], False
    for a in argv:  # the same command without --workers
        if skip:
            skip = False
        elif a == "--workers":
            skip = True
        elif not a.startswith("--workers="):
            rest.append(a)
    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=args.workers,
                       run_id=uuid.uuid4().hex[:8], rdzv_backend="c10d",
                       rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2)
    try:
        elastic_launch(cfg, entrypoint=sys.executable)("-m", "circuitdiff", *rest)
    except ChildFailedError as e:
        # the rank that failed first: the launcher then stops the others (SIGTERM), and a
        # peer's collective may fail on the lost connection in the same second
        import signal

        order = sorted(e.failures.items(), key=lambda kv: (
            kv[1].exitcode == -signal.SIGTERM, kv[1].timestamp, kv[1].exitcode == 1, kv[0]))
        rank, failure = order[0]
        also = "".join(f"; then rank {r} (exit code {f.exitcode})" for r, f in order[1:])
        print(f"circuitdiff {args.command}: error: rank {rank} of {args.workers} failed (exit code "
              f"{failure.exitcode}){also}; saved results are kept and a rerun resumes from them",
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a one-line usage error (exit 2)
        return int(e.code or 0)
    from ..core.validate import InputError, check_inputs

    name = args.command
    try:  # files, folders and model configs, before torch is imported or anything is written
        check_inputs(args)
    except (InputError, ValueError, FileNotFoundError) as e:
        print(f"circuitdiff {name}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    from ..core import distributed
    from ..core.arch import ArchitectureError
    from ..core.interventions import InterventionError
    from ..core.model import ModelSpecError
    from ..core.runs import no_progress_bars, open_run_folder
    from ..core.task import TaskError

    if getattr(args, "workers", None) and args.workers > 1 and not distributed.launched():
        return _launch_workers(args, list(sys.argv[1:] if argv is None else argv))
    ranks = distributed.init(getattr(args, "device", None))
    if ranks.world > 1:
        args.device = distributed.rank_device(getattr(args, "device", None))
    quiet = args.json or args.quiet or not ranks.main  # rank 0 alone prints
    set_threads(args)
    try:
        with contextlib.ExitStack() as stack:
            if quiet:
                stack.enter_context(no_progress_bars())
            out = getattr(args, "out", None)
            if out is not None and getattr(args, "writes_out", True):
                stack.enter_context(open_run_folder(out))
            if quiet:  # progress bars and notes too; errors are printed below, after the block
                devnull = stack.enter_context(open(os.devnull, "w"))
                stack.enter_context(contextlib.redirect_stdout(devnull))
                stack.enter_context(contextlib.redirect_stderr(devnull))
            result = args.func(args)
    except (ModelSpecError, TaskError, ArchitectureError, InterventionError, FileNotFoundError,
            ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"circuitdiff {name}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"circuitdiff {name}: interrupted; saved results are kept and a rerun resumes "
              f"from them", file=sys.stderr)
        return 130
    if isinstance(result, dict):
        if args.json and ranks.main:
            print(json.dumps(result, default=str))
        return 0
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
