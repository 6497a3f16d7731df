"""Timing of the masked-attention kernel against the jnp reference (used by launch/kernel_bench.py).

`compare(q, k, v, meta)` compiles both implementations once, times `iters` synchronised calls of
each, checks they agree and returns a `Timing`. The kernel's block-sparse density (the fraction of
tiles it visits) is reported too, since that is what the kernel saves over the reference. On CPU
the kernel runs in the Pallas interpreter: its time there says nothing about TPU/GPU speed.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from flexdraft_jax.kernels import blocks as blocks_lib
from flexdraft_jax.kernels.blocks import BlockSizes
from flexdraft_jax.kernels.mask import RowMeta
from flexdraft_jax.kernels.pallas_attention import attention, default_backend
from flexdraft_jax.kernels.reference import attention_reference


@dataclasses.dataclass
class Timing:
    kernel_ms: float  # median per call
    reference_ms: float
    speedup: float  # reference / kernel
    max_abs_err: float
    tile_density: float  # fraction of (query block, key block) tiles the kernel visits
    interpret: bool


def _median_ms(fn, args, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def tile_density(q, k, meta: RowMeta, block_sizes: BlockSizes, backend: str) -> float:
    """Fraction of tiles visited by the block-sparse kernel for this metadata."""
    n, kh = q.shape[2], k.shape[2]
    s = k.shape[1]
    num_clean = s - meta.num_mask_keys
    tiling = blocks_lib.choose_tiling(
        backend, (n // kh) * q.shape[1], s, block_sizes, jnp.promote_types(q.dtype, k.dtype)
    )
    q_limit, q_group = blocks_lib.fold_rows(meta, n // kh, tiling)
    k_groups = blocks_lib.key_groups(meta, num_clean, tiling)
    bm = blocks_lib.block_meta(q_limit, q_group, k_groups, num_clean, tiling)
    return float(jnp.mean(bm.visible))


def compare(
    q,
    k,
    v,
    meta: RowMeta,
    *,
    block_sizes: BlockSizes | None = None,
    iters: int = 10,
    warmup: int = 2,
) -> Timing:
    """Time kernel and reference on the same inputs (both jitted, compiled before timing)."""
    backend = default_backend()
    interpret = jax.default_backend() == "cpu"
    sizes = block_sizes or BlockSizes.get_default(backend)
    kernel = jax.jit(lambda q_, k_, v_, m_: attention(q_, k_, v_, m_, block_sizes=sizes))
    reference = jax.jit(attention_reference)
    args = (q, k, v, meta)
    out_k, out_r = kernel(*args), reference(*args)
    err = float(jnp.max(jnp.abs(out_k.astype(jnp.float32) - out_r.astype(jnp.float32))))
    kernel_ms = _median_ms(kernel, args, iters, warmup)
    reference_ms = _median_ms(reference, args, iters, warmup)
    return Timing(
        kernel_ms=kernel_ms,
        reference_ms=reference_ms,
        speedup=reference_ms / kernel_ms,
        max_abs_err=err,
        tile_density=tile_density(q, k, meta, sizes, backend),
        interpret=interpret,
    )
