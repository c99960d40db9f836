"""The naive path-patching oracle: pass 1 and pass 2 as full forwards, one sender at a time.

Kept as the test oracle of the fast path (:mod:`.exact`) and as its fallback on decoder layers
the fast path cannot replay. The role may cover several tokens (``labels``): the sender takes its
counterfactual value at every token of the role, every head is frozen at every position from the
role's first token on, and the receivers' inputs are read and patched at every token of the
role."""

from __future__ import annotations

import torch

from ...core.interventions import Read, Write, run_with_edits
from ...core.metrics import answer_prob, logits_at_last
from ...core.model import LoadedModel
from ...core.task import Batch
from .common import _Request, role_positions


def _naive_batch(loaded: LoadedModel, bc: Batch, bx: Batch, req: _Request, bar=None
                 ) -> torch.Tensor:
    """The faithful oracle: pass 1 and pass 2 as full forwards, one sender at a time.
    Returns per-sample scores ``[senders, B]``."""
    model, arch, dev = loaded.model, loaded.arch, loaded.device
    L, H = arch.n_layers, arch.n_heads
    inputs_c, inputs_x = bc.model_inputs(dev), bx.model_inputs(dev)
    p = role_positions(bc, req.position).to(dev)  # [B, P]
    last = bc.positions["last"].to(dev)
    answers = bc.answer_ids.to(dev)
    rc, rx = Read(list(range(L)), None, "head"), Read(list(range(L)), None, "head")
    clean_logits = logits_at_last(model, inputs_c, last, [rc], arch)
    run_with_edits(model, inputs_x, [rx], arch)
    p_clean = answer_prob(clean_logits, answers)
    T = inputs_c["input_ids"].shape[1]
    t = torch.arange(T, device=dev)[None, :]
    from_p = (t >= p.min(1).values[:, None])[:, :, None].expand(-1, -1, H)
    at_p = torch.zeros(len(p), T, dtype=torch.bool, device=dev).scatter_(1, p, True)
    recv_layers = req.recv_layers()
    out = torch.zeros(len(req.senders), len(bc), dtype=torch.float32)
    for i, (ls, hs) in enumerate(req.senders):
        edits = []
        for l in range(L):
            vals = rc.out[l]
            if l == ls:  # the sender takes its counterfactual value at the role's tokens only
                vals = rc.out[l].clone()
                vals[:, :, hs] = torch.where(at_p[..., None], rx.out[l][:, :, hs],
                                             rc.out[l][:, :, hs])
            edits.append(Write(l, vals, None, from_p, "head"))
        if recv_layers:
            read = Read(recv_layers, p, req.kind)
            run_with_edits(model, inputs_c, edits + [read], arch)
            writes = [Write(lr, read.out[lr], p, req.unit_mask(arch, lr).to(dev)[None, None],
                            req.kind) for lr in recv_layers]
            logits = logits_at_last(model, inputs_c, last, writes, arch)
        else:
            logits = logits_at_last(model, inputs_c, last, edits, arch)
        probs = answer_prob(logits, answers)
        out[i] = ((probs - p_clean) / p_clean).float().cpu()
        if bar is not None:
            bar.update(len(bc))
    return out

