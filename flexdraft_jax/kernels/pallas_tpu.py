"""Masked flash attention for TPU (Mosaic, `jax.experimental.pallas.tpu`).

Grid (B, K, nq, nk): batch, kv head, query block, key block (the reduction axis, innermost and
"arbitrary"). Each step scores a [block_q, block_k] tile of folded query rows (see `blocks.py`)
against one kv head, applies the RowMeta rule to the tile, and updates an online softmax held in
VMEM scratch (running max m, normaliser l, float32 accumulator). The block-sparse structure is
scalar-prefetched into SMEM: `visible` gates the tile's compute and `fetch` steers the K/V index
maps, so a skipped step re-names the block already resident and costs no DMA.

K/V are read where they lie whenever possible: with D a multiple of 128 the [B, S, K, D] arrays are
viewed (for free) as [B, S, K*D] and a head is a lane-aligned column block. For other head dims
(SmolLM2: D = 64) the caller passes them transposed to [B, K, S, D], since a squeezed K axis in the
second-minor position breaks Mosaic's (8, 128) block rule. Keys are not padded: the last key block
may run past S, and its out-of-range rows are zeroed before use.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from flexdraft_jax.kernels.blocks import BlockMeta, Tiling

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: no inf - inf on fully masked rows
LANES = 128  # width of the m / l scratch (one lane-dense vreg column per row)
_TRANS_B = (((1,), (1,)), ((), ()))


def _kernel(
    visible_ref,  # SMEM int32[B * nq * nk] (scalar prefetch)
    fetch_ref,  # SMEM int32[B * nq * nk] (scalar prefetch; used by the index maps only)
    q_ref,  # [bq, D]
    k_ref,  # [bk, D]
    v_ref,  # [bk, D]
    lim_ref,  # int32[bq, 1]
    grp_ref,  # int32[bq, 1]
    kgrp_ref,  # int32[1, bk]
    o_ref,  # [bq, D]
    m_ref,  # f32[bq, LANES]
    l_ref,  # f32[bq, LANES]
    acc_ref,  # f32[bq, D]
    *,
    scale: float,
    num_clean: int,
    num_keys: int,
    num_q_blocks: int,
    num_k_blocks: int,
):
    del fetch_ref
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    bq, bk = q_ref.shape[0], k_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(visible_ref[(b * num_q_blocks + i) * num_k_blocks + j] != 0)
    def _tile():
        q = q_ref[...]
        k = k_ref[...].astype(q.dtype)
        v = v_ref[...].astype(q.dtype)
        if num_keys % bk:  # the last block reads past S: zero those rows (they may hold NaNs)
            valid = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bk, 1), 0) < num_keys
            k = jnp.where(valid, k, jnp.zeros_like(k))
            v = jnp.where(valid, v, jnp.zeros_like(v))
        s = jax.lax.dot_general(q, k, _TRANS_B, preferred_element_type=jnp.float32) * scale
        # The RowMeta rule on the tile: clean keys below q_limit, mask keys of the row's own group.
        kidx = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        lim, grp = lim_ref[...], grp_ref[...]
        seen = ((kidx < lim) & (kidx < num_clean)) | ((grp >= 0) & (kgrp_ref[...] == grp))
        s = jnp.where(seen, s, MASK_VALUE)
        m_prev = m_ref[...][:, :1]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(seen, jnp.exp(s - m_next), 0.0)
        alpha = jnp.exp(m_prev - m_next)
        l_next = alpha * l_ref[...][:, :1] + jnp.sum(p, axis=1, keepdims=True)
        m_ref[...] = jnp.broadcast_to(m_next, m_ref.shape)
        l_ref[...] = jnp.broadcast_to(l_next, l_ref.shape)
        pv = jax.lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        acc_ref[...] = alpha * acc_ref[...] + pv

    @pl.when(j == num_k_blocks - 1)
    def _store():
        denom = l_ref[...][:, :1]
        inv = jnp.where(
            denom == 0.0, 0.0, 1.0 / jnp.where(denom == 0.0, 1.0, denom)
        )  # unseen rows give 0
        o_ref[...] = (acc_ref[...] * inv).astype(o_ref.dtype)


def flash_tpu(
    q,  # [B, K, Rp, D] folded query rows
    k,  # [B, S, K*D] ("flat") or [B, K, S, D] ("heads")
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
):
    """Folded-row masked attention on TPU; returns [B, K, Rp, D] in `out_dtype`."""
    b, kh, rp, d = q.shape
    bq, bk, nq, nk = tiling.block_q, tiling.block_k, tiling.num_q_blocks, tiling.num_k_blocks
    flat = k.ndim == 3

    def step(bi, i, j):
        return (bi * nq + i) * nk + j

    def q_map(bi, h, i, j, vis, fetch):
        return bi, h, i, 0

    if flat:

        def kv_map(bi, h, i, j, vis, fetch):
            return bi, fetch[step(bi, i, j)], h

        kv_spec = pl.BlockSpec((None, bk, d), kv_map)
    else:

        def kv_map(bi, h, i, j, vis, fetch):
            return bi, h, fetch[step(bi, i, j)], 0

        kv_spec = pl.BlockSpec((None, None, bk, d), kv_map)

    def row_map(bi, h, i, j, vis, fetch):
        return bi, i, 0

    def kgrp_map(bi, h, i, j, vis, fetch):
        return bi, 0, fetch[step(bi, i, j)]

    kernel = functools.partial(
        _kernel,
        scale=scale,
        num_clean=num_clean,
        num_keys=num_keys,
        num_q_blocks=nq,
        num_k_blocks=nk,
    )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, kh, nq, nk),
        in_specs=[
            pl.BlockSpec((None, None, bq, d), q_map),
            kv_spec,
            kv_spec,
            pl.BlockSpec((None, bq, 1), row_map),
            pl.BlockSpec((None, bq, 1), row_map),
            pl.BlockSpec((None, 1, bk), kgrp_map),
        ],
        out_specs=pl.BlockSpec((None, None, bq, d), q_map),
        scratch_shapes=[
            pltpu.VMEM((bq, LANES), jnp.float32),
            pltpu.VMEM((bq, LANES), jnp.float32),
            pltpu.VMEM((bq, d), jnp.float32),
        ],
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, kh, rp, d), out_dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name="flexdraft_masked_attention_tpu",
    )(
        blocks.visible.reshape(-1),
        blocks.fetch.reshape(-1),
        q,
        k,
        v,
        q_limit[:, :, None],
        q_group[:, :, None],
        k_groups[:, None, :],
    )
