"""What decides a discovery run: the chains' constants, the sizes parser, the errors and
:class:`DiscoveryConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ...core.config import Config, check_finite, execution
from ...core.stats import sub_seed
from ...core.circuit import PAPER_GROUPS
from ..path_patching import IMPLS, PathPatchingError
from ..scan import AUTO_EXACT_MAX_HEADS as SCAN_AUTO_EXACT_MAX_HEADS, SCAN_METHODS

#: (group, position, receiver kind for the next group) — receivers of step i are group i-1
PAPER_CHAIN: tuple[tuple[str, str, str | None], ...] = (
    ("value_fetcher", "last", None),
    ("position_transmitter", "last", "q"),
    ("position_detector", "query_label", "v"),
    ("structure_reader", "prev_query_label", "v"),
)
assert tuple((g, p) for g, p, _ in PAPER_CHAIN) == PAPER_GROUPS
#: receivers kept from each step for the next (Prakash et al., Llama-7B)
PAPER_SIZES: tuple[int, ...] = (20, 5, 10, 5)
METHODS = ("auto", "exact", "attribution", "hybrid")
SIZINGS = ("auto", "exhaustive", "bisect")
#: ``auto`` scores edges exactly, scans every cell and sizes exhaustively up to this many heads
#: (the same bound as the scan's, :data:`..scan.AUTO_EXACT_MAX_HEADS`)
AUTO_EXACT_MAX_HEADS = SCAN_AUTO_EXACT_MAX_HEADS
CHAINS = ("auto", "paper")


class DiscoveryError(PathPatchingError):
    """A discovery run that cannot produce a circuit (says why and what was measured)."""


class NoCircuitError(DiscoveryError):
    """The model is at chance on the task: there is no circuit to find."""


class TargetUnreachable(DiscoveryError):
    """Even every candidate head misses the faithfulness target."""


def parse_sizes(text: str | Sequence[int], chain: str = "paper") -> tuple[int, ...]:
    """``"20,5,10,5"`` → ``(20, 5, 10, 5)``; one positive size per group (the paper chain), or,
    for the automatic chain, sizes of the groups in discovery order (the last one repeats)."""
    if isinstance(text, str):
        try:
            sizes = tuple(int(x) for x in text.split(","))
        except ValueError:
            raise PathPatchingError(f"sizes {text!r} must be comma-separated integers, e.g. "
                                    f"20,5,10,5") from None
    else:
        sizes = tuple(int(x) for x in text)
    if chain == "auto":
        if not sizes or min(sizes) < 1:
            raise PathPatchingError(f"sizes {text!r}: every group needs at least one head")
        return sizes
    if len(sizes) != len(PAPER_CHAIN):
        raise PathPatchingError(f"give {len(PAPER_CHAIN)} sizes (one per group: "
                                f"{', '.join(g for g, _, _ in PAPER_CHAIN)}), got {len(sizes)}")
    for (g, _, _), k in zip(PAPER_CHAIN, sizes):
        if k < 1:
            raise PathPatchingError(f"group {g} has size {k}: every group needs at least one "
                                    f"head (an empty group has no receivers for the next step)")
    return sizes


@dataclass
class DiscoveryConfig(Config):
    """Everything that decides a discovery run (the settings each cached piece is tagged with
    are the step's own, see :mod:`.steps`; the run is resumable from them).

    Fields, both chains: ``n_prompts`` clean prompts (seed ``seed``, ``n_boxes`` boxes) and
    their counterfactuals for path patching; ``method`` exact / attribution (the gradient
    estimate itself, with per-prompt standard errors) / hybrid (exact scores of the estimate's
    top candidates) / auto (exact up to :data:`AUTO_EXACT_MAX_HEADS` heads, attribution above:
    :meth:`resolved` says which and why);
    ``hybrid_k`` (default ``3 x size``) is how many attribution candidates get exact scores;
    ``compare_exact`` (paper chain) computes both exact and attribution scores and reports the
    attribution's Spearman correlation and top-k recall; ``chain`` auto or paper.

    Paper chain: ``sizes`` (default 20,5,10,5); ``truncate`` leaves the later groups empty when
    a group lies wholly in layer 0 (no head can send to it) instead of failing.

    Automatic chain: ``target`` faithfulness on ``n_validate`` held-out prompts (the named seed
    stream :meth:`seed_streams` ``validate_seed``; means over ``n_mean`` prompts of
    ``mean_seed``) decides the size, unless
    ``sizes`` fixes heads per group — a size counts as reaching the target when the estimate
    minus ``size_z`` paired standard errors does; the position scan uses the first ``n_scan``
    held-out prompts, by ``scan_method`` (auto, exact, attribution, hybrid: see
    :mod:`..scan`; ``scan_exact`` cells measured exactly by the hybrid); ``sizing`` exhaustive
    (every ``GROW_STEP``-th prefix, then single-removal pruning) or bisect (prefixes of doubling
    length, then bisection between the last miss and the first hit; no pruning: O(log n)
    evaluations for models with hundreds of candidate heads), auto by model size;
    a sender is significant when its score is ``<= -z_threshold`` standard
    errors and ``<= -min_score``; roles whose scan drop (below the group's layers) reaches
    ``scan_min_drop`` of the model's accuracy get their k and v traced; at most ``max_groups``
    groups; ``on_unreachable`` = ``"error"`` stops with a message when even every candidate
    head misses the target, ``"keep-all"`` keeps them all.

    Execution only (not in :meth:`cache_key`): ``batch_size`` prompts per forward, ``impl``
    fast or naive path patching (same scores), ``max_rows`` rows per stacked ablation forward.
    """

    n_prompts: int = 100
    sizes: tuple[int, ...] | None = None
    method: str = "auto"
    n_boxes: int = 7
    seed: int = 0
    batch_size: int = execution(32)
    hybrid_k: int | None = None
    compare_exact: bool = False
    impl: str = execution("fast")
    truncate: bool = False
    chain: str = "auto"
    target: float = 0.9
    n_validate: int = 200
    n_scan: int = 100
    size_z: float = 1.0
    n_mean: int = 100
    z_threshold: float = 3.0
    min_score: float = 0.01
    scan_min_drop: float = 0.1
    max_groups: int = 16
    on_unreachable: str = "error"
    scan_method: str = "auto"
    scan_exact: int = 16
    sizing: str = "auto"
    max_rows: int = execution(512)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PathPatchingError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.impl not in IMPLS:
            raise PathPatchingError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if self.scan_method not in SCAN_METHODS:
            raise PathPatchingError(f"scan method must be one of {SCAN_METHODS}, got "
                                    f"{self.scan_method!r}")
        if self.sizing not in SIZINGS:
            raise PathPatchingError(f"sizing must be one of {SIZINGS}, got {self.sizing!r}")
        if self.chain not in CHAINS:
            raise PathPatchingError(f"chain must be one of {CHAINS}, got {self.chain!r}")
        check_finite("DiscoveryConfig", target=self.target, size_z=self.size_z,
                     z_threshold=self.z_threshold, min_score=self.min_score,
                     scan_min_drop=self.scan_min_drop)
        if self.sizes is None and self.chain == "paper":
            self.sizes = PAPER_SIZES
        if self.sizes is not None:
            self.sizes = parse_sizes(self.sizes, self.chain)
        if not 0 < self.target <= 1:
            raise PathPatchingError(f"target faithfulness must be in (0, 1], got {self.target}")
        if self.on_unreachable not in ("error", "keep-all"):
            raise PathPatchingError(f"on_unreachable must be 'error' or 'keep-all', got "
                                    f"{self.on_unreachable!r}")
        self.check_at_least(("n_prompts", "n_validate", "n_scan", "n_mean", "batch_size",
                             "max_groups", "max_rows", "scan_exact"), error=PathPatchingError)
        if self.hybrid_k is not None and self.hybrid_k < 1:
            raise PathPatchingError(f"hybrid_k must be >= 1 (or None for 3 x size), got "
                                    f"{self.hybrid_k}")

    def resolved(self, n_layers: int, n_heads: int) -> tuple["DiscoveryConfig", list[str]]:
        """This config with ``method`` and ``sizing`` ``auto`` replaced by what they mean on a
        model of ``n_layers x n_heads`` heads, and the sentences saying why (printed with the
        progress bars and kept in the circuit's metadata). Exact path patching costs one partial
        forward per (sender, prompt) and edge — 336 senders x 100 prompts on a 24 x 14 model —
        while attribution scores every sender with two forward/backward passes per batch."""
        import dataclasses

        heads = n_layers * n_heads
        small = heads <= AUTO_EXACT_MAX_HEADS
        rules, changes = [], {}
        if self.method == "auto":
            changes["method"] = "exact" if small else "attribution"
            rules.append(
                f"method auto -> exact: {heads} heads <= {AUTO_EXACT_MAX_HEADS}, every sender "
                f"path-patched" if small else
                f"method auto -> attribution: {heads} heads > {AUTO_EXACT_MAX_HEADS}; exact "
                f"path patching would cost {heads} partial forwards per prompt and edge, the "
                f"gradient estimate two forward/backward passes per batch (its per-prompt "
                f"standard errors feed the same significance rule)")
        if self.sizing == "auto":
            changes["sizing"] = "exhaustive" if small else "bisect"
            rules.append(
                f"sizing auto -> exhaustive: {heads} heads <= {AUTO_EXACT_MAX_HEADS}" if small else
                f"sizing auto -> bisect: {heads} heads > {AUTO_EXACT_MAX_HEADS}, prefixes of "
                f"doubling length then bisection, no single-removal pruning")
        return (dataclasses.replace(self, **changes) if changes else self), rules

    def seed_streams(self) -> dict[str, int]:
        """The automatic chain's named prompt streams under ``seed``: ``validate_seed`` (the
        held-out prompts) and ``mean_seed`` (the means). Named sub-seeds, never ``seed + 1``:
        ``sample(seed + 1)`` draws with ``Random(seed + 1)``, the very stream the
        counterfactuals of ``corrupt(seed)`` use, so held-out prompt 0 shared counterfactual 0's
        objects and labels."""
        return {"validate_seed": sub_seed(self.seed, "validate"),
                "mean_seed": sub_seed(self.seed, "means")}


__all__ = ["AUTO_EXACT_MAX_HEADS", "CHAINS", "DiscoveryConfig", "SIZINGS", "DiscoveryError", "METHODS", "NoCircuitError",
           "PAPER_CHAIN", "PAPER_SIZES", "TargetUnreachable", "parse_sizes"]
