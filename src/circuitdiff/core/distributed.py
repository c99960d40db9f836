"""Ranks under ``torchrun``: who am I, which share of the work is mine, and the gathered result.

circuitdiff scales out with the engine its users already run — ``torch.distributed`` launched
by ``torchrun`` (one node, many nodes, Slurm alike) — never a home-made process pool. Every rank
runs the same program on the same inputs; the embarrassingly parallel inner loops give each
rank a share and gather the pieces back in a fixed order, so every rank ends up with the result
one process would have computed: the cells of a scan and ablation variants in contiguous shares
(:func:`share`, :func:`gather_shares`), the senders of a path-patching step and attribution's
prompt batches dealt round-robin (:func:`dealt`, :func:`gather_dealt`: senders sorted by layer
cost unequally, dealing evens the ranks out). Coarser loops — the evaluation's (model,
circuit) pairs, DCM's groups, CMAP's directions and fine-tunes, the study's per-model steps —
give each rank a contiguous share that it computes :func:`alone` (:func:`split_map`; with a run
folder, :func:`~circuitdiff.core.runs.split_pieces`): the inner splits of what it calls then
stay on that rank. Rank 0 alone writes the run folder
(:class:`~circuitdiff.core.runs.RunFolder` asks :func:`is_main`); a cache hit is decided on
rank 0 and broadcast (:func:`decide`), so all ranks take the same branch and never wait on
each other in a collective that one of them skipped.

Backend: NCCL when the ranks run on CUDA devices, gloo on CPU. Outside ``torchrun`` (no
``WORLD_SIZE`` in the environment) everything here is a no-op for one process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place: ``rank`` of ``world`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


_local = threading.local()


def _group():
    """``torch.distributed`` when a process group is initialised, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _dist():
    """The process group the helpers use: none inside :func:`alone` (one process's view)."""
    return None if getattr(_local, "alone", False) else _group()


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """The block runs as one process on this rank: :func:`share` and :func:`dealt` give the
    whole range, gathers and :func:`decide` are no-ops. For a rank working on its own share of
    an outer split (:func:`split_map`): the inner splits of what it calls (path-patching
    senders, ablation variants) must not wait on ranks busy with other items.
    :func:`is_main` still names rank 0 alone (only it writes)."""
    before = getattr(_local, "alone", False)
    _local.alone = True
    try:
        yield
    finally:
        _local.alone = before


def ranks() -> Ranks:
    """The current ranks: from the initialised process group, else one process."""
    dist = _dist()
    if dist is None:
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def launched() -> bool:
    """True when this process was started by ``torchrun`` with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str | None = None, timeout_s: float = 1800) -> Ranks:
    """Join the process group ``torchrun`` set up (no-op for one process): NCCL with each rank on
    ``cuda:LOCAL_RANK`` when ``device`` is CUDA, else gloo. Returns the ranks."""
    if not launched() or _group() is not None:
        return ranks()
    import torch.distributed as dist

    cuda = device is not None and str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))
    return ranks()


def rank_device(device: str | None) -> str | None:
    """``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun (each rank its own GPU)."""
    if device == "cuda" and launched():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


def is_main() -> bool:
    """True on rank 0 (and for one process), also inside :func:`alone`: the only rank that
    writes files."""
    dist = _group()
    return dist is None or dist.get_rank() == 0


def share(n: int, r: Ranks | None = None) -> range:
    """This rank's contiguous share of ``range(n)``: ranks get ``ceil``/``floor`` blocks in rank
    order, so concatenating the shares in rank order gives ``range(n)`` back."""
    r = r or ranks()
    base, extra = divmod(n, r.world)
    start = r.rank * base + min(r.rank, extra)
    return range(start, start + base + (1 if r.rank < extra else 0))


def gather_cat(local: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The rank-ordered concatenation of every rank's ``local`` along ``dim`` (shapes may differ
    along ``dim``); ``local`` itself for one process."""
    dist = _dist()
    if dist is None:
        return local
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local.detach().cpu())
    return torch.cat(parts, dim=dim).to(local.device)


def dealt(n: int, r: Ranks | None = None) -> list[int]:
    """This rank's indices of ``range(n)`` dealt round-robin (rank ``r`` gets ``r, r + W, ...``):
    a share of the same size as :func:`share` that mixes cheap and costly items when their cost
    runs with the index (path-patching senders sorted by layer). :func:`gather_dealt` undoes it."""
    r = r or ranks()
    return list(range(r.rank, n, r.world))


def gather_dealt(local: torch.Tensor, n: int) -> torch.Tensor:
    """Every rank's rows for its :func:`dealt` indices, gathered back into index order:
    ``[n, ...]`` on every rank (``local`` itself for one process)."""
    r = ranks()
    if r.world == 1:
        return local
    gathered = gather_cat(local, 0)
    order = torch.tensor([i for k in range(r.world) for i in range(k, n, r.world)],
                         dtype=torch.long)
    out = torch.empty_like(gathered)
    out[order.to(out.device)] = gathered
    return out


def gather_shares(full: torch.Tensor) -> torch.Tensor:
    """``full`` ``[n, ...]`` whose rows :func:`share` ``(n)`` this rank filled, with every other
    row taken from the rank that owns it (``full`` itself for one process)."""
    if ranks().world == 1:
        return full
    mine = share(len(full))
    return gather_cat(full[mine.start:mine.stop], 0)


def decide(value: T) -> T:
    """Rank 0's ``value`` on every rank (a cache hit, a loaded result): one branch for all."""
    dist = _dist()
    if dist is None:
        return value
    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    dist = _dist()
    if dist is not None:
        dist.barrier()


def concat_shares(values: Sequence[T]) -> list[T]:
    """Every rank's list of Python values, concatenated in rank order."""
    dist = _dist()
    if dist is None:
        return list(values)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(values))
    return [v for p in parts for v in p]


def split_map(n: int, compute: Callable[[int], T]) -> list[T]:
    """``[compute(i) for i in range(n)]`` on every rank: each rank computes its contiguous
    :func:`share` :func:`alone` and the values are gathered in index order (the same list one
    process makes, whatever the number of ranks). ``compute`` must not depend on what another
    index's call did on the same rank beyond caching (a rank sees only its share)."""
    if ranks().world == 1:
        return [compute(i) for i in range(n)]
    mine = share(n)  # taken before going alone, where every rank is rank 0 of 1
    with alone():
        local = [compute(i) for i in mine]
    return concat_shares(local)


__all__ = ["Ranks", "alone", "barrier", "concat_shares", "dealt", "decide", "gather_cat",
           "gather_dealt", "gather_shares", "init", "is_main", "launched", "rank_device", "ranks",
           "share", "split_map"]
