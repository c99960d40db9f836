"""Input checks that run before torch is imported, a model loads or ``--out`` is written.

Why: a bad input found after a model has loaded costs minutes (or, for a config without sizes,
the whole machine: transformers fills in a full-size default). Everything here reads only small
files (``config.json``, ``adapter_config.json``, a circuit file) and raises :class:`InputError`,
a one-line message that names the file or field and the fix.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .specs import (ModelSpecError, check_local, check_resolvable, is_adapter_folder,
                    organism_name, organism_path, spec_folder, split_gguf)


class InputError(ModelSpecError):
    """A bad input found before any work: the message names the file or field and the fix."""


#: config.json names of each size, first the usual one (aliases: GPT-2, T5-style names)
SIZE_FIELDS: dict[str, tuple[str, ...]] = {
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
    "vocab_size": ("vocab_size",),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim"),
}
#: model types whose MLP width defaults to 4 x hidden_size when config.json leaves it out
MLP_4X_TYPES = ("gpt2", "gpt_neo", "gptj", "codegen")
#: bytes per parameter of each --dtype
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: files of which a model folder needs one to have a tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model",
                   "tokenizer_config.json")
#: longest file name and path the kernel accepts (Linux NAME_MAX, PATH_MAX)
NAME_MAX, PATH_MAX = 255, 4096


def read_json(path: Path, what: str) -> Any:
    """``path`` parsed as JSON; an :class:`InputError` naming the file when it is a folder, not
    UTF-8 or not JSON."""
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder; pass the JSON file")
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{what} {path} is not UTF-8 text; pass the JSON file") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{what} {path} is not JSON ({e.msg} at line {e.lineno}); fix or "
                         f"replace the file") from None


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (``MemAvailable``), or ``None``."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _size(d: dict, name: str, file: Path, required: bool = True) -> int | None:
    for key in SIZE_FIELDS[name]:
        if d.get(key) is not None:
            v = d[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{file}: {key} must be a positive integer, got {v!r}")
            return v
    if required:
        raise InputError(f"{file} lacks {name}; without it transformers would build its default "
                         f"(full-size) model; add the sizes of the saved weights")
    return None


def config_sizes(config_file: Path) -> dict[str, int]:
    """The sizes of a model's ``config.json`` (text config of a multimodal one), checked."""
    d = read_json(config_file, "model config")
    if not isinstance(d, dict):
        raise InputError(f"{config_file} is a JSON {type(d).__name__}, not an object; "
                         f"not a model config")
    d = d.get("text_config") or d
    sizes = {k: _size(d, k, config_file) for k in SIZE_FIELDS if k != "intermediate_size"}
    mlp = _size(d, "intermediate_size", config_file,
                required=d.get("model_type") not in MLP_4X_TYPES)
    sizes["intermediate_size"] = mlp or 4 * sizes["hidden_size"]
    kv = d.get("num_key_value_heads")
    sizes["num_key_value_heads"] = kv if isinstance(kv, int) and kv > 0 else \
        sizes["num_attention_heads"]
    hd = d.get("head_dim")
    sizes["head_dim"] = hd if isinstance(hd, int) and hd > 0 else \
        sizes["hidden_size"] // sizes["num_attention_heads"]
    sizes["tied"] = int(bool(d.get("tie_word_embeddings", True)))
    return sizes


def estimate_params(s: dict[str, int]) -> int:
    """Parameters of a decoder-only transformer with these sizes (embeddings, attention, gated
    MLP, norms); an upper estimate, good to a few percent."""
    h, hd = s["hidden_size"], s["head_dim"]
    attn = h * hd * (2 * s["num_attention_heads"] + 2 * s["num_key_value_heads"])
    mlp = 3 * h * s["intermediate_size"]
    emb = s["vocab_size"] * h * (1 if s["tied"] else 2)
    return emb + s["num_hidden_layers"] * (attn + mlp + 2 * h)


def check_fits(config_file: Path, dtype: str = "float32", in_ram: bool = True) -> int:
    """Refuse a model whose weights cannot fit in the memory available now (``in_ram``: they
    are loaded into this machine's memory, not onto an accelerator); its parameters."""
    n = estimate_params(config_sizes(config_file))
    need = n * DTYPE_BYTES.get(dtype, 4)
    free = available_memory() if in_ram else None
    if free is not None and need > free:
        raise InputError(f"{config_file} describes a model of about {n / 1e9:.2f}B parameters "
                         f"({need / 2**30:.1f} GiB in {dtype}) but only {free / 2**30:.1f} GiB of "
                         f"memory is available; check its sizes or use a smaller --dtype/model")
    return n


def check_model_spec(spec: str, dtype: str = "float32", tokenizer: bool = True,
                     in_ram: bool = True) -> None:
    """Check a model spec from its small files: it exists, its config has sizes that fit in
    memory, an adapter names a base that exists, the folder has a tokenizer."""
    if organism_name(spec) is not None:
        organism_path(organism_name(spec))
        return
    path, gguf = split_gguf(spec)
    if gguf is not None:
        return
    check_local(path)
    check_resolvable(path)
    folder = spec_folder(path)
    if folder is None:
        return  # a hub id: checked as it loads
    if is_adapter_folder(folder):
        acfg = read_json(folder / "adapter_config.json", "adapter config")
        base = acfg.get("base_model_name_or_path") if isinstance(acfg, dict) else None
        if not isinstance(base, str) or not base:
            raise InputError(f"{folder / 'adapter_config.json'}: base_model_name_or_path is "
                             f"missing; set it or pass --model BASE --adapter {spec}")
        rel = folder / base
        if rel.exists():
            base = str(rel.resolve())
        elif base.startswith((".", "/", "~")):
            raise InputError(f"{folder / 'adapter_config.json'}: base_model_name_or_path "
                             f"{base!r} does not exist (a relative path is read from the adapter "
                             f"folder); fix it to the base model's folder")
        check_model_spec(base, dtype, tokenizer=tokenizer and not any(
            (folder / f).is_file() for f in TOKENIZER_FILES), in_ram=in_ram)
        return
    check_fits(folder / "config.json", dtype, in_ram)
    if tokenizer and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise InputError(f"model folder {folder} has no tokenizer ({', '.join(TOKENIZER_FILES)}); "
                         f"save the tokenizer beside the weights (tokenizer.save_pretrained)")


def model_grid(spec: str) -> tuple[int, int] | None:
    """(layers, heads) from a local model's config.json (an adapter's base's); ``None`` when the
    spec is a hub id or a GGUF file."""
    from .specs import config_grid

    try:
        grid = config_grid(spec)
    except (ModelSpecError, OSError, ValueError):
        return None
    return None if grid is None else grid[:2]


def _int_field(d: dict, key: str, file: Path) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise InputError(f"circuit {file}: {key} must be a positive integer, got {v!r}")
    return v


def check_circuit_file(path: str, grid: tuple[int, int] | None = None,
                       spec: str | None = None) -> None:
    """Check a circuit file before any model loads: UTF-8 JSON, integer sizes, heads written
    ``"LAYER.HEAD"`` inside its grid, at least one head, and the grid of the model ``spec``."""
    file = Path(path)
    if not file.exists():
        raise InputError(f"circuit file {path} does not exist")
    d = read_json(file, "circuit file")
    if not isinstance(d, dict):
        return  # Circuit.load names what is wrong
    n_layers, n_heads = _int_field(d, "n_layers", file), _int_field(d, "n_heads", file)
    groups = d.get("groups")
    if not isinstance(groups, dict) or not all(isinstance(g, dict) for g in groups.values()):
        return  # Circuit.load says how groups are written
    n = 0
    for name, g in groups.items():
        for h in g.get("heads") or []:
            if not isinstance(h, str):
                raise InputError(f"circuit {file}: group {name} lists head {h!r}; write heads "
                                 f"as strings \"LAYER.HEAD\", e.g. \"1.0\"")
            try:
                layer, head = (int(x) for x in h.split("."))
            except ValueError:
                raise InputError(f"circuit {file}: group {name} lists head {h!r}, not of the "
                                 f"form \"LAYER.HEAD\"") from None
            if not (0 <= layer < n_layers and 0 <= head < n_heads):
                raise InputError(f"circuit {file}: group {name} names head {h}, outside its "
                                 f"{n_layers} layers x {n_heads} heads")
            n += 1
    if n == 0:
        raise InputError(f"circuit {file} has no group with heads; nothing to evaluate (pass the "
                         f"circuit.json a discover run saved)")
    if grid is not None and tuple(grid) != (n_layers, n_heads):
        raise InputError(f"circuit {file} is for {n_layers} layers x {n_heads} heads but model "
                         f"{spec} has {grid[0]} x {grid[1]} (its config.json); use a circuit "
                         f"found on this base model (or architecture)")


def check_out_path(out: str) -> None:
    """``--out`` is a usable path: not empty, no name over 255 bytes, at most 4096 bytes."""
    if not out.strip():
        raise InputError("--out is empty; name a folder, e.g. --out runs/mine")
    if len(os.fsencode(out)) > PATH_MAX:
        raise InputError(f"--out is {len(os.fsencode(out))} bytes long; the system allows at most "
                         f"{PATH_MAX}; pass a shorter path")
    for part in Path(out).parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise InputError(f"--out: the folder name {part[:20]}... is {len(os.fsencode(part))} "
                             f"bytes; the system allows at most {NAME_MAX}; pass a shorter name")


def _default_spec() -> str | None:
    try:
        organism_path("base")
        return "organism:base"
    except (ValueError, FileNotFoundError):
        return None


def check_inputs(args) -> None:
    """Every check of a parsed command line that needs no model: ``--out`` (empty, for a command
    whose parser sets ``fresh_out``), each model spec
    (``--model``, ``--adapter``, ``--base``, ``--finetuned``), each ``--circuit`` against the
    first model's head grid."""
    out = getattr(args, "out", None)
    if out is not None and getattr(args, "writes_out", True):
        check_out_path(out)
        folder = Path(out).expanduser()
        if getattr(args, "fresh_out", False) and folder.is_dir() and any(folder.iterdir()):
            raise InputError(f"--out {out} is not empty and this command never writes over "
                             f"earlier results; pass a new folder")
    for name in ("target", "scale", "threshold", "tolerance", "lr", "z_threshold"):
        v = getattr(args, name, None)
        if isinstance(v, float) and not math.isfinite(v):
            raise InputError(f"--{name.replace('_', '-')} must be a finite number, got {v}")
    dtype = getattr(args, "dtype", "float32") or "float32"
    models = getattr(args, "model", None)
    models = [models] if isinstance(models, str) else list(models or [])
    specs = models + [s for s in (getattr(args, "base", None), getattr(args, "finetuned", None))
                      if s]
    device = getattr(args, "device", None)
    in_ram = (device is None or device == "cpu") and getattr(args, "device_map", None) is None
    for spec in specs:
        check_model_spec(spec, dtype, in_ram=in_ram)
    adapter = getattr(args, "adapter", None)
    if adapter:
        folder = Path(adapter).expanduser()
        if not (folder / "adapter_config.json").is_file():
            raise InputError(f"--adapter {adapter} holds no adapter_config.json; pass a peft "
                             f"LoRA adapter folder")
        read_json(folder / "adapter_config.json", "adapter config")
    if getattr(args, "command", None) == "evaluate" and not specs:
        raise InputError("pass at least one --model SPEC to evaluate the circuit on")
    first = specs[0] if specs else _default_spec()
    grid = model_grid(first) if first else None
    circuits = getattr(args, "circuit", None)
    for c in [circuits] if isinstance(circuits, str) else list(circuits or []):
        check_circuit_file(c, grid, first)
