"""The attention entry points every model layer calls: `attention(q, k, v, meta, impl=...)`, and
`cached_attention` for a decode step whose new clean rows are not yet in the cache.

`impl` is "xla" (the jnp reference, fused by XLA), "pallas" or "auto" (Pallas when the default
backend is TPU/GPU, XLA on CPU). "pallas" picks its kernel when the program is lowered, by the
platform it is lowered for (`lax.platform_dependent`): Mosaic on TPU, Triton on CUDA/ROCm, the
Mosaic kernel in interpret mode anywhere else (CPU tests). So a program exported from a CPU host
with `jax.export(..., platforms=["tpu"])` holds the real TPU kernel. "auto" is decided when the
program is traced, from `jax.default_backend()`: exporting from a CPU host, say "pallas".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flexdraft_jax.kernels.mask import RowMeta
from flexdraft_jax.kernels.reference import attention_reference, cached_attention_reference


def resolve_impl(impl: str) -> str:
    if impl == "auto":
        return "pallas" if jax.default_backend() in ("tpu", "gpu") else "xla"
    if impl not in ("xla", "pallas"):
        raise ValueError(f"attention impl must be xla, pallas or auto, got {impl!r}")
    return impl


def attention(q, k, v, meta: RowMeta, *, impl: str = "xla", scale: float | None = None):
    """Masked attention over [clean slots ; mask rows]. q [B,T,N,D], k/v [B,S,K,D] -> [B,T,N,D]."""
    if resolve_impl(impl) == "xla":
        return attention_reference(q, k, v, meta, scale=scale)
    from flexdraft_jax.kernels import pallas_attention  # noqa: PLC0415 (optional backend)

    def kernel(backend, interpret):
        return lambda *a: pallas_attention.attention(
            *a, scale=scale, backend=backend, interpret=interpret
        )

    gpu = kernel("gpu", False)  # one branch for both GPU platforms
    return jax.lax.platform_dependent(
        q, k, v, meta, tpu=kernel("tpu", False), cuda=gpu, rocm=gpu, default=kernel("tpu", True)
    )


def cached_attention(q, ck, cv, cached, nk, nv, new_slots, meta: RowMeta, *, impl: str = "xla"):
    """Attention over a read-only cache window ck, cv [B, Sw, K, D] (valid below `cached` int32[B])
    plus new keys nk, nv [B, Sn + Sm, K, D]: clean rows at `new_slots` int32[B, Sn], then mask rows
    (`mask.cached_masks`). XLA: one softmax over both parts, the cache never copied. Pallas: the new
    rows are placed at their slots of a copy of the window (a layer's window, not the cache) and
    the kernel runs the usual [clean slots ; mask rows] layout."""
    if resolve_impl(impl) == "xla":
        return cached_attention_reference(q, ck, cv, cached, nk, nv, new_slots, meta)
    n_new = new_slots.shape[1]
    bidx = jnp.arange(ck.shape[0])[:, None]
    keys = ck.at[bidx, new_slots].set(nk[:, :n_new].astype(ck.dtype), mode="drop")
    values = cv.at[bidx, new_slots].set(nv[:, :n_new].astype(cv.dtype), mode="drop")
    keys = jnp.concatenate([keys, nk[:, n_new:].astype(ck.dtype)], axis=1)
    values = jnp.concatenate([values, nv[:, n_new:].astype(cv.dtype)], axis=1)
    return attention(q, keys, values, meta, impl=impl)
