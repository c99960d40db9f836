"""The ``Circuit``: named head groups, each read at one role of the position schema, and the
edges between them.

A group is heads × one role (:mod:`circuitdiff.core.task`: ``last``, ``labels``,
``prev_query_label+1`` …; a multi-position role covers several tokens of every prompt). Edges
``sender --q|k|v--> receiver`` record which input of the receiver group the sender group writes
(``logits`` as receiver: the sender writes the answer at ``last``). Saved as JSON (``groups`` →
heads as ``"layer.head"`` strings, position, function; ``edges``; the settings that produced it)
so it can be read by people, diffed, and evaluated on another model. Circuit JSON written before
roles and edges existed (four groups at scalar positions, no edges) still loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from .arch import Architecture, ArchitectureError
from .runs import atomic_write_text
from .task import check_role

Head = tuple[int, int]

#: the paper's four groups, in discovery order, with the position each is read at
PAPER_GROUPS: tuple[tuple[str, str], ...] = (
    ("value_fetcher", "last"),
    ("position_transmitter", "last"),
    ("position_detector", "query_label"),
    ("structure_reader", "prev_query_label"),
)


def parse_head(s: str | Iterable[int]) -> Head:
    """``"14.27"`` or ``(14, 27)`` → ``(14, 27)``."""
    if isinstance(s, str):
        try:
            layer, head = s.split(".")
            return int(layer), int(head)
        except ValueError:
            raise ValueError(f"head {s!r} is not of the form LAYER.HEAD") from None
    layer, head = s
    return int(layer), int(head)


def format_head(h: Head) -> str:
    return f"{h[0]}.{h[1]}"


@dataclass
class CircuitGroup:
    """A set of heads that matter at one role (``position``: a schema role name, possibly
    covering several tokens); ``function`` says what the group does, when known."""

    heads: list[Head]
    position: str
    function: str = ""

    def __post_init__(self) -> None:
        self.heads = [parse_head(h) for h in self.heads]
        check_role(self.position)
        if len(set(self.heads)) != len(self.heads):
            raise ValueError(f"group at {self.position} lists a head twice")


#: receiver inputs an edge can write: a head's query, key or value, or the logits
EDGE_KINDS: tuple[str, ...] = ("q", "k", "v", "logits")


@dataclass(frozen=True)
class CircuitEdge:
    """``sender --kind--> receiver``: group ``sender``'s outputs feed ``kind`` of the
    ``receiver`` group's heads (computed at the sender's role), or the logits
    (``receiver == "logits"``, ``kind == "logits"``)."""

    sender: str
    receiver: str
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in EDGE_KINDS:
            raise ValueError(f"edge kind must be one of {EDGE_KINDS}, got {self.kind!r}")

    def to_dict(self) -> dict:
        return {"sender": self.sender, "receiver": self.receiver, "kind": self.kind}

    def __str__(self) -> str:
        return f"{self.sender} --{self.kind}--> {self.receiver}"


@dataclass
class Circuit:
    """Ordered head groups plus the architecture shape and settings they were found with."""

    groups: dict[str, CircuitGroup]
    n_layers: int
    n_heads: int
    model: str = ""
    settings: dict = field(default_factory=dict)
    edges: list[CircuitEdge] = field(default_factory=list)

    def __post_init__(self) -> None:
        for e in self.edges:
            for end in (e.sender, e.receiver):
                if end != "logits" and end not in self.groups:
                    raise ValueError(f"edge {e} names group {end!r}, which the circuit lacks "
                                     f"(groups: {', '.join(self.groups)})")

    def n_units(self) -> int:
        """Distinct (head, role) pairs: a head kept at two roles counts twice."""
        return sum(len(self.heads_at(p)) for p in self.positions())

    def heads(self) -> list[Head]:
        """All unique heads, in group order."""
        return list(dict.fromkeys(h for g in self.groups.values() for h in g.heads))

    def positions(self) -> list[str]:
        return list(dict.fromkeys(g.position for g in self.groups.values()))

    def heads_at(self, position: str) -> list[Head]:
        """Unique heads of every group read at ``position``."""
        return list(dict.fromkeys(h for g in self.groups.values() if g.position == position
                                  for h in g.heads))

    def mask(self, position: str, device=None) -> torch.Tensor:
        """Bool ``[n_layers, n_heads]``: heads of the circuit at ``position``."""
        m = torch.zeros(self.n_layers, self.n_heads, dtype=torch.bool, device=device)
        for layer, head in self.heads_at(position):
            m[layer, head] = True
        return m

    def validate(self, arch: Architecture) -> None:
        """Error unless every head exists in ``arch`` (and the head grid matches)."""
        if (self.n_layers, self.n_heads) != (arch.n_layers, arch.n_heads):
            raise ArchitectureError(
                f"circuit was found on a {self.n_layers}x{self.n_heads} head grid but the model "
                f"has {arch.n_layers}x{arch.n_heads}: different architecture")
        for name, g in self.groups.items():
            for layer, head in g.heads:
                if not (0 <= layer < arch.n_layers and 0 <= head < arch.n_heads):
                    raise ArchitectureError(f"group {name} names head {layer}.{head}, which the "
                                            f"model ({arch.n_layers}x{arch.n_heads}) does not have")

    def to_dict(self) -> dict:
        return {"model": self.model, "n_layers": self.n_layers, "n_heads": self.n_heads,
                "groups": {k: {"position": g.position, "heads": [format_head(h) for h in g.heads],
                               **({"function": g.function} if g.function else {})}
                           for k, g in self.groups.items()},
                "edges": [e.to_dict() for e in self.edges],
                "settings": self.settings}

    @classmethod
    def from_dict(cls, d: dict) -> "Circuit":
        if not isinstance(d, dict):
            raise ValueError(f"not a circuitdiff circuit: the JSON is a {type(d).__name__}, not an "
                             f"object with n_layers, n_heads and groups")
        if not isinstance(d.get("groups"), dict) or not all(
                isinstance(v, dict) for v in d["groups"].values()):
            raise ValueError('not a circuitdiff circuit: "groups" must map each group name to '
                             '{"position": ROLE, "heads": ["LAYER.HEAD", ...]}')
        try:
            groups = {k: CircuitGroup(v["heads"], v["position"], v.get("function", ""))
                      for k, v in d["groups"].items()}
            edges = [CircuitEdge(e["sender"], e["receiver"], e["kind"])
                     for e in d.get("edges", [])]
            return cls(groups, int(d["n_layers"]), int(d["n_heads"]), d.get("model", ""),
                       d.get("settings", {}), edges)
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a circuitdiff circuit: missing {e}") from None

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "Circuit":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"circuit file {path} does not exist")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON: {e}") from None
