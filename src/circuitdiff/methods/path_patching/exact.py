"""Exact path-patching scores: the fast single-position engine and the public entry point
:func:`path_patching_scores` (which falls back to :mod:`.naive` where the fast path cannot
replay a layer)."""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ...core.arch import Architecture, unwrap
from ...core.circuit import Head
from ...core.interventions import Read, StopAfter, Write, intervene, run_with_edits
from ...core.metrics import answer_prob, logits_at_last
from ...core.model import LoadedModel
from ...core.task import Batch, Prompt
from .common import (IMPLS, PathPatchingError, _check_request, _check_sets, _encode_checked,
                     _norm_heads, _Request, all_heads, role_positions)
from .naive import _naive_batch


# -- the single-position replay (fast path) ----------------------------------------------------
class _Replay:
    """A Llama-style decoder evaluated at one position with attention outputs given.

    Calls the model's own modules: each layer's ``input_layernorm``, q/k/v/o projections,
    ``post_attention_layernorm`` and ``mlp``, then the final norm and ``lm_head``. Only layers of
    the shape ``h + attn(ln1(h)); h + mlp(ln2(h))`` qualify; :meth:`check` confirms numerically.
    """

    def __init__(self, model: nn.Module, arch: Architecture):
        self.arch = arch
        inner = unwrap(model)
        for i, layer in enumerate(arch.layers):
            missing = [a for a in ("input_layernorm", "post_attention_layernorm", "mlp")
                       if not isinstance(getattr(layer, a, None), nn.Module)]
            extra = [a for a in ("pre_feedforward_layernorm", "post_feedforward_layernorm")
                     if getattr(layer, a, None) is not None]
            if missing or extra:
                raise PathPatchingError(
                    f"layer {i} is not a plain pre-norm decoder layer ("
                    f"{'missing ' + ', '.join(missing) if missing else 'has ' + ', '.join(extra)})")
        base = getattr(inner, "model", None)
        self.norm = getattr(base, "norm", None)
        self.lm_head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") \
            else None
        if not isinstance(self.norm, nn.Module) or not isinstance(self.lm_head, nn.Module):
            raise PathPatchingError("model has no final .model.norm / lm_head")
        # the ModuleList the model's forward loops over, if it is exactly arch.layers: pass 2
        # may then skip the (clean) layers below the first receiver
        layers = getattr(base, "layers", None)
        self.layer_owner = base if isinstance(layers, nn.ModuleList) and len(layers) == len(
            arch.layers) and all(a is b for a, b in zip(layers, arch.layers)) else None

    def attn_in(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return self.arch.layers[layer].input_layernorm(h)

    def proj(self, layer: int, h: torch.Tensor, kind: str) -> torch.Tensor:
        site = self.arch.attention[layer]
        mod = {"q": site.q, "k": site.k, "v": site.v}[kind]
        return mod(self.attn_in(layer, h))

    def o(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        return self.arch.attention[layer].o(z)

    def mlp(self, layer: int, mid: torch.Tensor) -> torch.Tensor:
        lay = self.arch.layers[layer]
        return mid + lay.mlp(lay.post_attention_layernorm(mid))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))


@dataclass
class _Clean:
    """What the fast path needs from one clean + one counterfactual forward, at the role's
    tokens ``p`` only. Rows are (sample, role token) pairs, sample-major: ``R = B * P``."""

    p: torch.Tensor          # [B, P] token indices of the role
    z: torch.Tensor          # [L, R, H, D] clean head outputs at p
    z_cf: torch.Tensor       # [L, R, H, D] counterfactual head outputs at p
    resid: torch.Tensor      # [L + 1, R, hidden] residual entering each layer (and after the last)
    attn: torch.Tensor       # [L, R, hidden] o_proj output at p
    logits: torch.Tensor     # [B, V] clean logits at last
    p_clean: torch.Tensor    # [B]


def _capture(loaded: LoadedModel, bc: Batch, bx: Batch, position: str) -> _Clean:
    """Clean and counterfactual forwards reading only the role's tokens of every layer (the
    counterfactual at the clean token indices: both prompts share one layout)."""
    model, arch, dev = loaded.model, loaded.arch, loaded.device
    L = arch.n_layers
    p = role_positions(bc, position).to(dev)  # [B, P]
    rows = torch.arange(len(p), device=dev)[:, None]
    resid: list[torch.Tensor | None] = [None] * (L + 1)
    attn: list[torch.Tensor | None] = [None] * L
    handles = []

    def pre(i):
        def hook(_m, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            resid[i] = h[rows, p].detach().flatten(0, 1)
        return hook

    def post_layer(_m, _i, out):
        h = out[0] if isinstance(out, tuple) else out
        resid[L] = h[rows, p].detach().flatten(0, 1)

    def post_o(i):
        def hook(_m, _i, out):
            attn[i] = out[rows, p].detach().flatten(0, 1)
        return hook

    try:
        for i in range(L):
            handles.append(arch.layers[i].register_forward_pre_hook(pre(i), with_kwargs=True))
            handles.append(arch.attention[i].o.register_forward_hook(post_o(i)))
        handles.append(arch.layers[L - 1].register_forward_hook(post_layer))
        read = Read(list(range(L)), p, "head")
        logits = logits_at_last(model, bc.model_inputs(dev), bc.positions["last"], [read], arch)
    finally:
        for h in handles:
            h.remove()
    read_cf = Read(list(range(L)), p, "head")
    run_with_edits(model, bx.model_inputs(dev), [read_cf, StopAfter(L - 1)], arch)
    z = torch.stack([read.out[l].flatten(0, 1) for l in range(L)])
    z_cf = torch.stack([read_cf.out[l].flatten(0, 1) for l in range(L)])
    return _Clean(p, z, z_cf, torch.stack(resid), torch.stack(attn), logits,
                  answer_prob(logits, bc.answer_ids))


def _replay_error(rep: _Replay, c: _Clean) -> float:
    """Relative error of replaying the clean run at ``p`` (0 up to float rounding)."""
    L = rep.arch.n_layers
    h = c.resid[0]
    worst = 0.0
    with torch.no_grad():
        for l in range(L):
            mid = h + rep.o(l, c.z[l].flatten(-2))
            h = rep.mlp(l, mid)
            ref = c.resid[l + 1]
            err = (h - ref).float().norm() / ref.float().norm().clamp_min(1e-12)
            worst = max(worst, float(err))
            h = ref  # check each layer from the true input, so errors do not compound
    return worst


def _logits_error(rep: _Replay, c: _Clean, last: torch.Tensor) -> float:
    if c.p.shape[1] != 1 or not bool((c.p[:, 0] == last.to(c.p.device)).all()):
        return 0.0
    with torch.no_grad():
        lg = rep.logits(c.resid[-1])
    return float((lg - c.logits).float().norm() / c.logits.float().norm().clamp_min(1e-12))


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-3 if dtype == torch.float32 else 3e-2


def _pass1(rep: _Replay, c: _Clean, req: _Request, senders: list[Head],
           answers: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """Single-position pass 1 for ``senders`` (sorted by layer) of one sample batch; every token
    of the role is its own row (with attention frozen, tokens do not interact).

    Returns, per receiver layer, ``[N, B*P, units, D]`` receiver inputs (clean where the sender is
    not below that layer) and, for logits receivers, ``[N, B]`` patched answer probabilities.
    """
    arch = rep.arch
    D = arch.head_dim
    N = len(senders)
    B = c.z.shape[1]
    layers = torch.tensor([l for l, _ in senders])
    heads = torch.tensor([h for _, h in senders], device=c.z.device)
    recv_layers = req.recv_layers()
    end = max(recv_layers) if recv_layers else arch.n_layers
    recv: dict[int, torch.Tensor] = {}
    for lr in recv_layers:  # clean receiver inputs, replaced below for senders under layer lr
        clean_in = rep.proj(lr, c.resid[lr], req.kind)
        recv[lr] = clean_in.view(1, B, -1, D).expand(N, B, -1, D).clone()
    state = None
    start = int(layers.min())
    eye_all = torch.arange(arch.n_heads, device=c.z.device)
    for l in range(start, end):
        if l in recv and state is not None:
            recv[l][: len(state)] = rep.proj(l, state, req.kind).view(len(state), B, -1, D)
        sel = (layers == l).nonzero()[:, 0]
        if state is not None:
            state = state + c.attn[l]
        if len(sel):
            onehot = (eye_all[None, :] == heads[sel.to(heads.device)][:, None])  # [n, H]
            z_edit = torch.where(onehot[:, None, :, None], c.z_cf[l][None], c.z[l][None])
            mid_new = c.resid[l][None] + rep.o(l, z_edit.flatten(-2))
            state = mid_new if state is None else torch.cat([state, mid_new])
        if state is not None:
            state = rep.mlp(l, state)
    if recv_layers:
        if end in recv and state is not None:
            recv[end][: len(state)] = rep.proj(end, state, req.kind).view(len(state), B, -1, D)
        return recv, None
    return recv, answer_prob(rep.logits(state), answers)


class _PrefixCache:
    """Clean KV cache of positions ``[0, s)``, tiled over senders on demand (and reused), plus
    the clean residual entering layer ``start`` at positions ``>= s`` when the suffix forward
    may skip the layers below the first receiver (they are clean in pass 2)."""

    def __init__(self, model: nn.Module, arch: Architecture, inputs: dict, s: int, start: int):
        self.batch = inputs["input_ids"].shape[0]
        self.cache = None
        if s > 0:
            pre = {k: v[:, :s] for k, v in inputs.items()}
            self.cache = model(**pre, use_cache=True, logits_to_keep=1).past_key_values
        self.start, self.hidden = 0, None
        if start > 0:
            got = {}

            def grab(_m, _i, out):
                got["h"] = (out[0] if isinstance(out, tuple) else out)[:, s:].detach()
            handle = arch.layers[start - 1].register_forward_hook(grab)
            try:
                run_with_edits(model, inputs, [StopAfter(start - 1)], arch)
            finally:
                handle.remove()
            self.start, self.hidden = start, got["h"]
        self._tiled: dict[int, object] = {}

    def tiled(self, n: int):
        """The cache repeated ``n`` times along the batch (row ``i*B + b`` = sample ``b``)."""
        if self.cache is None:
            return None
        if n not in self._tiled:
            self._tiled.clear()
            c = copy.deepcopy(self.cache)
            dev = next(iter(c.layers)).keys.device
            c.batch_select_indices(torch.arange(self.batch, device=dev).repeat(n))
            self._tiled[n] = c
        return _fresh(self._tiled[n])


@contextlib.contextmanager
def _skip_layers(rep: "_Replay", start: int, hidden: torch.Tensor):
    """Run only decoder layers ``>= start``, feeding ``hidden`` as the residual entering
    ``start`` (the layers below compute the same clean values; skipping them is exact)."""
    owner = rep.layer_owner
    layers = owner.layers
    first = layers[start]

    def feed(_m, args, kwargs):
        if args:
            return (hidden,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}
    handle = first.register_forward_pre_hook(feed, with_kwargs=True)
    owner.layers = nn.ModuleList(list(layers)[start:])
    try:
        yield
    finally:
        owner.layers = layers
        handle.remove()


def _fresh(cache):
    """A shallow copy a forward may grow: DynamicCache layers replace, never modify, their
    tensors (``torch.cat``), so the tiled prefix tensors stay clean for the next chunk."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    return new


def _pass2(model: nn.Module, rep: "_Replay", inputs: dict, pc: "_PrefixCache | None", s: int,
           p: torch.Tensor, req: _Request, recv: dict[int, torch.Tensor],
           active: dict[int, torch.Tensor], answers: torch.Tensor,
           last: torch.Tensor) -> torch.Tensor:
    """Clean suffix forward (positions >= s) with receiver inputs replaced at the role's tokens
    ``p`` ``[B, P]`` (``recv`` values ``[N, B, P, units, D]``); ``[N, B]`` probs."""
    arch = rep.arch
    N, B, P = next(iter(recv.values())).shape[:3]
    dev = p.device
    T = inputs["input_ids"].shape[1]
    rep_in = {"input_ids": inputs["input_ids"][:, s:].repeat(N, 1),
              "attention_mask": inputs["attention_mask"].repeat(N, 1),
              "position_ids": inputs["position_ids"][:, s:].repeat(N, 1)}
    pos = (p - s).repeat(N, 1)  # [N*B, P]
    edits = []
    for lr, vals in recv.items():
        where = req.unit_mask(arch, lr).to(dev)[None, :] & active[lr].to(dev)[:, None]  # [N, U]
        edits.append(Write(lr, vals.reshape(N * B, P, *vals.shape[3:]), pos,
                           where.repeat_interleave(B, 0)[:, None, :], req.kind))
    cache = pc.tiled(N) if pc is not None else None
    kw = {"past_key_values": cache, "use_cache": True} if cache is not None else \
        {"use_cache": False}
    keep = {"logits_to_keep": 1} if bool((last == T - 1).all()) else {}
    skip = _skip_layers(rep, pc.start, pc.hidden.repeat(N, 1, 1)) \
        if pc is not None and pc.start > 0 else contextlib.nullcontext()
    with intervene(model, edits, arch), skip:
        logits = model(**rep_in, **kw, **keep).logits
    if keep:
        logits = logits[:, -1]
    else:
        idx = (last - s).repeat(N)
        logits = logits[torch.arange(N * B, device=dev), idx]
    return answer_prob(logits.view(N, B, -1), answers)


def _fast_batch(loaded: LoadedModel, rep: _Replay, bc: Batch, bx: Batch, req: _Request,
                max_rows: int, bar=None) -> torch.Tensor:
    """Per-sample score of every sender on this batch: ``[len(senders), B]`` (0 for senders at
    or after the last receiver layer)."""
    model, arch, dev = loaded.model, loaded.arch, loaded.device
    c = _capture(loaded, bc, bx, req.position)
    err = max(_replay_error(rep, c), _logits_error(rep, c, bc.positions["last"]))
    if err > _tolerance(c.resid.dtype):
        raise _Unsupported(f"replaying the clean run at one position misses by {err:.2g} "
                           f"(relative); this decoder layer is not of the supported shape")
    answers = bc.answer_ids.to(dev)
    B = len(bc)
    order = sorted(range(len(req.senders)), key=lambda i: req.senders[i])
    out = torch.zeros(len(req.senders), len(bc), dtype=torch.float32)
    recv_layers = req.recv_layers()
    last_recv = max(recv_layers) if recv_layers else arch.n_layers
    live = [i for i in order if req.senders[i][0] < last_recv]  # others score exactly 0
    inputs = bc.model_inputs(dev)
    last = bc.positions["last"].to(dev)
    groups = []  # samples sharing a receiver position share a prefix cache and a suffix
    chunk = max(1, max_rows // B)
    if recv_layers:
        T = inputs["input_ids"].shape[1]
        starts = c.p.min(1).values  # the suffix of a sample starts at its role's first token
        for s in torch.unique(starts).tolist():
            rows = (starts == s).nonzero()[:, 0]
            sub = {k: v[rows] for k, v in inputs.items()}
            start = min(recv_layers) if rep.layer_owner is not None else 0
            groups.append((s, rows, sub, _PrefixCache(model, arch, sub, s, start)))
            # rows of one pass-2 forward are (sender, sample) pairs over the suffix: bound them
            chunk = max(1, min(chunk, max_rows // (len(rows) * max(1, T - s))))
        # every group keeps its prefix cache tiled over the chunk's senders: bound their bytes
        cache_row = 2 * arch.n_layers * arch.n_kv_heads * arch.head_dim * \
            max(1, int(c.p.max())) * c.z.element_size()
        chunk = max(1, min(chunk, _cache_budget(dev) // (B * cache_row)))
    for i in range(0, len(live), chunk):
        idx = live[i:i + chunk]
        senders = [req.senders[j] for j in idx]
        recv, probs = _pass1(rep, c, req, senders, answers)
        if probs is None:
            active = {lr: torch.tensor([l < lr for l, _ in senders]) for lr in recv_layers}
            probs = torch.empty(len(idx), B, device=dev)
            P = c.p.shape[1]
            for s, rows, sub, cache in groups:
                probs[:, rows] = _pass2(
                    model, rep, sub, cache, s, c.p[rows], req,
                    {lr: v.view(len(idx), B, P, *v.shape[2:])[:, rows] for lr, v in recv.items()},
                    active, answers[rows], last[rows])
        score = (probs - c.p_clean[None]) / c.p_clean[None]
        out[torch.tensor(idx)] = score.float().cpu()
        if bar is not None:
            bar.update(len(idx) * B)
    if bar is not None:
        bar.update((len(req.senders) - len(live)) * B)
    return out


def _cache_budget(device: torch.device) -> int:
    """Bytes the repeated prefix caches of one pass-2 forward may take."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.3)
    return 1 << 30


class _Unsupported(Exception):
    pass



@torch.no_grad()
def path_patching_scores(loaded: LoadedModel, clean: Sequence[Prompt],
                         counterfactual: Sequence[Prompt], position: str = "last",
                         receivers: Sequence[Head | str] = (), receiver_kind: str = "q",
                         senders: Sequence[Head | str] | None = None, impl: str = "fast",
                         batch_size: int = 32, max_rows: int | None = None,
                         progress: bool = False, desc: str = "path patching",
                         return_se: bool = False
                         ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Path-patching score of every sender head: a float32 ``[n_layers, n_heads]`` tensor.

    ``receivers`` are query heads ``(layer, head)`` (or ``"layer.head"``) whose ``receiver_kind``
    input (q, k or v; k/v patch the receiver's kv head) is patched in pass 2; empty means the
    logits. ``senders`` defaults to every head; heads not scored are 0. ``impl="naive"`` is the
    oracle. ``max_rows`` bounds the rows (sender x sample x suffix token) of one batched forward
    (default 16384 on CPU, 131072 on CUDA).
    Scores are means over samples; the most negative heads matter most. ``return_se`` also
    returns each mean's standard error over samples (``[n_layers, n_heads]``, 0 where not scored):
    the spread significance tests compare a score with.
    """
    if impl not in IMPLS:
        raise PathPatchingError(f"impl must be one of {IMPLS}, got {impl!r}")
    if batch_size < 1:
        raise PathPatchingError(f"batch_size must be >= 1, got {batch_size}")
    arch = loaded.arch
    send = _norm_heads(senders, arch, "sender") if senders is not None else all_heads(arch)
    recv = _norm_heads(receivers, arch, "receiver")
    _check_request(arch, send, recv, receiver_kind, position)
    _check_sets(loaded, clean, counterfactual)
    req = _Request(position, send, recv, receiver_kind if recv else "q")
    if max_rows is None:
        max_rows = 131072 if loaded.device.type == "cuda" else 16384
    rep = None
    if impl == "fast":
        try:
            rep = _Replay(loaded.model, arch)
        except PathPatchingError as e:
            warnings.warn(f"fast path patching unsupported for {arch.model_type} ({e}); using "
                          f"the naive path", stacklevel=2)
    from tqdm.auto import tqdm

    per_sample: list[torch.Tensor] = []  # [senders, B] per batch
    with tqdm(total=len(send) * len(clean), desc=desc, unit="run", disable=not progress) as bar:
        for i in range(0, len(clean), batch_size):
            bc, bx = _encode_checked(loaded, clean[i:i + batch_size],
                                     counterfactual[i:i + batch_size], position)
            if rep is not None:
                try:
                    per_sample.append(_fast_batch(loaded, rep, bc, bx, req, max_rows, bar))
                    continue
                except _Unsupported as e:
                    warnings.warn(f"fast path patching unsupported: {e}; using the naive path",
                                  stacklevel=2)
                    rep = None
            per_sample.append(_naive_batch(loaded, bc, bx, req, bar))
    samples = torch.cat(per_sample, 1).double()
    scores = torch.zeros(arch.n_layers, arch.n_heads, dtype=torch.float32)
    idx = torch.tensor(send)
    scores[idx[:, 0], idx[:, 1]] = samples.mean(1).float()
    if not return_se:
        return scores
    se = torch.zeros_like(scores)
    if samples.shape[1] > 1:
        se[idx[:, 0], idx[:, 1]] = (samples.std(1) / samples.shape[1] ** 0.5).float()
    return scores, se

