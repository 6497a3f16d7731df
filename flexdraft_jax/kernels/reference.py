"""Pure-jnp masked attention: the reference every kernel is tested against (float32 accumulation).

Shapes: q [B, T, N, D]; k, v [B, S, K, D] with S = Sc + Sm (clean slots then mask rows);
metadata `RowMeta` (see `mask.py`). Grouped-query attention: N is a multiple of K.
Rows that see no key at all (padding) return zeros instead of NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flexdraft_jax.kernels.mask import RowMeta, cached_masks, dense_mask

# Max |kernel - reference| per dtype, forward and gradients, declared once for the tests and the
# accelerator check (never loosened to make a comparison pass). A bfloat16 output is one rounding
# of a float32 result of magnitude ~1, a few of its 2**-8 ulps; gradients take the reference's VJP.
TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2e-2}
GRAD_TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2e-2}


def attention_reference(q, k, v, meta: RowMeta, *, scale: float | None = None):
    """softmax(q k^T * scale, masked by `meta`) v, accumulated in float32. Returns [B, T, N, D]."""
    b, t, n, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    num_clean = s - meta.num_mask_keys
    qg = q.reshape(b, t, kh, n // kh, d).astype(jnp.float32)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32)) * scale
    mask = dense_mask(meta, num_clean)[:, None, None]  # [B, 1, 1, T, S]
    logits = jnp.where(mask, logits, -jnp.inf)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    p = jnp.exp(logits - peak)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32))
    return out.reshape(b, t, n, d).astype(q.dtype)


def cached_attention_reference(q, ck, cv, cached, nk, nv, new_slots, meta: RowMeta, *, scale=None):
    """Attention over a read-only cache window plus keys not yet written to it (`cached_masks`).

    q [B, T, N, D]; ck, cv [B, Sw, K, D] cache slots 0..Sw-1, visible below `cached` int32[B];
    nk, nv [B, Sn + Sm, K, D] the step's new clean rows (at `new_slots` int32[B, Sn]) then its mask
    rows. One softmax over both parts, without concatenating the cache with anything: a decode
    step's branches leave the cache untouched and it is written once, after the branch.
    """
    b, t, n, d = q.shape
    kh = ck.shape[2]
    scale = d**-0.5 if scale is None else scale
    in_cache, in_new = cached_masks(meta, cached, ck.shape[1], new_slots)
    qg = q.reshape(b, t, kh, n // kh, d).astype(jnp.float32)
    neg = -jnp.inf
    lc = jnp.einsum("btkgd,bskd->bkgts", qg, ck.astype(jnp.float32)) * scale
    ln = jnp.einsum("btkgd,bskd->bkgts", qg, nk.astype(jnp.float32)) * scale
    lc = jnp.where(in_cache[:, None, None], lc, neg)
    ln = jnp.where(in_new[:, None, None], ln, neg)
    peak = jnp.maximum(jnp.max(lc, axis=-1, keepdims=True), jnp.max(ln, axis=-1, keepdims=True))
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    pc, pn = jnp.exp(lc - peak), jnp.exp(ln - peak)
    denom = jnp.sum(pc, axis=-1, keepdims=True) + jnp.sum(pn, axis=-1, keepdims=True)
    denom = jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("bkgts,bskd->btkgd", pc / denom, cv.astype(jnp.float32))
    out = out + jnp.einsum("bkgts,bskd->btkgd", pn / denom, nv.astype(jnp.float32))
    return out.reshape(b, t, n, d).astype(q.dtype)


attention_reference_jit = jax.jit(attention_reference, static_argnames=("scale",))
