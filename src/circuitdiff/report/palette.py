"""One palette for every figure: the same edge kind, group or model has the same colour (and
line style) in the circuit graph, the flow diagram, the bar charts and the curves.

* edge kinds (q / k / v / logits): a colour and a line style each (:data:`EDGE_STYLE`);
* groups: :func:`group_colors` gives each group of a circuit its colour by its index in the
  circuit (empty groups keep their slot, so a circuit and its DCM view agree);
* models: :func:`model_colors` by the order the models are listed (base first);
* the random control is always grey and hatched (:data:`RANDOM_COLOR`, :data:`RANDOM_HATCH`).
"""

from __future__ import annotations

from typing import Iterable

#: colour and line style of each edge kind (legend and arrows, every figure)
EDGE_STYLE: dict[str, tuple[str, str]] = {
    "q": ("#1f5fbf", "-"),
    "k": ("#d62728", "--"),
    "v": ("#2ca02c", "-."),
    "logits": ("#222222", "-"),
}
#: what each edge kind means, for legends
EDGE_MEANING: dict[str, str] = {
    "q": "q: writes the receiver's query",
    "k": "k: writes the receiver's key",
    "v": "v: writes the receiver's value",
    "logits": "logits: writes the answer",
}
#: group colours in group order (colour-blind-friendly "tab10" minus the edge colours' hues)
GROUP_COLORS: tuple[str, ...] = ("#ff7f0e", "#9467bd", "#17becf", "#8c564b", "#e377c2",
                                 "#bcbd22", "#7f7f7f", "#aec7e8", "#ffbb78", "#c5b0d5")
#: model colours in model order (base first)
MODEL_COLORS: tuple[str, ...] = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3",
                                 "#937860", "#da8bc3", "#8c8c8c")
#: the random-heads / random-circuit control
RANDOM_COLOR = "#b0b0b0"
RANDOM_HATCH = "//"


def group_colors(groups: Iterable[str]) -> dict[str, str]:
    """Colour of each group, by its position in ``groups`` (a circuit's group names in order)."""
    return {g: GROUP_COLORS[i % len(GROUP_COLORS)] for i, g in enumerate(groups)}


def model_colors(models: Iterable[str]) -> dict[str, str]:
    """Colour of each model, by its position in ``models`` (the base first)."""
    return {m: MODEL_COLORS[i % len(MODEL_COLORS)] for i, m in enumerate(models)}


__all__ = ["EDGE_MEANING", "EDGE_STYLE", "GROUP_COLORS", "MODEL_COLORS", "RANDOM_COLOR",
           "RANDOM_HATCH", "group_colors", "model_colors"]
