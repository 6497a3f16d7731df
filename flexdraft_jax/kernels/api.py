"""The attention entry point every model layer calls: `attention(q, k, v, meta, impl=...)`.

`impl` is "xla" (the jnp reference, fused by XLA), "pallas" (the Pallas kernel for the current
backend; interpret mode on CPU) or "auto" (Pallas on TPU/GPU, XLA on CPU).
"""

from __future__ import annotations

import jax

from flexdraft_jax.kernels.mask import RowMeta
from flexdraft_jax.kernels.reference import attention_reference


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

    return pallas_attention.attention(q, k, v, meta, scale=scale)
