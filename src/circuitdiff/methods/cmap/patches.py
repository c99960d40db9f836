"""What one CMAP variant patches (head outputs at positions, or q/k/v of a group), the two
endpoints of a direction, token positions, and the plan of what to record and run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ...core.arch import Architecture
from ...core.circuit import Circuit, Head
from ...core.model import LoadedModel
from ...core.task import Batch
from .config import ALL_POSITIONS, CMAPError

ModelRef = LoadedModel | str


@dataclass(frozen=True)
class OutputPatch:
    """Head outputs to take from the source: position name -> heads patched there."""

    heads: tuple[tuple[str, tuple[Head, ...]], ...]

    @classmethod
    def of(cls, by_position: dict[str, Sequence[Head]]) -> "OutputPatch":
        merged: dict[str, list[Head]] = {}
        for pos, hs in by_position.items():
            merged.setdefault(pos, [])
            merged[pos] += [tuple(h) for h in hs if tuple(h) not in merged[pos]]
        return cls(tuple((p, tuple(sorted(hs))) for p, hs in sorted(merged.items()) if hs))

    @property
    def n_heads(self) -> int:
        """Distinct heads patched (a head patched at two positions counts once)."""
        return len({h for _, hs in self.heads for h in hs})

    @property
    def n_units(self) -> int:
        """(head, position) units patched."""
        return sum(len(hs) for _, hs in self.heads)


@dataclass(frozen=True)
class InputPatch:
    """q/k/v (``components``, a subset of ``"qkv"``) of ``heads`` read at ``position``."""

    heads: tuple[Head, ...]
    position: str
    components: str

    def __post_init__(self) -> None:
        if not self.components or set(self.components) - set("qkv"):
            raise CMAPError(f"input components must be letters of 'qkv', got {self.components!r}")

    @property
    def layers(self) -> list[int]:
        return sorted({l for l, _ in self.heads})

    @property
    def n_heads(self) -> int:
        """Distinct heads patched."""
        return len(set(self.heads))

    n_units = n_heads  # one position: one unit per head


def _union(circuit: Circuit, names: Sequence[str]) -> OutputPatch:
    by: dict[str, list[Head]] = {}
    for n in names:
        g = circuit.groups[n]
        by.setdefault(g.position, []).extend(g.heads)
    return OutputPatch.of(by)


# -- the two sides of a direction ------------------------------------------------------------
@dataclass
class Endpoint:
    """One side of the comparison: a model, and for a LoRA model whether its adapter is on."""

    label: str
    ref: ModelRef
    adapter: bool | None = None  # None: plain model; True/False: adapter enabled/disabled

    @property
    def name(self) -> str:
        if self.adapter is None:
            return self.label
        return f"{self.label}[adapter {'on' if self.adapter else 'off'}]"


def has_adapter(loaded: LoadedModel) -> bool:
    """True when ``loaded`` carries an un-merged peft adapter (it can run as its own base)."""
    return getattr(loaded.model, "peft_config", None) is not None and \
        callable(getattr(loaded.model, "disable_adapter", None))


# -- positions ---------------------------------------------------------------------------------
def position_index(batch: Batch, name: str) -> torch.Tensor:
    """``[B, k]`` token indices of ``name`` in each prompt (``all``: every token, ``k = T``;
    any other name is a role of the task, :meth:`~circuitdiff.core.task.Batch.role_index`)."""
    if name == ALL_POSITIONS:
        B, T = batch.input_ids.shape
        return torch.arange(T).expand(B, T)
    return batch.role_index(name)


def _slots(batch: Batch, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked token indices ``[B, S]`` of ``names`` and, per slot, the index of its name."""
    idx = [position_index(batch, n) for n in names]
    owner = torch.cat([torch.full((t.shape[1],), i) for i, t in enumerate(idx)])
    return torch.cat(idx, 1), owner


def _key_positions(batch: Batch, name: str) -> torch.Tensor:
    """``[B, P]``: every token index up to the latest ``name`` position of the batch (k/v sites)."""
    upto = int(position_index(batch, name).max())
    return torch.arange(upto + 1).expand(len(batch), upto + 1)


# -- the plan: which activations to record and which variants to run -------------------------------
@dataclass
class _Plan:
    output: list[OutputPatch]
    inputs: list[InputPatch]
    arch: tuple[int, int, int]  # layers, heads, kv heads

    def __post_init__(self) -> None:
        self.slot_names = sorted({p for v in self.output for p, _ in v.heads})
        L, H, _ = self.arch
        masks = torch.zeros(len(self.output), max(1, len(self.slot_names)), L, H, dtype=torch.bool)
        for i, v in enumerate(self.output):
            for pos, hs in v.heads:
                for l, h in hs:
                    masks[i, self.slot_names.index(pos), l, h] = True
        self.masks = masks  # [V, names, L, H]
        self.layers = [l for l in range(L) if bool(masks[:, :, l].any())]
        self.input_layers = sorted({l for ip in self.inputs for l in ip.layers})
        # q/k/v to record, once per (position, component) however many variants share them:
        # every unit of the layer, so any subset of heads can be patched from one recording
        sites: dict[tuple[str, str], set[int]] = {}
        for ip in self.inputs:
            for c in ip.components:
                sites.setdefault((ip.position, c), set()).update(ip.layers)
        self.input_sites = {k: sorted(v) for k, v in sorted(sites.items())}

    def describe(self) -> dict:
        return {"slots": self.slot_names, "layers": self.layers,
                "input_sites": [[p, c, ls] for (p, c), ls in self.input_sites.items()]}


def _kv_mask(arch: Architecture, heads: Sequence[Head], layer: int) -> torch.Tensor:
    m = torch.zeros(arch.n_kv_heads, dtype=torch.bool)
    for l, h in heads:
        if l == layer:
            m[arch.kv_head_of(h)] = True
    return m


def _q_mask(arch: Architecture, heads: Sequence[Head], layer: int) -> torch.Tensor:
    m = torch.zeros(arch.n_heads, dtype=torch.bool)
    for l, h in heads:
        if l == layer:
            m[h] = True
    return m
