"""Public entry of the masked-attention Pallas kernels: validation, folding, backend choice, VJP.

    attention(q, k, v, meta, *, scale=None, block_sizes=None, interpret=None, backend=None)

q [B, T, N, D]; k, v [B, S, K, D] with keys laid out [Sc clean slots ; Sm mask rows] (S = Sc + Sm,
Sm = meta.k_group.shape[1]); `meta` a `RowMeta` (see `mask.py`). Returns [B, T, N, D] in q's dtype,
equal to `reference.attention_reference` (float32 accumulation; rows that see no key give 0).

The kernel family is one folder: `blocks.py` (BlockSizes, head folding, block-sparse metadata),
`pallas_tpu.py` (Mosaic) and `pallas_gpu.py` (Triton). The backend follows `jax.default_backend()`:
TPU -> Mosaic kernel, GPU -> Triton kernel, CPU -> the Mosaic kernel in interpret mode (tests and
CI). The backward pass is the VJP of the jnp reference (correct, not fast: it materialises the
[B, N, T, S] scores; a fused backward kernel is future work).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flexdraft_jax.kernels import blocks as blocks_lib
from flexdraft_jax.kernels.blocks import BlockSizes
from flexdraft_jax.kernels.mask import RowMeta
from flexdraft_jax.kernels.reference import attention_reference

__all__ = ["BlockSizes", "attention", "default_backend"]

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def default_backend() -> str:
    """Kernel variant for the current JAX backend: 'tpu' (also on CPU, interpreted) or 'gpu'."""
    return "gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else "tpu"


def _validate(q, k, v, meta):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"expected q [B,T,N,D] and k, v [B,S,K,D], got q{q.shape} k{k.shape} v{v.shape}"
        )
    b, t, n, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k{k.shape} v{v.shape}")
    bk, s, kh, dk = k.shape
    if bk != b or dk != d:
        raise ValueError(
            f"batch/head dim of q{q.shape} and k{k.shape} differ (B {b} vs {bk}, D {d} vs {dk})"
        )
    if kh == 0 or n % kh:
        raise ValueError(f"query heads N={n} must be a multiple of kv heads K={kh}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
            raise ValueError(f"{name} dtype must be float32, bfloat16 or float16, got {x.dtype}")
    if k.dtype != v.dtype:
        raise ValueError(f"k and v must share a dtype, got k {k.dtype} v {v.dtype}")
    if not isinstance(meta, RowMeta):
        raise ValueError(f"meta must be a RowMeta, got {type(meta).__name__}")
    for name, x, want in (
        ("q_limit", meta.q_limit, (b, t)),
        ("q_group", meta.q_group, (b, t)),
    ):
        if tuple(x.shape) != want:
            raise ValueError(f"meta.{name} must have shape [B, T] = {want}, got {tuple(x.shape)}")
    if meta.k_group.ndim != 2 or meta.k_group.shape[0] != b or meta.k_group.shape[1] > s:
        raise ValueError(
            f"meta.k_group must have shape [B, Sm] with B={b} and Sm <= S={s}, "
            f"got {tuple(meta.k_group.shape)}"
        )
    for name, x in zip(RowMeta._fields, meta):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"meta.{name} must be an integer array, got {x.dtype}")


def _forward(q, k, v, meta, scale, block_sizes, interpret, backend):
    """Kernel forward: fold heads into rows, tile, run the backend kernel, unfold."""
    b, t, n, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    num_clean = s - meta.num_mask_keys
    if t == 0 or s == 0:
        return jnp.zeros(q.shape, q.dtype)
    compute = jnp.promote_types(q.dtype, k.dtype)
    tiling = blocks_lib.choose_tiling(backend, g * t, s, block_sizes, compute)
    # q [B,T,N,D] -> [B,K,G,T,D] -> folded rows [B,K,G*T,D], padded to whole query blocks.
    qf = q.astype(compute).reshape(b, t, kh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, d)
    qf = jnp.pad(qf, ((0, 0), (0, 0), (0, tiling.rows_padded - tiling.rows), (0, 0)))
    q_limit, q_group = blocks_lib.fold_rows(meta, g, tiling)
    k_groups = blocks_lib.key_groups(meta, num_clean, tiling)
    block_meta = blocks_lib.block_meta(q_limit, q_group, k_groups, num_clean, tiling)
    common = dict(
        num_clean=num_clean,
        num_keys=s,
        scale=scale,
        tiling=tiling,
        out_dtype=q.dtype,
        interpret=interpret,
    )
    if backend == "gpu":
        from flexdraft_jax.kernels.pallas_gpu import flash_gpu  # noqa: PLC0415 (triton import)

        out = flash_gpu(qf, k, v, q_limit, q_group, k_groups, block_meta, **common)
    else:
        from flexdraft_jax.kernels.pallas_tpu import flash_tpu  # noqa: PLC0415 (mosaic import)

        if d % 128 == 0:  # head h is the lane-aligned column block h of [B, S, K*D]: no copy
            kk, vv = k.reshape(b, s, kh * d), v.reshape(b, s, kh * d)
        else:  # a squeezed K in the second-minor position breaks the (8, 128) rule: transpose
            kk, vv = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        out = flash_tpu(qf, kk, vv, q_limit, q_group, k_groups, block_meta, **common)
    out = out[:, :, : tiling.rows].reshape(b, kh, g, t, d).transpose(0, 3, 1, 2, 4)
    return out.reshape(b, t, n, d)


_STATIC = ("scale", "block_sizes", "interpret", "backend")


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _attention(q, k, v, meta, scale, block_sizes, interpret, backend):
    return _forward(q, k, v, meta, scale, block_sizes, interpret, backend)


def _attention_fwd(q, k, v, meta, scale, block_sizes, interpret, backend):
    out = _forward(q, k, v, meta, scale, block_sizes, interpret, backend)
    return out, (q, k, v, meta)


def _attention_bwd(scale, block_sizes, interpret, backend, residuals, d_out):
    q, k, v, meta = residuals
    _, vjp = jax.vjp(lambda q_, k_, v_: attention_reference(q_, k_, v_, meta, scale=scale), q, k, v)
    dq, dk, dv = vjp(d_out)
    return dq, dk, dv, None  # metadata is integer: no cotangent


_attention.defvjp(_attention_fwd, _attention_bwd)
_attention_jit = jax.jit(_attention, static_argnums=(4, 5, 6, 7))


def attention(
    q,
    k,
    v,
    meta: RowMeta,
    *,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret=None,
    backend: str | None = None,
):
    """Masked flash attention over [Sc clean slots ; Sm mask rows]. q [B,T,N,D] -> [B,T,N,D].

    scale: softmax scale (default D ** -0.5). block_sizes: tile upper bounds (default per backend).
    interpret: run the kernel in the Pallas interpreter (default: only when JAX runs on CPU); a
      `pltpu.InterpretParams` selects the TPU-faithful interpreter (simulated DMAs and SMEM/VMEM).
    backend: 'tpu' (Mosaic) or 'gpu' (Triton); default from `jax.default_backend()`.
    Differentiable in q, k, v (the backward pass is the reference's VJP).
    """
    _validate(q, k, v, meta)
    backend = default_backend() if backend is None else backend
    if backend not in ("tpu", "gpu"):
        raise ValueError(f"backend must be 'tpu' or 'gpu', got {backend!r}")
    # interpret=False on CPU is legitimate under `jax.export(..., platforms=["tpu"|"cuda"])`.
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    elif isinstance(interpret, (bool, int)):
        interpret = bool(interpret)  # else: a `pltpu.InterpretParams` (TPU-faithful interpreter)
    block_sizes = BlockSizes.get_default(backend) if block_sizes is None else block_sizes
    if not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes must be a BlockSizes, got {type(block_sizes).__name__}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    # Check the tiling eagerly so a bad block size fails here, naming itself, not inside tracing.
    g = q.shape[2] // k.shape[2]
    if q.shape[1] and k.shape[1]:
        blocks_lib.choose_tiling(
            backend, g * q.shape[1], k.shape[1], block_sizes, jnp.promote_types(q.dtype, k.dtype)
        )
    meta = RowMeta(*(x if x.dtype == jnp.int32 else x.astype(jnp.int32) for x in meta))
    return _attention_jit(q, k, v, meta, scale, block_sizes, interpret, backend)
