"""Draft losses on mask blocks (DESIGN §2.5).

A block anchored at `p` has W slots; slot j sits at position p + j and predicts the token at p + j
(diffusion convention). Slot 0 sits on the bonus and is never scored. For slots j >= 1:

  CE   cross-entropy of the draft logits against token[p + j]
  KL   KL(target || draft) with the target's distribution at clean row p + j - 1 (the row that
       predicts token p + j in the AR convention)

weighted by w_j = exp(-(j - 1) / gamma) (gamma <= 0: uniform) and masked where p + j is past the
sequence end, outside the loss region (response tokens) or the anchor is padding.

Shapes: B batch, A anchors per sequence, W block size, V vocab, T sequence length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def position_weights(block_size: int, gamma: float) -> jnp.ndarray:
    """[W]: 0 for slot 0, exp(-(j-1)/gamma) for j >= 1 (1 when gamma <= 0)."""
    j = jnp.arange(block_size, dtype=jnp.float32)
    w = jnp.exp(-(j - 1) / gamma) if gamma > 0 else jnp.ones_like(j)
    return jnp.where(j >= 1, w, 0.0)


def slot_targets(tokens, lengths, loss_mask, anchors, anchor_valid, block_size: int):
    """Labels and validity of every slot.

    tokens int32[B, T], lengths int32[B], loss_mask bool[B, T], anchors int32[B, A],
    anchor_valid bool[B, A] -> labels int32[B, A, W] (token at p + j), valid bool[B, A, W]
    (j >= 1, p + j < length, p + j in the loss region, the anchor is real).
    """
    t = tokens.shape[1]
    j = jnp.arange(block_size, dtype=jnp.int32)
    pos = anchors[:, :, None] + j  # [B, A, W]
    idx = jnp.minimum(pos, t - 1).reshape(pos.shape[0], -1)
    labels = jnp.take_along_axis(tokens, idx, axis=1).reshape(pos.shape)
    in_region = jnp.take_along_axis(loss_mask, idx, axis=1).reshape(pos.shape)
    valid = (j >= 1) & (pos < lengths[:, None, None]) & in_region & anchor_valid[:, :, None]
    return labels, valid


def draft_loss(
    logits,
    labels,
    valid,
    weights,
    target_logits=None,
    *,
    ce_weight: float = 1.0,
    kl_weight: float = 0.0,
    target_topk=None,
):
    """Weighted CE and/or KL over valid slots.

    logits [B, A, W, V] (draft, possibly calibrated); labels int32[B, A, W]; valid bool[B, A, W];
    weights [W]; target_logits [B, A, W, V] (target at rows p + j - 1) when kl_weight > 0, or
    instead target_topk = (ids, logp, ok) [B, A, W, k]: the target's top-k at those rows, ids
    indexing the last axis of `logits`, ok marking the ids the draft can produce (`topk_kl`).
    Returns (loss, metrics) with per-slot accuracy / CE [W] (slot 0 reported as 0).
    """
    if kl_weight > 0 and target_logits is None and target_topk is None:
        raise ValueError("kl_weight > 0 needs the target's logits or its top-k")
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]  # [B, A, W]
    mask = valid.astype(jnp.float32)
    w = mask * weights
    denom = jnp.maximum(w.sum(), 1e-9)
    ce_mean = (ce * w).sum() / denom
    loss = ce_weight * ce_mean
    metrics = {"ce": ce_mean}
    if target_logits is not None:
        logq = jax.nn.log_softmax(target_logits.astype(jnp.float32), axis=-1)
        kl = jnp.sum(jnp.exp(logq) * (logq - logp), axis=-1)
        kl_mean = (kl * w).sum() / denom
        metrics["kl"] = kl_mean
        if kl_weight > 0:
            loss = loss + kl_weight * kl_mean
    elif target_topk is not None:
        kl = topk_kl(logp, *target_topk)
        kl_mean = (kl * w).sum() / denom
        metrics["kl"] = kl_mean
        loss = loss + kl_weight * kl_mean
    hit = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    count = mask.sum(axis=(0, 1))  # [W]
    metrics["acc_per_slot"] = (hit * mask).sum(axis=(0, 1)) / jnp.maximum(count, 1.0)
    metrics["ce_per_slot"] = (ce * mask).sum(axis=(0, 1)) / jnp.maximum(count, 1.0)
    metrics["acc"] = (hit * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    metrics["slots"] = mask.sum()
    metrics["loss"] = loss
    return loss, metrics


def topk_kl(logp, ids, target_logp, ok):
    """KL(p || q) per slot, p the target's top-k renormalised over the ids the draft can produce.

    logp [..., V]: the draft's log-probabilities; ids int32[..., k] into V; target_logp [..., k]
    (log-probabilities over the whole vocabulary, e.g. from `jax.lax.top_k`); ok bool[..., k].
    Ids with a log-probability of -inf are unusable too; a slot with no usable id gets 0.
    """
    ok = ok & jnp.isfinite(target_logp)
    t = jnp.where(ok, target_logp.astype(jnp.float32), -1e30)
    logp_t = t - jax.scipy.special.logsumexp(t, axis=-1, keepdims=True)
    p = jnp.where(ok, jnp.exp(logp_t), 0.0)
    logq = jnp.take_along_axis(logp, ids, axis=-1)
    return jnp.sum(p * (jnp.where(ok, logp_t, 0.0) - logq), axis=-1)
