"""Attention knockout: stop one position from attending to another in layers ≥ L.

An *edge* ``query:key`` names two roles of the task's position schema in each prompt
(``last:correct_object``, ``query_label:prev_query_label``, ``labels:objects`` — every label token
blocked from every object token —, ``last:prev_query_label+1``...). Blocking it in layers ≥ L, for every L, gives an accuracy
curve: the paper finds accuracy collapses when ``last → correct_object`` is blocked from early
enough layers, and random edges do nothing.

The model's own attention runs unchanged: a forward pre-hook on each decoder layer edits the 4-D
attention mask the layer receives as its ``attention_mask`` kwarg (transformers ≥ 4.48 / 5.x),
per sample and vectorised:

* eager attention gets an additive float mask ``[B, 1, T, T]`` (0 / dtype min) — blocked entries
  are set to the dtype minimum, as padding is;
* sdpa gets a bool mask (True = attend) — blocked entries become False;
* sdpa with no padding gets ``None`` (it then uses ``is_causal``) — a causal bool mask is
  materialised (only in layers where something is blocked);
* flash attention (2-D masks) and flex attention (``BlockMask``) cannot express per-entry
  blocking: a clear error asks for ``attn_implementation="sdpa"`` or ``"eager"``.

A token's attention to itself is never blocked, so no softmax row is ever empty.
Several knockout variants (one per L) run in one forward: rows of the batch carry their own
first blocked layer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..core.arch import Architecture
from ..core.config import Config, execution
from ..core.metrics import correct, last_logits
from ..core.model import LoadedModel
from ..core.runs import RunFolder, model_tag, safe_name
from ..core.task import (POSITION_NAMES, Batch, Prompt, TaskError, batches, check_role, encode,
                         sample_prompts)
from .ablation import role_mask, variant_chunks
from .accuracy import prompts_key
from .base import Result, as_store, cached_result

#: key names besides the schema's roles
MULTI_KEYS = ("all", "random")


class KnockoutError(ValueError):
    """Raised for an edge or model the knockout cannot handle."""


@dataclass(frozen=True)
class Edge:
    """Block attention from ``query`` (a per-prompt position) to ``key``."""

    query: str
    key: str

    @classmethod
    def parse(cls, spec: str) -> "Edge":
        """``"last:correct_object"``; ``"random"`` is short for ``"last:random"``."""
        if spec == "random":
            return cls("last", "random")
        if spec.count(":") != 1:
            raise KnockoutError(f"edge {spec!r} is not QUERY:KEY (e.g. last:correct_object) or "
                                f"'random'")
        q, k = spec.split(":")
        for what, name in (("query", q), ("key", k)):
            if what == "key" and name in MULTI_KEYS:
                continue
            try:
                check_role(name)
            except TaskError as e:
                extra = f" (keys may also be {', '.join(MULTI_KEYS)})" if what == "key" else ""
                raise KnockoutError(f"edge {spec!r}: {what}: {e}{extra}") from None
        if q == k:
            raise KnockoutError(f"edge {spec!r}: a position's attention to itself is never blocked")
        return cls(q, k)

    def __str__(self) -> str:
        return f"{self.query}:{self.key}"


def block_matrix(batch: Batch, edge: Edge, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """Bool ``[B, T, T]``: True at (query position, key position) entries to block.

    ``random`` draws, per sample, one real token before the query position that is none of the
    named positions (a control edge); ``all`` blocks every other position.
    """
    B, T = batch.input_ids.shape
    rows = torch.arange(B)

    def at(role: str) -> torch.Tensor:  # bool [B, T]: the role's tokens in each sample
        return role_mask(batch, role, KnockoutError, "knockout")

    queries = at(edge.query)
    first_q = queries.float().argmax(1)
    t = torch.arange(T)
    if edge.key == "all":
        keys = torch.ones(B, T, dtype=torch.bool)
    elif edge.key == "random":
        cand = batch.attention_mask.bool() & (t[None] < first_q[:, None])
        for name in POSITION_NAMES:
            p = batch.positions[name]
            cand &= ~((t[None] == p[:, None]) & (p[:, None] >= 0))
        if not bool(cand.any(1).all()):
            raise KnockoutError(f"some prompt has no token before {edge.query!r} to draw a "
                                f"random edge from")
        score = torch.rand(B, T, generator=generator).masked_fill(~cand, -1.0)
        keys = torch.zeros(B, T, dtype=torch.bool)
        keys[rows, score.argmax(1)] = True
    else:
        keys = at(edge.key)
    out = queries[:, :, None] & keys[:, None, :]
    out &= ~torch.eye(T, dtype=torch.bool)[None]  # never block attention to itself
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    if edge.key != "all" and not bool((out & causal[None]).any()):
        raise KnockoutError(f"edge {edge} blocks nothing: {edge.key} comes after {edge.query} in "
                            f"every prompt and causal attention never looks ahead; block "
                            f"{edge.key}:{edge.query} instead")
    return out


def _edited_mask(mask, block: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The layer's attention mask with ``block`` ``[B, T, T]`` entries disabled."""
    B, T = hidden.shape[:2]
    if mask is None:  # sdpa's is_causal fast path: no padding, so the mask is plain causal
        mask = torch.ones(T, T, dtype=torch.bool, device=hidden.device).tril()[None, None]
    if not isinstance(mask, torch.Tensor):
        raise KnockoutError(
            f"the model passes a {type(mask).__name__} attention mask (flex attention); attention "
            f"knockout needs attn_implementation='sdpa' or 'eager'")
    if mask.dim() != 4 or mask.shape[-2:] != (T, T):
        raise KnockoutError(
            f"the decoder layer got an attention mask of shape {tuple(mask.shape)}, not "
            f"[B, 1, {T}, {T}] (flash attention or a KV cache?); attention knockout needs "
            f"attn_implementation='sdpa' or 'eager' and no cache")
    mask = mask.expand(B, *mask.shape[1:])
    blk = block.to(mask.device)[:, None]
    if mask.dtype == torch.bool:
        return mask & ~blk
    return mask.masked_fill(blk, torch.finfo(mask.dtype).min)


@contextlib.contextmanager
def attention_knockout(arch: Architecture, block: torch.Tensor,
                       from_layer: int | torch.Tensor = 0) -> Iterator[None]:
    """Block ``block`` ``[B, T, T]`` entries in every decoder layer ``l ≥ from_layer``.

    ``from_layer`` may be per row (``[B]``) to run several knockout variants in one forward.
    Hooks are removed on exit, also when the forward raises.
    """
    B = block.shape[0]
    start = torch.as_tensor(from_layer).expand(B).cpu()
    handles = []

    def make(layer: int):
        active = start <= layer
        blk = block & active[:, None, None]
        if not bool(blk.any()):
            return None

        def pre(_mod, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if "attention_mask" in kwargs:
                kwargs["attention_mask"] = _edited_mask(kwargs["attention_mask"], blk, hidden)
            elif len(args) > 1:
                args = (args[0], _edited_mask(args[1], blk, hidden)) + tuple(args[2:])
            else:
                kwargs["attention_mask"] = _edited_mask(None, blk, hidden)
            return args, kwargs
        return pre

    try:
        for layer in range(arch.n_layers):
            fn = make(layer)
            if fn is not None:
                handles.append(arch.layers[layer].register_forward_pre_hook(fn, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class KnockoutCurve(Result):
    """Accuracy with ``edge`` blocked in layers ≥ L, for each L in ``layers``."""

    edge: str
    layers: list[int]
    accuracy: list[float]
    in_context_accuracy: list[float]
    baseline: float
    baseline_in_context: float
    n: int
    seed: int = 0


@torch.no_grad()
def knockout_curve(loaded: LoadedModel, prompts: Sequence[Prompt], edge: Edge | str,
                   layers: Sequence[int] | None = None, seed: int = 0, batch_size: int = 32,
                   max_rows: int = 256, progress: bool = False) -> KnockoutCurve:
    """Accuracy with ``edge`` blocked from each L in ``layers`` (default: every layer) on: one
    curve, uncached (the method, over several edges and cached, is :func:`run`).

    All Ls (plus the unblocked baseline) are stacked along the batch dimension, up to
    ``max_rows`` rows per forward.
    """
    edge = Edge.parse(edge) if isinstance(edge, str) else edge
    n_layers = loaded.arch.n_layers
    layers = list(range(n_layers)) if layers is None else [int(l) for l in layers]
    for l in layers:
        if not 0 <= l < n_layers:
            raise KnockoutError(f"layer {l} does not exist (model has {n_layers})")
    starts = torch.tensor(layers + [n_layers])  # last variant: nothing blocked
    V = len(starts)
    gen = torch.Generator().manual_seed(seed)
    hits = torch.zeros(V, len(prompts), dtype=torch.bool)
    in_ctx = torch.zeros(V, len(prompts), dtype=torch.bool)
    from tqdm.auto import tqdm

    for i, batch in enumerate(tqdm(batches(prompts, loaded.tokenizer, batch_size),
                                   desc=f"knockout {edge} {loaded.name}", disable=not progress,
                                   unit="batch")):
        if bool((batch.answer_ids < 0).any()):
            raise KnockoutError("knockout needs prompts whose query names a box")
        block = block_matrix(batch, edge, gen)
        B = len(batch)
        for s, k, big in variant_chunks(batch, V, max_rows):
            with attention_knockout(loaded.arch, block.repeat(k, 1, 1),
                                    starts[s:s + k].repeat_interleave(B)):
                logits = last_logits(loaded, big)
            cols = slice(i * batch_size, i * batch_size + B)
            hits[s:s + k, cols] = correct(logits, big, "accuracy").cpu().view(k, B)
            in_ctx[s:s + k, cols] = correct(logits, big, "in_context").cpu().view(k, B)
    acc = hits.double().mean(1).tolist()
    ctx = in_ctx.double().mean(1).tolist()
    return KnockoutCurve(str(edge), layers, acc[:-1], ctx[:-1], acc[-1], ctx[-1], len(prompts), seed)


#: the edges ``circuitdiff knockout`` blocks by default
DEFAULT_EDGES = ("last:correct_object", "query_label:prev_query_label", "random")


@dataclass
class KnockoutConfig(Config):
    """What decides a knockout run.

    ``edges``: the edges to block (``QUERY:KEY`` or ``random``, see :meth:`Edge.parse`);
    ``layers``: the first blocked layers to try (``None``: every layer);
    ``n``: prompts (``n_boxes`` boxes, drawn with ``seed``; ``seed`` also draws the random edge);
    ``batch_size``/``max_rows``: prompts per batch and rows per stacked forward (execution only).
    """

    edges: tuple[str, ...] = DEFAULT_EDGES
    layers: tuple[int, ...] | None = None
    n: int = 500
    seed: int = 0
    n_boxes: int = 7
    batch_size: int = execution(32)
    max_rows: int = execution(256)

    def __post_init__(self) -> None:
        if isinstance(self.edges, str):
            self.edges = (self.edges,)
        if not self.edges:
            raise KnockoutError("KnockoutConfig: edges is empty; name at least one edge, e.g. "
                                "last:correct_object")
        self.edges = tuple(str(Edge.parse(str(e))) for e in self.edges)
        if self.layers is not None:
            self.layers = tuple(int(l) for l in self.layers)
            if not self.layers or min(self.layers) < 0:
                raise KnockoutError(f"KnockoutConfig: layers {list(self.layers)} must name at "
                                    f"least one layer >= 0 (or be None for every layer)")
        self.check_at_least(("n", "n_boxes", "batch_size", "max_rows"), error=KnockoutError,
                            prefix="KnockoutConfig: ")

    def prompts(self, tokenizer) -> list[Prompt]:
        """The config's own prompts for a model with ``tokenizer``."""
        return sample_prompts(tokenizer, self.n, self.n_boxes, self.seed)


@dataclass
class KnockoutResult(Result):
    """One model's knockout curves, one per edge of the config, in its order."""

    model: str
    curves: list[KnockoutCurve]

    @classmethod
    def from_dict(cls, d: dict) -> "KnockoutResult":
        return cls(d["model"], [KnockoutCurve.from_dict(c) for c in d["curves"]])


def check_edges(tokenizer, config: KnockoutConfig, prompts: Sequence[Prompt] | None = None
                ) -> list[Edge]:
    """The config's edges, each checked to block something on the first batch of ``prompts``
    (default: the config's own) — a tokenizer is enough, so a command can check before it loads
    a model."""
    ps = config.prompts(tokenizer) if prompts is None else prompts
    probe = encode(list(ps[:config.batch_size]), tokenizer)
    edges = [Edge.parse(e) for e in config.edges]
    for edge in edges:
        block_matrix(probe, edge)
    return edges


def run(model: LoadedModel, prompts: Sequence[Prompt] | None, config: KnockoutConfig, *,
        store: "RunFolder | str | None" = None, progress: bool | None = None) -> KnockoutResult:
    """A :class:`KnockoutCurve` per edge of ``config`` on ``model``, each cached in ``store`` as
    ``knockout/<model>/<edge>.json`` under the model, its dtype and the config's settings (the
    edge's own, not the other edges'), so a killed run resumes edge by edge. Every edge is
    checked to block something before any curve is computed."""
    folder = as_store(store)
    ps = config.prompts(model.tokenizer) if prompts is None else list(prompts)
    edges = check_edges(model.tokenizer, config, ps)
    shared = {k: v for k, v in config.cache_key().items() if k != "edges"}
    dtype = str(next(model.model.parameters()).dtype).replace("torch.", "")
    slug = model_tag(model.name)
    curves = []
    for edge in edges:
        key = {"model": model.name, "edge": str(edge), **shared, "dtype": dtype,
               **prompts_key(prompts)}
        curves.append(cached_result(
            folder, f"knockout/{slug}/{safe_name(str(edge))}.json", key,
            lambda: knockout_curve(model, ps, edge, config.layers, config.seed, config.batch_size,
                                   config.max_rows, bool(progress)), KnockoutCurve))
    return KnockoutResult(model.name, curves)
