"""Exact path-patching scores: the fast single-position engine and the public entry point
:func:`path_patching_scores` (which falls back to :mod:`.naive` where the fast path cannot
replay a layer). How the fast path computes (kernel, attention mode, rows per forward) is a
:class:`FastOptions` argument; reuse of clean runs across calls is an explicit
:class:`CaptureCache` argument — no module-level switches."""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ...core.arch import Architecture, unwrap
from ...core.circuit import Head
from ...core.interventions import Read, StopAfter, Write, intervene, run_with_edits
from ...core.metrics import answer_prob, logits_at_last
from ...core.model import LoadedModel
from ...core.task import Batch, Prompt
from .common import (IMPLS, PatchRequest, PathPatchingError, _check_sets, _encode_checked,
                     _Request, role_positions)
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


def _shared_capture(loaded: LoadedModel, bc: Batch, bx: Batch, position: str) -> _Clean:
    """:func:`_capture`, computed once: under ``torchrun`` rank 0 runs the two forwards and
    hands the (small: role tokens only) capture to the other ranks, which every rank's call of
    the same batch reaches in the same order; one process computes it."""
    from ...core import distributed

    r = distributed.ranks()
    if r.world == 1:
        return _capture(loaded, bc, bx, position)
    mine = _capture(loaded, bc, bx, position) if r.main else None
    got = distributed.decide(None if mine is None else
                             {f.name: getattr(mine, f.name).cpu() for f in fields(_Clean)})
    return mine if mine is not None else _Clean(**{k: v.to(loaded.device)
                                                   for k, v in got.items()})


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


# -- pass 2: the suffix forward with a clean prefix shared by every sender ----------------------
_ATTN = "circuitdiff_shared_prefix"
#: the model-forward keyword that carries the :class:`_PrefixCall` down to the attention function
_CALL = "circuitdiff_prefix"
ATTENTION_MODES = ("auto", "shared", "tiled")


@dataclass(frozen=True)
class FastOptions:
    """How path-patching scores are computed — never what they are: every choice gives the same
    scores (up to float rounding), so none of these is part of a cache key."""

    #: "fast" (exact single-position engine, naive fallback where it cannot replay a layer) or
    #: "naive" (the oracle: full forwards, one sender at a time)
    impl: str = "fast"
    #: prompts per batch
    batch_size: int = 32
    #: rows (sender x sample x suffix token) of one batched forward; None: 16384 on CPU,
    #: 131072 on CUDA
    max_rows: int | None = None
    #: the fused CPU attention kernel may be used (False: plain matmuls and softmax)
    fused: bool = True
    #: how pass 2 attends to the clean prefix shared by the stacked senders: "shared" (prefix and
    #: suffix attended apart, merged by log-sum-exp: the prefix is never copied), "tiled" (one
    #: fused call per layer over the prefix copied for this layer's senders, queries of a kv
    #: group folded together: fastest where the kernel's per-call cost dominates, e.g. small
    #: heads on a CPU) or "auto" (tiled on CPU, shared elsewhere)
    attention: str = "auto"

    def __post_init__(self) -> None:
        if self.impl not in IMPLS:
            raise PathPatchingError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if self.batch_size < 1:
            raise PathPatchingError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_rows is not None and self.max_rows < 1:
            raise PathPatchingError(f"max_rows must be >= 1, got {self.max_rows}")
        if self.attention not in ATTENTION_MODES:
            raise PathPatchingError(f"attention must be one of {ATTENTION_MODES}, got "
                                    f"{self.attention!r}")

    def rows(self, device: torch.device) -> int:
        """``max_rows``, or the default for ``device``."""
        if self.max_rows is not None:
            return self.max_rows
        return 131072 if device.type == "cuda" else 16384


@dataclass
class Scores:
    """Path-patching scores of every head: means over samples and their standard errors, both
    float32 ``[n_layers, n_heads]`` (heads not scored: 0 in both). The most negative heads
    matter most; the standard error is the spread significance tests compare a score with."""

    mean: torch.Tensor
    se: torch.Tensor


class _PrefixState:
    """The clean run of one group of samples (``Bg`` rows, all with suffix start ``s``), as
    pass 2 needs it: per layer ``>= lo`` the clean keys and values of positions ``[0, s)``
    (``[Bg, kv, s, D]``, after any k-norm and RoPE: what the model's own cache holds) and the
    clean residual entering that layer at positions ``>= s`` (``[Bg, T - s, hidden]``), from one
    clean forward. Nothing is stored tiled over senders: the stacked senders of a pass-2
    forward share it (:func:`_shared_prefix_attention`).
    """

    def __init__(self, model: nn.Module, arch: Architecture, inputs: dict, s: int, lo: int,
                 feed: bool = True):
        self.s, self.lo = s, lo
        T = inputs["input_ids"].shape[1]
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        handles = []

        def grab(i):
            def hook(_m, args, kwargs):
                h = args[0] if args else kwargs["hidden_states"]
                self.hidden[i] = h[:, s:].detach().clone()
            return hook
        try:
            for i in range(max(lo, 1) if feed else arch.n_layers, arch.n_layers):
                handles.append(arch.layers[i].register_forward_pre_hook(grab(i),
                                                                        with_kwargs=True))
            out = model(**inputs, use_cache=s > 0, logits_to_keep=1)
        finally:
            for h in handles:
                h.remove()
        if s > 0:
            for i, layer in enumerate(out.past_key_values.layers):
                if i >= lo:
                    self.keys[i] = layer.keys[:, :, :s].contiguous()
                    self.values[i] = layer.values[:, :, :s].contiguous()
        mask = inputs["attention_mask"].bool()
        neg = torch.tensor(float("-inf"), device=mask.device)
        zero = torch.tensor(0.0, device=mask.device)
        self.pre_bias = torch.where(mask[:, None, None, :s], zero, neg)  # [Bg, 1, 1, s]
        t = torch.arange(T - s, device=mask.device)
        causal = t[None, :] <= t[:, None]                                # [S, S]
        # a query always sees itself (no all-masked row, hence no NaN, even at a pad query)
        allowed = (causal[None] & mask[:, None, s:]) | torch.eye(
            T - s, dtype=torch.bool, device=mask.device)[None]           # [Bg, S, S]
        self.suf_plain = bool(mask[:, s:].all())  # no padding in the suffix: plain causal
        self.suf_bias = torch.where(allowed, zero, neg)[:, None]         # [Bg, 1, S, S]
        self._fold: dict[tuple[int, int], torch.Tensor] = {}

    def fold_mask(self, g: int, n: int) -> torch.Tensor:
        """Bool ``[n*Bg or 1, 1, g*S, s + S]`` mask of the tiled attention (queries of a kv
        group folded: row ``j*S + t`` is query head ``j`` at suffix token ``t``)."""
        if (g, n) not in self._fold:
            self._fold.clear()
            allowed = self.suf_bias == 0                                     # [Bg, 1, S, S]
            if self.s > 0:
                pre = (self.pre_bias == 0).expand(-1, -1, allowed.shape[2], -1)
                allowed = torch.cat([pre, allowed], -1)
            if bool(allowed.all(0).eq(allowed.any(0)).all()):  # same for every sample
                allowed = allowed[:1]
            allowed = allowed.repeat(1, 1, g, 1)
            self._fold[(g, n)] = allowed if len(allowed) == 1 else allowed.repeat(n, 1, 1, 1)
        return self._fold[(g, n)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.keys, self.values, self.hidden)
                   for t in d.values())


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
            causal: bool, scale: float, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention ``[..., Lq, D]`` of ``q`` over ``k``/``v`` (same leading dims; ``bias``
    additive, broadcastable to the scores) and its log-sum-exp ``[..., Lq]``, in float32. The
    CPU uses PyTorch's fused flash kernel (it returns the log-sum-exp); elsewhere, or with
    ``fused=False``, plain matmuls and softmax."""
    q, k, v = q.float(), k.float(), v.float()
    if fused and q.device.type == "cpu":
        try:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
            return out, lse
        except (RuntimeError, AttributeError):  # an older/newer PyTorch without this kernel
            pass
    s = torch.matmul(q * scale, k.transpose(-1, -2))
    if causal:
        Lq, Lk = s.shape[-2:]
        s = s.masked_fill(torch.ones(Lq, Lk, dtype=torch.bool, device=s.device).triu(1),
                          float("-inf"))
    if bias is not None:
        s = s + bias
    lse = torch.logsumexp(s, -1)
    return torch.matmul(torch.exp(s - lse[..., None]), v), lse


@dataclass(frozen=True)
class _PrefixCall:
    """What one pass-2 forward's attention reads: the prefix state, how many senders are stacked
    and the options (passed down the model's forward as the ``circuitdiff_prefix`` keyword)."""

    state: _PrefixState
    n: int
    options: FastOptions


def _tiled_attention(st: "_PrefixState", l: int, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, scale: float, N: int, Bg: int, kv: int, g: int):
    """One fused attention call per layer: keys ``[N*Bg, kv, s + S, D]`` (this layer's clean
    prefix repeated over the ``N`` senders, then each one's suffix) and the ``g`` query heads of
    a kv head folded into one query block ``[N*Bg, kv, g*S, D]`` (grouped-query aware: no
    ``repeat_kv``), with a mask built once per forward."""
    NB, H, S, D = query.shape
    kp = st.keys.get(l)
    if kp is not None:
        key = torch.cat([kp.repeat(N, 1, 1, 1), key], 2)
        value = torch.cat([st.values[l].repeat(N, 1, 1, 1), value], 2)
    mask = st.fold_mask(g, N)
    q = query.reshape(NB, kv, g * S, D)
    out = F.scaled_dot_product_attention(q, key.to(q.dtype), value.to(q.dtype), attn_mask=mask,
                                         scale=scale)
    return out.view(NB, kv, g, S, D).permute(0, 3, 1, 2, 4).reshape(NB, S, H, D), None


def _shared_prefix_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask, scaling: float | None = None,
                             dropout: float = 0.0, **kwargs):
    """Attention of ``N`` stacked senders' suffixes (``query`` ``[N*Bg, H, S, D]``, sender-major)
    over the clean prefix shared by all of them plus each one's own suffix, grouped-query aware:
    the prefix keys/values ``[Bg, kv, s, D]`` are neither tiled over senders nor repeated over
    query heads (every query of a kv head's group, of every sender, is one row against them).
    The two parts are attended separately and merged by their log-sum-exps (exact softmax over
    the union). Registered as a transformers attention function; returns ``[N*Bg, S, H, D]``."""
    call = kwargs.get(_CALL)
    if call is None:  # a model whose forward does not pass keywords down to its attention
        raise _Unsupported("the model does not pass the shared prefix down to its attention")
    st, opts = call.state, call.options
    if kwargs.get("sliding_window") or kwargs.get("softcap") or kwargs.get("s_aux") is not None:
        raise _Unsupported("attention with a sliding window, soft-capping or sinks")
    l = module.layer_idx
    NB, H, S, D = query.shape
    N = call.n
    Bg = NB // N
    kv = key.shape[1]
    g = H // kv
    scale = D ** -0.5 if scaling is None else scaling
    if opts.attention == "tiled" or (opts.attention == "auto" and query.device.type == "cpu"):
        return _tiled_attention(st, module.layer_idx, query, key, value, scale, N, Bg, kv, g)
    # own suffix: causal (plus the suffix's padding, if any); kv heads repeated for the query
    # heads of their group (suffix-sized, not prefix-sized)
    ks = key[:, :, None].expand(NB, kv, g, S, D).reshape(NB, H, S, D)
    vs = value[:, :, None].expand(NB, kv, g, S, D).reshape(NB, H, S, D)
    bias = None if st.suf_plain else st.suf_bias.repeat(N, 1, 1, 1)
    out, lse = _attend(query, ks, vs, bias, st.suf_plain, scale, opts.fused)
    kp = st.keys.get(l)
    if kp is not None:  # the shared clean prefix: rows (sender, group head, token) per kv head
        s = kp.shape[2]
        qp = query.view(N, Bg, kv, g, S, D).permute(1, 2, 0, 3, 4, 5).reshape(Bg, kv, -1, D)
        o_p, l_p = _attend(qp, kp, st.values[l], st.pre_bias, False, scale, opts.fused)
        o_p = o_p.view(Bg, kv, N, g, S, D).permute(2, 0, 1, 3, 4, 5).reshape(NB, H, S, D)
        l_p = l_p.view(Bg, kv, N, g, S).permute(2, 0, 1, 3, 4).reshape(NB, H, S)
        o_p = torch.where(torch.isfinite(l_p)[..., None], o_p, 0.0)  # an all-padding prefix
        both = torch.logaddexp(lse, l_p)
        out = out * torch.exp(lse - both)[..., None] + o_p * torch.exp(l_p - both)[..., None]
    return out.to(value.dtype).transpose(1, 2), None


@contextlib.contextmanager
def _shared_prefix(model: nn.Module):
    """Within the block the model attends with :func:`_shared_prefix_attention` (over the
    prefix its forward is given as the ``circuitdiff_prefix`` keyword); the config's attention
    implementation is restored afterwards."""
    from transformers import AttentionInterface

    if _ATTN not in AttentionInterface._global_mapping:
        AttentionInterface.register(_ATTN, _shared_prefix_attention)
    cfg = unwrap(model).config
    old = cfg._attn_implementation
    cfg._attn_implementation = _ATTN
    try:
        yield
    finally:
        cfg._attn_implementation = old


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


def _pass2(model: nn.Module, rep: "_Replay", inputs: dict, pc: _PrefixState, start: int,
           p: torch.Tensor, req: _Request, recv: dict[int, torch.Tensor],
           answers: torch.Tensor, last: torch.Tensor, options: FastOptions) -> torch.Tensor:
    """Clean suffix forward (positions ``>= pc.s``) of layers ``>= start`` with the receiver
    inputs of ``recv`` (layers ``>= start``, all reached by every sender; values
    ``[N, B, P, units, D]``) replaced
    at the role's tokens ``p`` ``[B, P]``; ``[N, B]`` probs. The layers below ``start`` are clean
    for these senders: their residual is fed in, and every layer attends to the shared prefix."""
    arch = rep.arch
    s = pc.s
    N, B, P = next(iter(recv.values())).shape[:3]
    dev = p.device
    T = inputs["input_ids"].shape[1]
    rep_in = {"input_ids": inputs["input_ids"][:, s:].repeat(N, 1),
              "position_ids": inputs["position_ids"][:, s:].repeat(N, 1)}
    pos = (p - s).repeat(N, 1)  # [N*B, P]
    edits = []
    for lr, vals in recv.items():
        where = req.unit_mask(arch, lr).to(dev)[None, None, :]  # [1, 1, U]
        edits.append(Write(lr, vals.reshape(N * B, P, *vals.shape[3:]), pos, where, req.kind))
    keep = {"logits_to_keep": 1} if bool((last == T - 1).all()) else {}
    skip = _skip_layers(rep, start, pc.hidden[start].repeat(N, 1, 1)) if start > 0 \
        else contextlib.nullcontext()
    with intervene(model, edits, arch), skip, _shared_prefix(model):
        logits = model(**rep_in, use_cache=False, **keep,
                       **{_CALL: _PrefixCall(pc, N, options)}).logits
    if keep:
        logits = logits[:, -1]
    else:
        idx = (last - s).repeat(N)
        logits = logits[torch.arange(N * B, device=dev), idx]
    return answer_prob(logits.view(N, B, -1), answers)


def _first_receiver_layer(ls: int, recv_layers: list[int]) -> int:
    """The first receiver layer a sender in layer ``ls`` reaches: receivers at or below ``ls``
    keep their clean input, so pass 2 is clean below it and may start there."""
    return min(lr for lr in recv_layers if lr > ls)


# -- reuse of clean/counterfactual runs across calls --------------------------------------------
class CaptureCache:
    """Clean and counterfactual captures (per prompt batch and role) and clean prefix states
    (per prompt batch and suffix start) reused by later :func:`path_patching_scores` calls on
    the same model and prompts that are given this cache — the steps of a discovery chain share
    one. Scores are the same with or without it.

    Entries are keyed by the prompts' token ids, the role's token indices, the model object,
    its parameters' in-place version counters and the adapters' enabled state, so a changed
    model or other prompts never hit a stale entry. ``max_bytes`` bounds what is kept (oldest
    first out; default 2 GiB, or 20 % of the GPU's memory on CUDA)."""

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = max_bytes
        self._store: "OrderedDict[tuple, tuple[object, int]]" = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: tuple, make, nbytes, device: torch.device):
        if key in self._store:
            self._store.move_to_end(key)
            self.hits += 1
            return self._store[key][0]
        self.misses += 1
        value = make()
        size = nbytes(value)
        limit = self.max_bytes
        if limit is None:
            limit = int(torch.cuda.get_device_properties(device).total_memory * 0.2) \
                if device.type == "cuda" else 2 << 30
        while self._store and sum(b for _, b in self._store.values()) + size > limit:
            self._store.popitem(last=False)
        if size <= limit:
            self._store[key] = (value, size)
        return value

    def clear(self) -> None:
        self._store.clear()


def _model_state(model: nn.Module) -> tuple:
    """What a cached capture depends on besides the prompts: the model object, its parameters'
    in-place version counters and which adapters are enabled."""
    version = sum(p._version for p in model.parameters())
    disabled = tuple(bool(getattr(m, "disable_adapters", False)) for m in model.modules()
                     if hasattr(m, "disable_adapters") and hasattr(m, "lora_A"))
    active = getattr(model, "active_adapters", None)
    try:
        active = tuple(active) if active is not None and not callable(active) else None
    except TypeError:
        active = None
    return id(model), version, disabled, active


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha1()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _clean_nbytes(c: _Clean) -> int:
    return sum(t.numel() * t.element_size() for t in (c.z, c.z_cf, c.resid, c.attn, c.logits))


def _fast_batch(loaded: LoadedModel, rep: _Replay, bc: Batch, bx: Batch, req: _Request,
                options: FastOptions, bar=None, cache: CaptureCache | None = None
                ) -> torch.Tensor:
    """Per-sample score of every sender on this batch: ``[len(senders), B]`` (0 for senders at
    or after the last receiver layer)."""
    model, arch, dev = loaded.model, loaded.arch, loaded.device
    max_rows = options.rows(dev)
    state = _model_state(model) if cache is not None else None
    batch_key = _digest(bc.input_ids, bc.attention_mask, bx.input_ids, bx.attention_mask) \
        if cache is not None else None
    p_role = role_positions(bc, req.position)

    def capture() -> tuple[_Clean, float]:
        c = _shared_capture(loaded, bc, bx, req.position)
        return c, max(_replay_error(rep, c), _logits_error(rep, c, bc.positions["last"]))
    if cache is None:
        c, err = capture()
    else:
        c, err = cache.get(("clean", state, batch_key, _digest(p_role)), capture,
                           lambda v: _clean_nbytes(v[0]), dev)
    if err > _tolerance(c.resid.dtype):
        raise _Unsupported(f"replaying the clean run at one position misses by {err:.2g} "
                           f"(relative); this decoder layer is not of the supported shape")
    answers = bc.answer_ids.to(dev)
    B = len(bc)
    recv_layers = req.recv_layers()
    last_recv = max(recv_layers) if recv_layers else arch.n_layers
    can_skip = rep.layer_owner is not None
    out = torch.zeros(len(req.senders), len(bc), dtype=torch.float32)
    live = [i for i in range(len(req.senders)) if req.senders[i][0] < last_recv]
    inputs = bc.model_inputs(dev)
    last = bc.positions["last"].to(dev)
    # senders sharing their first reachable receiver layer share a batch (sorted by layer for
    # pass 1): pass 2 patches only receivers at or above it, and starts there when it can
    batches: dict[int, list[int]] = {}
    for i in sorted(live, key=lambda i: req.senders[i]):
        first = _first_receiver_layer(req.senders[i][0], recv_layers) if recv_layers else 0
        batches.setdefault(first, []).append(i)
    groups = []  # samples sharing a role start share a prefix state and a suffix forward
    chunk = max(1, max_rows // (B * c.p.shape[1]))  # pass-1 rows: sender x sample x role token
    if recv_layers:
        T = inputs["input_ids"].shape[1]
        lo = min(batches) if batches and can_skip else 0
        starts = c.p.min(1).values  # the suffix of a sample starts at its role's first token
        budget = _cache_budget(dev)
        for s in torch.unique(starts).tolist():
            rows = (starts == s).nonzero()[:, 0]
            sub = {k: v[rows] for k, v in inputs.items()}

            def make(sub=sub, s=s) -> _PrefixState:
                return _PrefixState(model, arch, sub, s, lo, feed=can_skip)
            if cache is None:
                pc = make()
            else:
                pc = cache.get(("prefix", state, batch_key, _digest(rows), s, lo), make,
                               _PrefixState.nbytes, dev)
            groups.append((rows, sub, pc))
            # pass-2 rows are (sender, sample, suffix token); its attention scores are
            # (sender, sample, head, suffix token, key): bound both
            S = T - s
            chunk = min(chunk, max(1, max_rows // (len(rows) * S)),
                        max(1, budget // (len(rows) * arch.n_heads * S * T * 4 * 3)))
    P = c.p.shape[1]
    for first, members in batches.items():
        start = first if can_skip else 0
        for i in range(0, len(members), chunk):
            idx = members[i:i + chunk]
            senders = [req.senders[j] for j in idx]
            recv, probs = _pass1(rep, c, req, senders, answers)
            if probs is None:
                probs = torch.empty(len(idx), B, device=dev)
                for rows, sub, pc in groups:
                    probs[:, rows] = _pass2(
                        model, rep, sub, pc, start, c.p[rows], req,
                        {lr: v.view(len(idx), B, P, *v.shape[2:])[:, rows]
                         for lr, v in recv.items() if lr >= first},
                        answers[rows], last[rows], options)
            score = (probs - c.p_clean[None]) / c.p_clean[None]
            out[torch.tensor(idx)] = score.float().cpu()
            if bar is not None:
                bar.update(len(idx) * B)
    if bar is not None:
        bar.update((len(req.senders) - len(live)) * B)
    return out


def _cache_budget(device: torch.device) -> int:
    """Bytes the attention scores of one pass-2 forward may take."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.3)
    return 1 << 30


class _Unsupported(Exception):
    pass



def _execution_devices(model: nn.Module) -> set[str]:
    """The devices a model dispatched by accelerate (``device_map``) computes on: its GPUs, or
    the CPU when no layer sits on a GPU. Layers offloaded to ``cpu``/``disk`` compute on the
    main device (accelerate's hooks bring their weights in), so one GPU plus offload — or CPU
    plus disk — is one device, which the fast path supports; a model split over several GPUs
    is not. An undispatched model: empty."""
    dmap = getattr(unwrap(model), "hf_device_map", None) or {}
    gpus = {str(d if not isinstance(d, int) else f"cuda:{d}") for d in dmap.values()
            if str(d) not in ("cpu", "disk", "meta")}
    return gpus or ({"cpu"} if dmap else set())


def _rank_order(req: _Request) -> list[int]:
    """Sender indices in the order they are dealt to ranks: those that can reach a receiver
    first (by layer), then those at or after the last receiver layer (free on the fast path),
    so dealing round-robin gives every rank a like mix of costly and free senders."""
    recv_layers = req.recv_layers()
    last_recv = max(recv_layers) if recv_layers else None
    return sorted(range(len(req.senders)),
                  key=lambda i: (last_recv is not None and req.senders[i][0] >= last_recv,
                                 req.senders[i], i))


@torch.no_grad()
def path_patching_scores(loaded: LoadedModel, clean: Sequence[Prompt],
                         counterfactual: Sequence[Prompt], request: PatchRequest = PatchRequest(),
                         options: FastOptions = FastOptions(), *,
                         cache: CaptureCache | None = None, progress: bool = False,
                         desc: str = "path patching") -> Scores:
    """Path-patching score of every sender head of ``request`` on the clean prompts and their
    counterfactuals: means over samples and standard errors (:class:`Scores`); heads not among
    the senders are 0. ``options`` says how it is computed (``impl="naive"`` is the oracle; the
    fast path falls back to it with a warning where it cannot replay a layer); ``cache`` reuses
    the fast path's clean and counterfactual runs of the same prompts across calls (the scores
    are the same either way).

    Under ``torchrun`` every rank must call this with the same arguments. With at least as many
    prompt batches as ranks, each rank scores every sender on its contiguous share of the
    batches (captures, prefix states and passes alone: nothing is computed twice) and the
    per-sample scores are gathered in prompt order — each batch's numbers are one process's,
    bit for bit. With fewer batches the senders are dealt to the ranks
    (:func:`~circuitdiff.core.distributed.dealt`; each rank keeps the sort-by-layer batching
    inside its share), each rank scores its own, and the per-sample scores are gathered in a
    fixed order, so every rank returns the whole :class:`Scores`; the clean and
    counterfactual captures are then computed on rank 0 and handed to the others (role tokens only:
    small next to the forwards; on 2 ranks sharing 2 loaded cores, bench/workers.py's Qwen
    shape with 2 prompts, two A/B pairs took the call from 11.9 and 12.7 s to 10.1 and 9.7 s);
    pass 2's clean prefix states (whole prompts' caches) are computed on every rank, not
    shipped. Per-sender math is unchanged; only which senders share a stacked forward differs,
    so the scores equal one process's up to float rounding of the stacked matmuls (measured 0
    on CPU float32, see ``tests/methods/test_distributed_methods.py``).

    A big model dispatched by accelerate (``device_map`` with layers offloaded to CPU or disk)
    runs the fast path through accelerate's own hooks (each replayed module fetches its weights
    and computes on its execution device); a model split over several GPUs falls back to the
    naive path with a warning."""
    from ...core import distributed

    arch = loaded.arch
    req = request.resolve(arch)
    _check_sets(loaded, clean, counterfactual)
    bs = options.batch_size
    starts = list(range(0, len(clean), bs))  # the prompt batches
    by_batch = 1 < distributed.ranks().world <= len(starts)
    if by_batch:  # each rank: every sender on its contiguous share of the batches
        starts = [starts[i] for i in distributed.share(len(starts))]
        local, order = req, list(range(len(req.senders)))
    else:  # fewer batches than ranks: the senders are dealt, every rank runs every batch
        order = _rank_order(req)
        mine = [order[j] for j in distributed.dealt(len(order))]
        local = _Request(req.position, [req.senders[i] for i in mine], req.receivers, req.kind)
    rep = None
    if options.impl == "fast":
        try:
            devices = _execution_devices(loaded.model)
            if len(devices) > 1:
                raise PathPatchingError(
                    f"its layers run on {len(devices)} devices ({', '.join(sorted(devices))}) "
                    f"and the one-position replay keeps its state on one")
            rep = _Replay(loaded.model, arch)
        except PathPatchingError as e:
            warnings.warn(f"fast path patching unsupported for {arch.model_type} ({e}); using "
                          f"the naive path", stacklevel=2)
    from tqdm.auto import tqdm

    per_sample: list[torch.Tensor] = []  # [local senders, B] per batch
    mine_alone = distributed.alone() if by_batch else contextlib.nullcontext()
    with mine_alone, tqdm(total=len(local.senders) * sum(len(clean[i:i + bs]) for i in starts),
                          desc=desc, unit="run", disable=not progress) as bar:
        for i in starts:
            bc, bx = _encode_checked(loaded, clean[i:i + bs], counterfactual[i:i + bs],
                                     req.position)
            if rep is not None:
                try:
                    per_sample.append(_fast_batch(loaded, rep, bc, bx, local, options, bar,
                                                  cache))
                    continue
                except _Unsupported as e:
                    warnings.warn(f"fast path patching unsupported: {e}; using the naive path",
                                  stacklevel=2)
                    rep = None
            per_sample.append(_naive_batch(loaded, bc, bx, local, bar))
    if by_batch:  # columns: the batches in rank order, i.e. the prompts in order
        samples = distributed.gather_cat(torch.cat(per_sample, 1), dim=1).double()
    else:
        dealt = distributed.gather_dealt(torch.cat(per_sample, 1), len(order))  # rows: `order`
        samples = torch.empty_like(dealt)
        samples[torch.tensor(order, dtype=torch.long)] = dealt
        samples = samples.double()
    scores = torch.zeros(arch.n_layers, arch.n_heads, dtype=torch.float32)
    idx = torch.tensor(req.senders)
    scores[idx[:, 0], idx[:, 1]] = samples.mean(1).float()
    se = torch.zeros_like(scores)
    if samples.shape[1] > 1:
        se[idx[:, 0], idx[:, 1]] = (samples.std(1) / samples.shape[1] ** 0.5).float()
    return Scores(scores, se)
