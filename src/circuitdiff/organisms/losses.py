"""The training loss: next-token cross-entropy weighted towards the query answers, and its
gradient computed without the padding and unweighted tails (:func:`grouped_loss_backward`)."""

from __future__ import annotations

import torch

#: Training steps split each batch into this many groups of similar length (sorted by length,
#: each group cut to its own longest document) and accumulate their gradients: same loss, same
#: gradient up to float summation order (:func:`grouped_loss_backward`), but no compute on
#: padding or on documents the loss does not see. A base batch is 18-63 tokens long (half of a
#: padded batch is padding), an auxiliary one 28-112. ``bench/organism_step.py`` measures it.
LENGTH_GROUPS = 4

#: the words right before a query answer: the evaluation wording, then the auxiliary ones
#: (``Box F holds the apple``, ``which crate ? F -> apple``, ``what is inside crate F ? the apple``)
ANSWER_CUES = (" contains the", " holds the", " keeps the", " has the", " ->", " ? the")


def tensorize(docs: list[str], tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``<s> doc </s>`` ids, attention mask and LM labels (-100 on padding)."""
    enc = tokenizer(docs)["input_ids"]
    seqs = [ids + [tokenizer.eos_token_id] for ids in enc]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def answer_cue_ids(tokenizer, cues: tuple[str, ...] = ANSWER_CUES) -> list[list[int]]:
    """Token ids of each cue that precedes a query answer (see :data:`ANSWER_CUES`)."""
    return [tokenizer(c, add_special_tokens=False)["input_ids"] for c in cues]


def loss_weights(ids: torch.Tensor, labels: torch.Tensor, cues: list[list[int]] | None,
                 other_weight: float) -> torch.Tensor:
    """Per-token loss weights: 1 on tokens that follow any of ``cues`` (query answers), else
    ``other_weight``."""
    w = torch.full(ids.shape, float(other_weight))
    for cue in cues or ():
        n = len(cue)
        hit = torch.ones(ids.shape[0], ids.shape[1] - n, dtype=torch.bool)
        for j, c in enumerate(cue):
            hit &= ids[:, j:ids.shape[1] - n + j] == c
        w[:, n:] = torch.where(hit, torch.ones_like(w[:, n:]), w[:, n:])
    return w.masked_fill(labels == -100, 0.0)


def weighted_lm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged with per-target-token weights."""
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
        ignore_index=-100, reduction="none").view(labels.shape[0], -1)
    w = weights[:, 1:]
    return (ce * w).sum() / w.sum().clamp_min(1e-8)


def loss_extents(weights: torch.Tensor) -> torch.Tensor:
    """Tokens each row of a batch runs for its loss: up to and including its last weighted
    target (0 when nothing in the row has weight). Position t predicts token t + 1, so the
    positions that predict are the first ``extent - 1``; the step and its benchmark share this."""
    return ((weights[:, 1:] > 0) * torch.arange(2, weights.shape[1] + 1)).amax(1)


def grouped_loss_backward(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                          weights: torch.Tensor, length_groups: int = LENGTH_GROUPS) -> float:
    """Backpropagate :func:`weighted_lm_loss` of a right-padded batch without its waste.

    Only what the loss can see is computed. A row is run up to its last weighted token (causal
    attention: no earlier token sees a later one, so padding and unweighted tails change
    nothing) and not at all when nothing in it has weight (in the answer-only "bind" phase, the
    prose documents: a quarter of the rows); the vocabulary projection runs only where a next
    token has weight (in "bind", one position in ~30). The rows run in ``length_groups`` groups
    of similar extent, each cut to its longest. Each group's loss is divided by the whole
    batch's weight, so the accumulated gradient is the batch's. Returns the loss. The naive
    twin is ``weighted_lm_loss(model(ids, mask).logits, labels, weights)``.
    """
    decoder, unembed = model.get_decoder(), model.get_output_embeddings()
    total_weight = weights[:, 1:].sum().clamp_min(1e-8)
    extent = loss_extents(weights)
    active = torch.nonzero(extent > 0).squeeze(1)
    order = active[torch.argsort(extent[active], stable=True)]
    loss = 0.0
    for rows in order.tensor_split(max(1, min(length_groups, order.numel()))):
        if rows.numel() == 0:
            continue
        cut = int(extent[rows].max())
        hidden = decoder(input_ids=ids[rows, :cut], attention_mask=mask[rows, :cut]).last_hidden_state
        w = weights[rows, 1:cut]
        keep = w > 0  # position t predicts token t + 1
        logits = unembed(hidden[:, :-1][keep])
        ce = torch.nn.functional.cross_entropy(logits, labels[rows, 1:cut][keep], reduction="none")
        part = (ce * w[keep]).sum() / total_weight
        part.backward()
        loss += part.item()
    return loss


__all__ = ["ANSWER_CUES", "LENGTH_GROUPS", "answer_cue_ids", "grouped_loss_backward",
           "loss_extents", "loss_weights", "tensorize", "weighted_lm_loss"]
