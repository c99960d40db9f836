"""Head-level reads and edits, the core every method uses.

Sites:
  * **head outputs** — the input of ``o_proj`` viewed as ``[batch, pos, heads, head_dim]``,
    edited with forward *pre*-hooks so ``o_proj`` itself (with any LoRA delta) still runs;
  * **q/k/v projection outputs** — per query head for q, per kv head for k and v (under GQA a
    k/v "head" is shared by ``n_heads / n_kv_heads`` query heads), edited with forward hooks.

Positions are per sample: a LongTensor ``[B]`` or ``[B, P]`` of indices into the padded
sequence (see :class:`circuitdiff.core.task.Batch`), or ``None`` for every position. All edits are
vectorised gathers/scatters with ``torch.where``; hooks are removed even when the forward raises.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from .arch import Architecture, resolve

Positions = torch.Tensor | None


class InterventionError(ValueError):
    """Raised for an edit that cannot apply to this model or batch (bad layer, position...)."""


def _as_2d(positions: Positions) -> Positions:
    if positions is None:
        return None
    if positions.dim() == 1:
        return positions[:, None]
    if positions.dim() != 2:
        raise InterventionError(f"positions must be [B] or [B, P], got shape {tuple(positions.shape)}")
    return positions


def gather_positions(x: torch.Tensor, positions: Positions) -> torch.Tensor:
    """``x[b, positions[b]]`` for every sample: ``[B, T, ...] -> [B, P, ...]``."""
    positions = _as_2d(positions)
    if positions is None:
        return x
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    return x[rows, positions.to(x.device)]


def scatter_positions(x: torch.Tensor, positions: Positions, new: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` with ``x[b, positions[b]] = new[b]`` (differentiable in ``new``)."""
    positions = _as_2d(positions)
    if positions is None:
        return new.expand_as(x) if new.shape != x.shape else new
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    out = x.clone()
    out[rows, positions.to(x.device)] = new.to(x.dtype).expand(*positions.shape, *x.shape[2:])
    return out


@dataclass
class Site:
    """Which activation: ``"head"`` (o_proj input) or ``"q"``/``"k"``/``"v"`` projection output."""

    kind: str

    def module(self, arch: Architecture, layer: int) -> nn.Module:
        sites = arch.attention[layer]
        return {"head": sites.o, "q": sites.q, "k": sites.k, "v": sites.v}[self.kind]

    def n_units(self, arch: Architecture) -> int:
        return arch.n_heads if self.kind in ("head", "q") else arch.n_kv_heads


def _check_kind(kind: str) -> None:
    if kind not in ("head", "q", "k", "v"):
        raise InterventionError(f"site kind must be 'head', 'q', 'k' or 'v', got {kind!r}")


@dataclass
class Read:
    """Record ``[B, P, units, head_dim]`` at ``positions`` of ``layers`` into :attr:`out`."""

    layers: Sequence[int]
    positions: Positions = None
    kind: str = "head"
    detach: bool = True
    out: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class Write:
    """Replace (``mode='set'``) or interpolate (``mode='mix'``) one layer's activations.

    ``set``: units where ``where`` is true take ``values`` (``where`` broadcastable to
    ``[B, P, units]``; ``None`` = all units). ``mix``: ``m * current + (1 - m) * values`` with
    ``m`` broadcastable to ``[B, P, units]`` — differentiable in ``m`` and ``values`` (DCM).
    ``values`` is broadcastable to ``[B, P, units, head_dim]``.
    """

    layer: int
    values: torch.Tensor
    positions: Positions = None
    where: torch.Tensor | None = None
    kind: str = "head"
    mode: str = "set"
    m: torch.Tensor | None = None


@dataclass
class Hook:
    """Escape hatch: call ``fn(x4)`` on the ``[B, T, units, head_dim]`` activation and use the
    returned tensor (for methods whose edit is not a plain read or write)."""

    layer: int
    fn: Callable[[torch.Tensor], torch.Tensor]
    kind: str = "head"


@dataclass
class StopAfter:
    """End the forward once decoder layer ``layer`` has run (reads before it are complete)."""

    layer: int


class _Stop(Exception):
    pass


def _apply_write(w: Write, x4: torch.Tensor) -> torch.Tensor:
    cur = gather_positions(x4, w.positions)
    vals = w.values.to(device=x4.device, dtype=x4.dtype)
    if w.mode == "set":
        if w.where is None:
            new = vals.expand_as(cur) if vals.shape != cur.shape else vals
        else:
            new = torch.where(w.where.to(x4.device)[..., None], vals, cur)
    elif w.mode == "mix":
        if w.m is None:
            raise InterventionError("mode='mix' needs m (per-unit mixing weights)")
        m = w.m.to(device=x4.device, dtype=x4.dtype)[..., None]
        new = m * cur + (1 - m) * vals
    else:
        raise InterventionError(f"mode must be 'set' or 'mix', got {w.mode!r}")
    return scatter_positions(x4, w.positions, new)


def _split(t: torch.Tensor, units: int) -> torch.Tensor:
    return t.view(*t.shape[:-1], units, t.shape[-1] // units)


@contextlib.contextmanager
def intervene(model: nn.Module, edits: Sequence[Read | Write | Hook | StopAfter],
              arch: Architecture | None = None) -> Iterator[Architecture]:
    """Register hooks for ``edits`` for the duration of the block; always removes them."""
    arch = arch or resolve(model)
    handles = []
    try:
        for e in edits:
            if isinstance(e, StopAfter):
                _check_layer(arch, e.layer)

                def stop(_m, _i, _o):
                    raise _Stop

                handles.append(arch.layers[e.layer].register_forward_hook(stop))
                continue
            _check_kind(e.kind)
            site = Site(e.kind)
            units = site.n_units(arch)
            layers = e.layers if isinstance(e, Read) else [e.layer]
            for layer in layers:
                _check_layer(arch, layer)
                fn = _make_fn(e, layer)
                mod = site.module(arch, layer)
                if e.kind == "head":
                    def pre(_m, args, kwargs, fn=fn, units=units):
                        x = args[0]
                        y = fn(_split(x, units))
                        return (y.reshape(x.shape),) + tuple(args[1:]), kwargs
                    handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
                else:
                    def post(_m, _i, out, fn=fn, units=units):
                        return fn(_split(out, units)).reshape(out.shape)
                    handles.append(mod.register_forward_hook(post))
        yield arch
    finally:
        for h in handles:
            h.remove()


def _check_layer(arch: Architecture, layer: int) -> None:
    if not 0 <= layer < arch.n_layers:
        raise InterventionError(f"layer {layer} does not exist (model has {arch.n_layers})")


def _make_fn(e, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(e, Read):
        def read(x4):
            got = gather_positions(x4, e.positions)
            e.out[layer] = got.detach() if e.detach else got
            return x4
        return read
    if isinstance(e, Write):
        return lambda x4: _apply_write(e, x4)
    if isinstance(e, Hook):
        return e.fn
    raise InterventionError(f"unknown edit {e!r}")


def check_positions(edits: Sequence, attention_mask: torch.Tensor | None, seq_len: int) -> None:
    """Every position of every edit must be a real (unpadded) token of its sample."""
    for e in edits:
        pos = getattr(e, "positions", None)
        if pos is None:
            continue
        pos = _as_2d(pos)
        if pos.shape[0] not in (1, attention_mask.shape[0] if attention_mask is not None else pos.shape[0]):
            raise InterventionError(f"positions cover {pos.shape[0]} samples, batch has "
                                    f"{attention_mask.shape[0]}")
        if bool((pos < 0).any()) or bool((pos >= seq_len).any()):
            raise InterventionError(
                f"position outside the prompt (valid 0..{seq_len - 1}, got "
                f"{int(pos.min())}..{int(pos.max())}); a named position may be absent from "
                f"these prompts")
        if attention_mask is not None:
            rows = torch.arange(pos.shape[0], device=pos.device)[:, None]
            if not bool(attention_mask.to(pos.device)[rows, pos].all()):
                raise InterventionError("a position points at a padding token, not the prompt")


def run_with_edits(model: nn.Module, inputs: dict[str, torch.Tensor],
                   edits: Sequence[Read | Write | Hook | StopAfter] = (),
                   arch: Architecture | None = None, **forward_kwargs) -> torch.Tensor | None:
    """One forward with ``edits`` applied; returns the logits (``None`` if stopped early)."""
    ids = inputs["input_ids"]
    check_positions(edits, inputs.get("attention_mask"), ids.shape[1])
    with intervene(model, edits, arch):
        try:
            return model(**inputs, use_cache=False, **forward_kwargs).logits
        except _Stop:
            return None
