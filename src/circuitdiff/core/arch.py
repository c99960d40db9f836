"""Architecture adapter: where the decoder layers and their attention projections live.

Found structurally — unwrap peft, take the ``ModuleList`` whose length is the config's layer
count, and in each layer the attention block that owns ``q_proj``/``k_proj``/``v_proj``/``o_proj``
with shapes that agree with the config's head counts. No class-name strings, so any
Llama/Mistral/Qwen2/Gemma-3-style decoder works, with or without GQA, with or without LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


class ArchitectureError(ValueError):
    """Raised when a model lacks the structure circuitdiff edits (says what is missing)."""


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class AttentionSites:
    """One layer's attention projections (the peft wrappers when an adapter is attached)."""

    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module


@dataclass
class Architecture:
    """Counts from the config and handles on each layer's modules."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    layers: list[nn.Module]
    attention: list[AttentionSites]
    model_type: str

    @property
    def n_groups(self) -> int:
        """Query heads per kv head (1 without GQA)."""
        return self.n_heads // self.n_kv_heads

    def kv_head_of(self, head: int) -> int:
        """The kv head that query head ``head`` reads (HF's repeat_kv grouping)."""
        return head // self.n_groups

    def describe(self) -> str:
        gqa = f", GQA {self.n_heads}q/{self.n_kv_heads}kv" if self.n_kv_heads != self.n_heads else ""
        return (f"{self.model_type}: {self.n_layers} layers x {self.n_heads} heads "
                f"(head_dim {self.head_dim}{gqa}), hidden {self.hidden_size}")

    def check_head(self, layer: int, head: int) -> None:
        if not (0 <= layer < self.n_layers and 0 <= head < self.n_heads):
            raise ArchitectureError(
                f"head {layer}.{head} does not exist: the model has {self.n_layers} layers "
                f"x {self.n_heads} heads")


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (adapters stay attached and un-merged)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _out_features(mod: nn.Module) -> int | None:
    base = getattr(mod, "base_layer", mod)
    return getattr(base, "out_features", None)


def _in_features(mod: nn.Module) -> int | None:
    base = getattr(mod, "base_layer", mod)
    return getattr(base, "in_features", None)


def resolve(model: nn.Module) -> Architecture:
    """Describe ``model`` (a transformers decoder, optionally inside a peft wrapper)."""
    inner = unwrap(model)
    config = getattr(inner, "config", None)
    if config is None:
        raise ArchitectureError("model has no .config; circuitdiff needs a transformers model")
    cfg = _text_config(config)
    missing = [k for k in ("num_hidden_layers", "num_attention_heads", "hidden_size")
               if getattr(cfg, k, None) is None]
    if missing:
        raise ArchitectureError(f"config of model_type {getattr(cfg, 'model_type', '?')!r} lacks "
                                f"{', '.join(missing)}")
    n_layers = cfg.num_hidden_layers
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    if n_heads % n_kv:
        raise ArchitectureError(f"{n_heads} query heads are not a multiple of {n_kv} kv heads")

    candidates = [m for m in inner.modules()
                  if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    layers = None
    for cand in candidates:
        if all(_find_attention(layer) is not None for layer in cand):
            layers = list(cand)
            break
    if layers is None:
        raise ArchitectureError(
            f"found no list of {n_layers} decoder layers each holding an attention block with "
            f"{'/'.join(PROJECTIONS)}; this architecture (model_type "
            f"{getattr(cfg, 'model_type', '?')!r}) is not supported")
    sites = []
    for i, layer in enumerate(layers):
        attn = _find_attention(layer)
        s = AttentionSites(*(getattr(attn, p) for p in PROJECTIONS))
        expect = {"q_proj": n_heads * head_dim, "k_proj": n_kv * head_dim,
                  "v_proj": n_kv * head_dim}
        for name, mod in zip(PROJECTIONS[:3], (s.q, s.k, s.v)):
            got = _out_features(mod)
            if got is not None and got != expect[name]:
                raise ArchitectureError(
                    f"layer {i} {name} has {got} outputs but the config implies {expect[name]} "
                    f"({n_heads} heads, {n_kv} kv heads, head_dim {head_dim}); fused or unusual "
                    f"projections are not supported")
        got = _in_features(s.o)
        if got is not None and got != n_heads * head_dim:
            raise ArchitectureError(f"layer {i} o_proj takes {got} inputs, expected "
                                    f"{n_heads * head_dim}")
        sites.append(s)
    return Architecture(n_layers, n_heads, n_kv, head_dim, cfg.hidden_size, layers, sites,
                        getattr(cfg, "model_type", "unknown"))


def _find_attention(layer: nn.Module) -> nn.Module | None:
    for mod in layer.modules():
        if all(isinstance(getattr(mod, p, None), nn.Module) for p in PROJECTIONS):
            return mod
    return None
