"""Masked flash attention for GPU (Triton, `jax.experimental.pallas.triton`).

Grid (nq, B, K): one program per query block, batch and kv head; it walks the key blocks itself in
two `fori_loop`s with traced bounds taken from the block-sparse ranges (`blocks.BlockMeta.ranges`):
the visible clean prefix [0, clean_hi) and the mask-key span [mask_lo, mask_hi). On a decode step
against a long cache that skips the unused cache tail between the two. Each tile applies the exact
RowMeta rule, so a conservative range is never wrong.

K/V stay in their [B, S, K, D] layout (Triton has no (8, 128) block rule) and are not padded: loads
past S are masked to zero. Triton requires power-of-two tiles (`blocks.choose_tiling`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from flexdraft_jax.kernels.blocks import BlockMeta, Tiling

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def _kernel(
    q_ref,  # [bq, D]
    k_ref,  # [S, D] (this batch row and kv head)
    v_ref,  # [S, D]
    lim_ref,  # int32[bq]
    grp_ref,  # int32[bq]
    kgrp_ref,  # int32[nk * bk]
    rng_ref,  # int32[4]: 0, clean_hi, mask_lo, mask_hi
    o_ref,  # [bq, D]
    *,
    scale: float,
    num_clean: int,
    num_keys: int,
    block_k: int,
):
    bq, d = q_ref.shape
    q = q_ref[...]
    lim = lim_ref[...][:, None]
    grp = grp_ref[...][:, None]

    def body(j, carry):
        acc, m_prev, l_prev = carry
        start = j * block_k
        kidx = start + jnp.arange(block_k, dtype=jnp.int32)
        in_range = (kidx < num_keys)[:, None]
        k = plgpu.load(k_ref.at[pl.ds(start, block_k), :], mask=in_range, other=0.0)
        v = plgpu.load(v_ref.at[pl.ds(start, block_k), :], mask=in_range, other=0.0)
        k, v = k.astype(q.dtype), v.astype(q.dtype)
        s = plgpu.dot(q, k, trans_b=True).astype(jnp.float32) * scale
        kgrp = kgrp_ref[pl.ds(start, block_k)][None, :]
        kidx = kidx[None, :]
        seen = ((kidx < lim) & (kidx < num_clean)) | ((grp >= 0) & (kgrp == grp))
        s = jnp.where(seen, s, MASK_VALUE)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        p = jnp.where(seen, jnp.exp(s - m_next[:, None]), 0.0)
        alpha = jnp.exp(m_prev - m_next)
        l_next = alpha * l_prev + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + plgpu.dot(p.astype(v.dtype), v).astype(jnp.float32)
        return acc, m_next, l_next

    carry = (
        jnp.zeros((bq, d), jnp.float32),
        jnp.full((bq,), MASK_VALUE, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    carry = jax.lax.fori_loop(rng_ref[0], rng_ref[1], body, carry)  # visible clean prefix
    acc, _, denom = jax.lax.fori_loop(rng_ref[2], rng_ref[3], body, carry)  # mask-key span
    inv = jnp.where(
        denom == 0.0, 0.0, 1.0 / jnp.where(denom == 0.0, 1.0, denom)
    )  # unseen rows give 0
    o_ref[...] = (acc * inv[:, None]).astype(o_ref.dtype)


def flash_gpu(
    q,  # [B, K, Rp, D] folded query rows
    k,  # [B, S, K, D]
    v,
    q_limit,  # int32[B, Rp]
    q_group,  # int32[B, Rp]
    k_groups,  # int32[B, nk * bk]
    blocks: BlockMeta,
    *,
    num_clean: int,
    num_keys: int,
    scale: float,
    tiling: Tiling,
    out_dtype,
    interpret: bool = False,
    num_warps: int | None = None,
    num_stages: int = 2,
):
    """Folded-row masked attention on GPU; returns [B, K, Rp, D] in `out_dtype`."""
    b, kh, rp, d = q.shape
    s = k.shape[1]
    bq, bk, nq = tiling.block_q, tiling.block_k, tiling.num_q_blocks
    kernel = functools.partial(
        _kernel, scale=scale, num_clean=num_clean, num_keys=num_keys, block_k=bk
    )
    in_specs = [
        pl.BlockSpec((None, None, bq, d), lambda i, bi, h: (bi, h, i, 0)),
        pl.BlockSpec((None, s, None, d), lambda i, bi, h: (bi, 0, h, 0)),
        pl.BlockSpec((None, s, None, d), lambda i, bi, h: (bi, 0, h, 0)),
        pl.BlockSpec((None, bq), lambda i, bi, h: (bi, i)),
        pl.BlockSpec((None, bq), lambda i, bi, h: (bi, i)),
        pl.BlockSpec((None, k_groups.shape[1]), lambda i, bi, h: (bi, 0)),
        pl.BlockSpec((None, None, 4), lambda i, bi, h: (bi, i, 0)),
    ]
    return pl.pallas_call(
        kernel,
        grid=(nq, b, kh),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, bq, d), lambda i, bi, h: (bi, h, i, 0)),
        out_shape=jax.ShapeDtypeStruct((b, kh, rp, d), out_dtype),
        compiler_params=plgpu.CompilerParams(
            num_warps=num_warps or (4 if d <= 64 else 8), num_stages=num_stages
        ),
        interpret=interpret,
        name="flexdraft_masked_attention_gpu",
    )(q, k, v, q_limit, q_group, k_groups, blocks.ranges)
