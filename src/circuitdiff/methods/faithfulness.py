"""Faithfulness: how much of a model's accuracy its circuit alone recovers.

For one circuit and one model: full-model accuracy, circuit accuracy (everything else
mean-ablated, :mod:`circuitdiff.methods.ablation`), accuracy of random circuits with the same per-group
sizes (heads drawn *without replacement* from all heads, a head the circuit repeats repeated alike, seeded — the original code drew with
replacement and unseeded), and faithfulness = circuit / full ("undefined", ``None``, when the full
model scores 0). The circuit and all random draws run as variants of one batched evaluation.

Both ablation protocols are always reported: ``paper`` (every head at positions outside the
circuit's roles ablated) and ``keep-other-positions`` (those positions left intact). They answer
different questions — does the circuit's set of (head, role) units suffice, versus do its heads
suffice where it reads — and a circuit found at the wrong positions passes one and fails the
other; a gap above :data:`PROTOCOL_DISAGREEMENT` comes with a warning.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import ClassVar, Sequence

from .ablation import HeadMeans, circuit_keep, variant_correct
from .accuracy import evaluate_accuracy
from ..core.stats import draw_rng, ratio_interval
from ..core.circuit import Circuit, CircuitGroup
from ..core.model import LoadedModel
from ..core.task import Prompt


#: protocol names (``keep_other_positions`` False / True)
PROTOCOLS: tuple[str, str] = ("paper", "keep-other-positions")
#: faithfulness gap between the two protocols that earns a warning
PROTOCOL_DISAGREEMENT = 0.25


def protocol_name(keep_other_positions: bool) -> str:
    return PROTOCOLS[1] if keep_other_positions else PROTOCOLS[0]


def faithfulness(full: float, circuit: float) -> float | None:
    """``circuit / full``, or ``None`` (undefined) when the full model never answers correctly."""
    return None if full <= 0 else circuit / full


def random_circuits(circuit: Circuit, n_draws: int = 10, seed: int = 0) -> list[Circuit]:
    """``n_draws`` circuits of ``circuit``'s shape and positions, heads drawn at random.

    Each draw relabels the circuit's distinct heads: it samples as many distinct heads from the
    whole ``n_layers x n_heads`` grid, without replacement, and gives the k-th distinct head of
    the circuit (in group order, first appearance) the k-th sampled one. Group sizes, roles and
    the circuit's own overlaps (a real model's automatic chain can put one head in two groups at
    the same role, e.g. ``heads@last`` and ``heads@last_2``) are kept, so a draw keeps as many
    (head, role) units as the circuit. For a circuit with no repeated head this is the plain
    draw of ``sum(group sizes)`` distinct heads dealt to the groups in order. Draw ``i`` uses
    :func:`~circuitdiff.core.stats.draw_rng` ``(seed, i)``: reproducible and independent of how
    many draws are asked for.
    """
    if n_draws < 0:
        raise ValueError(f"n_draws must be >= 0, got {n_draws}")
    distinct = list(dict.fromkeys(h for g in circuit.groups.values() for h in g.heads))
    grid = [(l, h) for l in range(circuit.n_layers) for h in range(circuit.n_heads)]
    out = []
    for i in range(n_draws):
        relabel = dict(zip(distinct, draw_rng(seed, i).sample(grid, len(distinct))))
        groups = {name: CircuitGroup([relabel[h] for h in g.heads], g.position, g.function)
                  for name, g in circuit.groups.items()}
        out.append(Circuit(groups, circuit.n_layers, circuit.n_heads, circuit.model,
                           {"random_draw": i, "seed": seed}, list(circuit.edges)))
    return out


#: the random-circuit sampler's version for circuits that repeat a head (1: distinct heads drawn
#: for every group entry; 2: the circuit's distinct heads relabelled, its repeats kept)
REPEATED_HEAD_DRAW = 2


def random_draw_key(circuit: Circuit) -> dict:
    """What a cached result with random circuits of ``circuit`` adds to its key: nothing for a
    circuit with no repeated head (its draws never changed, old results stay valid), the
    sampler's version for one that repeats a head (results drawn the old way recompute)."""
    entries = [h for g in circuit.groups.values() for h in g.heads]
    return {} if len(entries) == len(set(entries)) else {"random_draw": REPEATED_HEAD_DRAW}


def random_baseline(accuracies: Sequence[float]) -> tuple[float | None, float | None]:
    """``(mean, sd)`` of random-circuit accuracies: ``(None, None)`` with no draw, sd 0.0 with
    one (the sample sd needs two). The one summary of every random baseline (faithfulness, DCM,
    CMAP)."""
    values = [float(a) for a in accuracies]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def check_circuit(circuit: Circuit, name: str = "circuit") -> None:
    """Error for a circuit with no group: nothing would be kept at any role, and under the
    keep-other-positions protocol nothing would be ablated (faithfulness 1.0 for no circuit)."""
    if not circuit.groups:
        raise ValueError(f"{name} has no group: there is nothing to evaluate; give a circuit "
                         f"with at least one group")


@dataclass
class FaithfulnessRow:
    """One row of the paper's table (one circuit on one model).

    ``circuit_accuracy``/``faithfulness``/random are under ``protocol``; ``by_protocol`` gives
    circuit accuracy and faithfulness under both protocols; ``warning`` is set when they
    disagree by more than :data:`PROTOCOL_DISAGREEMENT`.
    """

    model: str
    circuit: str
    full: float
    circuit_accuracy: float
    random_mean: float | None
    random_sd: float | None
    faithfulness: float | None
    n: int
    random: list[float] = field(default_factory=list)
    protocol: str = PROTOCOLS[0]
    by_protocol: dict[str, dict] = field(default_factory=dict)
    warning: str = ""
    # per-prompt correctness (1/0) of the full model and of the circuit under ``protocol``, and
    # the paired bootstrap interval of faithfulness over prompts they give
    full_hits: list[int] = field(default_factory=list, repr=False)
    circuit_hits: list[int] = field(default_factory=list, repr=False)
    faithfulness_ci: list[float] | None = None
    # one paired bootstrap interval of faithfulness per random draw (same resamples as the
    # circuit's): the random circuits run through the verdict rules (calibration)
    random_faithfulness_ci: list[list[float] | None] = field(default_factory=list)

    #: the row's format (2: per-prompt hits and the faithfulness interval; 3: an interval per
    #: random draw); in its cache key
    VERSION: ClassVar[int] = 3

    def faithfulness_under(self, protocol: str) -> float | None:
        """Faithfulness under ``protocol`` (``None`` if undefined or not measured)."""
        return self.by_protocol.get(protocol, {}).get("faithfulness")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FaithfulnessRow":
        return cls(**d)


def evaluate_faithfulness(loaded: LoadedModel, prompts: Sequence[Prompt], means: HeadMeans,
                          circuit: Circuit, circuit_name: str = "circuit", n_random: int = 10,
                          random_seed: int = 0, keep_other_positions: bool = False,
                          batch_size: int = 32, max_rows: int = 256,
                          full_hits: Sequence[int] | None = None, progress: bool = False,
                          bootstrap: int = 1000, bootstrap_seed: int = 0) -> FaithfulnessRow:
    """Full, circuit and random-circuit accuracy of ``circuit`` on ``loaded``.

    ``full_hits`` may pass the full model's already measured per-prompt correctness on the same
    prompts. Faithfulness gets a paired bootstrap interval over prompts (``bootstrap``
    resamples, seed ``bootstrap_seed``; 0 resamples: no interval).
    """
    check_circuit(circuit, circuit_name)
    circuit.validate(loaded.arch)
    if full_hits is None:
        full_hits = evaluate_accuracy(loaded, prompts, batch_size, progress).correct
    full_hits = [int(x) for x in full_hits]
    if len(full_hits) != len(prompts):
        raise ValueError("full_hits must have one entry per prompt")
    full = sum(full_hits) / len(full_hits)
    randoms = random_circuits(circuit, n_random, random_seed)
    hits = variant_correct(loaded, prompts, means, [circuit_keep(c) for c in [circuit] + randoms],
                           keep_other_positions, batch_size, max_rows, progress)
    accs = hits.double().mean(1).tolist()
    other = variant_correct(loaded, prompts, means, [circuit_keep(circuit)],
                            not keep_other_positions, batch_size, max_rows,
                            progress).double().mean().item()
    circuit_hits = hits[0].int().tolist()
    rnd = accs[1:]
    by = {protocol_name(keep_other_positions): {"circuit_accuracy": accs[0],
                                                "faithfulness": faithfulness(full, accs[0])},
          protocol_name(not keep_other_positions): {"circuit_accuracy": other,
                                                    "faithfulness": faithfulness(full, other)}}
    return FaithfulnessRow(
        loaded.name, circuit_name, full, accs[0], *random_baseline(rnd),
        faithfulness(full, accs[0]), len(prompts), rnd, protocol_name(keep_other_positions),
        {p: by[p] for p in PROTOCOLS}, protocol_warning(by), full_hits, circuit_hits,
        ratio_interval(circuit_hits, full_hits, bootstrap, bootstrap_seed),
        [ratio_interval(h.int().tolist(), full_hits, bootstrap, bootstrap_seed)
         for h in hits[1:]])


def protocol_warning(by_protocol: dict[str, dict]) -> str:
    """A warning when the two protocols' faithfulness differ by more than
    :data:`PROTOCOL_DISAGREEMENT` (empty otherwise)."""
    a, b = (by_protocol[p]["faithfulness"] for p in PROTOCOLS)
    if a is None or b is None or abs(a - b) <= PROTOCOL_DISAGREEMENT:
        return ""
    why = ("the circuit needs heads at positions outside its roles" if b > a else
           "heads outside the circuit's positions are needed only when its own positions are "
           "ablated too; the circuit's roles carry what it needs")
    return (f"protocols disagree: faithfulness {a:.2f} (paper: every head outside the circuit's "
            f"roles ablated) vs {b:.2f} (keep-other-positions); {why}")
