"""Pure-jnp masked attention: the reference every kernel is tested against (float32 accumulation).

Shapes: q [B, T, N, D]; k, v [B, S, K, D] with S = Sc + Sm (clean slots then mask rows);
metadata `RowMeta` (see `mask.py`). Grouped-query attention: N is a multiple of K.
Rows that see no key at all (padding) return zeros instead of NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flexdraft_jax.kernels.mask import RowMeta, dense_mask


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


attention_reference_jit = jax.jit(attention_reference, static_argnames=("scale",))
