"""What every path-patching implementation shares: request validation, the resolved request,
encoding of clean/counterfactual pairs, and head selection from scores."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ...core.arch import Architecture
from ...core.circuit import Head, parse_head
from ...core.model import LoadedModel
from ...core.task import Batch, Prompt, TaskError, check_role, encode_pair

RECEIVER_KINDS = ("q", "k", "v")
IMPLS = ("fast", "naive")


class PathPatchingError(ValueError):
    """Raised for a path-patching request that cannot be computed (says what to change)."""


# -- validation ------------------------------------------------------------------------------
def check_position(position: str) -> None:
    """``position`` must be a role of the task's position schema (offsets allowed)."""
    try:
        check_role(position)
    except TaskError as e:
        raise PathPatchingError(str(e)) from None


def _norm_heads(heads: Sequence[Head | str] | None, arch: Architecture, what: str) -> list[Head]:
    out = [parse_head(h) for h in (heads or ())]
    for layer, head in out:
        if not (0 <= layer < arch.n_layers and 0 <= head < arch.n_heads):
            raise PathPatchingError(f"{what} head {layer}.{head} does not exist: the model has "
                                    f"{arch.n_layers} layers x {arch.n_heads} heads")
    return list(dict.fromkeys(out))


def _check_request(arch: Architecture, senders: list[Head], receivers: list[Head],
                   receiver_kind: str, position: str) -> None:
    check_position(position)
    if receivers and receiver_kind not in RECEIVER_KINDS:
        raise PathPatchingError(f"receiver_kind must be one of {RECEIVER_KINDS}, got "
                                f"{receiver_kind!r}")
    if not senders:
        raise PathPatchingError("no sender heads to score")
    if not receivers and position != "last":
        raise PathPatchingError(
            f"logits receivers need position 'last' (got {position!r}): with every head frozen "
            f"at positions >= {position}, nothing reaches the logits at last; give receivers")
    if receivers:
        last_recv = max(l for l, _ in receivers)
        if min(l for l, _ in senders) >= last_recv:
            raise PathPatchingError(
                f"every sender is in layer >= {min(l for l, _ in senders)} but the receivers "
                f"end at layer {last_recv}: a head cannot reach a receiver in its own or an "
                f"earlier layer. Choose senders below layer {last_recv}.")


@dataclass(frozen=True)
class PatchRequest:
    """What one path-patching step scores (the question, not how it is computed).

    ``position`` is a role of the task's position schema (sender and receiver input share it);
    ``receivers`` are query heads ``(layer, head)`` (or ``"layer.head"``) whose ``kind`` input
    (q, k or v; k/v patch the receiver's kv head) is patched in pass 2 — empty means the logits;
    ``senders`` are the heads scored (None: every head)."""

    position: str = "last"
    receivers: Sequence[Head | str] = ()
    kind: str = "q"
    senders: Sequence[Head | str] | None = None

    def resolve(self, arch: Architecture) -> "_Request":
        """The request checked against ``arch`` (heads parsed, bounds and reachability checked)."""
        send = _norm_heads(self.senders, arch, "sender") if self.senders is not None \
            else all_heads(arch)
        recv = _norm_heads(self.receivers, arch, "receiver")
        _check_request(arch, send, recv, self.kind, self.position)
        return _Request(self.position, send, recv, self.kind if recv else "q")


@dataclass
class _Request:
    """One path-patching step, resolved against the architecture."""

    position: str
    senders: list[Head]
    receivers: list[Head]           # empty = logits
    kind: str

    def recv_layers(self) -> list[int]:
        return sorted({l for l, _ in self.receivers})

    def unit_mask(self, arch: Architecture, layer: int) -> torch.Tensor:
        """Bool ``[units]``: receiver units of ``layer`` (kv heads for k/v under GQA)."""
        units = arch.n_heads if self.kind == "q" else arch.n_kv_heads
        m = torch.zeros(units, dtype=torch.bool)
        for l, h in self.receivers:
            if l == layer:
                m[h if self.kind == "q" else arch.kv_head_of(h)] = True
        return m



def role_positions(batch: Batch, position: str) -> torch.Tensor:
    """``[B, P]`` token indices of role ``position`` (``P = 1`` for a scalar role); every entry
    must be a real token (sender and receiver act at all of them)."""
    try:
        p = batch.role(position)
    except TaskError as e:
        raise PathPatchingError(str(e)) from None
    p = p[:, None] if p.dim() == 1 else p
    if bool((p < 0).any()):
        raise PathPatchingError(f"position {position!r} is absent from some clean prompts (or "
                                f"covers a different number of tokens in some prompts)")
    return p


def _encode_checked(loaded: LoadedModel, clean: Sequence[Prompt], cf: Sequence[Prompt],
                    position: str) -> tuple[Batch, Batch]:
    bc, bx = encode_pair(clean, cf, loaded.tokenizer)
    if bool((bc.answer_ids < 0).any()):
        raise PathPatchingError("path patching needs clean prompts whose query names a box "
                                "(the metric is the clean answer's probability)")
    role_positions(bc, position)
    return bc, bx


def _check_sets(loaded: LoadedModel, clean: Sequence[Prompt], cf: Sequence[Prompt]) -> None:
    if len(clean) == 0:
        raise PathPatchingError("no clean prompts")
    if len(clean) != len(cf):
        encode_pair(clean, cf, loaded.tokenizer)  # raises the task's own error for the mismatch


# -- public API -------------------------------------------------------------------------------
def all_heads(arch: Architecture) -> list[Head]:
    return [(l, h) for l in range(arch.n_layers) for h in range(arch.n_heads)]


def top_heads(scores: torch.Tensor, k: int) -> list[Head]:
    """The ``k`` heads with the most negative finite scores (NaN = not scored), best first."""
    if k < 1:
        raise PathPatchingError(f"a group needs at least one head, got size {k}")
    flat = scores.flatten().float()
    finite = torch.isfinite(flat)
    if int(finite.sum()) < k:
        raise PathPatchingError(f"asked for {k} heads but only {int(finite.sum())} were scored")
    vals = torch.where(finite, flat, torch.full_like(flat, math.inf))
    order = torch.argsort(vals, stable=True)[:k]
    H = scores.shape[1]
    return [(int(i) // H, int(i) % H) for i in order]

