"""Tiling of the masked-attention Pallas kernels: BlockSizes, head folding, block-sparse metadata.

Shape alphabet: B batch, T query rows, S key rows (Sc clean slots then Sm mask rows), N query heads,
K kv heads, D head dim, G = N / K query heads per kv head.

The kernels see one kv head at a time. Its G query heads are *folded into the rows*: row
`r = g * T + t` of kv head `h` is query head `h * G + g` at row `t`, so a tile of query rows shares
one K/V stream (grouped-query attention without re-reading K/V per query head) and short decode
steps (T = 1..24 rows) still fill a tile. Per-row metadata is tiled G times along with the rows.
Rows are padded to a multiple of the query block with rows that see nothing (q_limit 0, group -1);
mask-key groups are padded to whole key blocks with -3 (never matches). Clean keys carry group -2.

Block-sparse skipping is derived on device from the traced metadata (decoding calls the kernels
under jit): per query block the largest `q_limit` and the range of groups its rows belong to; per
key block the range of groups of its mask keys. A key block is visited iff some row of the query
block may see one of its keys. Because rows of one group are contiguous in every layout, these range
tests are exact there (they equal `mask.block_visibility` of the folded metadata; tested); for other
metadata they are conservative, never wrong, since every tile still applies the exact rule.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from flexdraft_jax.common import round_up
from flexdraft_jax.kernels.mask import RowMeta

CLEAN_KEY_GROUP = -2  # group of a clean key (never equal to a mask row's group >= 0)
PAD_KEY_GROUP = -3  # group of a padding key past S (invisible to every row)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes: `block_q` folded query rows by `block_k` keys.

    These are upper bounds: a problem smaller than a block uses one block covering it. TPU wants
    `block_k` a multiple of 128 (the lane width; keys are the lane axis of the score tile) and
    `block_q` a multiple of 8 (16 for bf16); Triton (GPU) wants powers of two >= 16.
    """

    block_q: int = 128
    block_k: int = 128

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 8 or value % 8:
                raise ValueError(f"{name} must be a positive multiple of 8, got {value!r}")

    @classmethod
    def get_default(cls, backend: str) -> BlockSizes:
        return cls(128, 128) if backend == "tpu" else cls(64, 64)


class Tiling(NamedTuple):
    """Concrete tiling of one call (all static Python ints)."""

    block_q: int  # folded query rows per tile
    block_k: int  # keys per tile
    rows: int  # R = G * T folded rows
    rows_padded: int  # Rp, multiple of block_q
    num_q_blocks: int
    num_k_blocks: int  # cdiv(S, block_k); the last block may be partial (keys are never padded)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def choose_tiling(backend: str, rows: int, num_keys: int, sizes: BlockSizes, dtype) -> Tiling:
    """Shrink the blocks to the problem and check the backend's block-shape rules."""
    if backend == "tpu":
        sub = 16 if jnp.dtype(dtype).itemsize == 2 else 8
        if sizes.block_q % sub:
            raise ValueError(
                f"TPU block_q must be a multiple of {sub} for {dtype}, got {sizes.block_q}"
            )
        if sizes.block_k % 128:
            raise ValueError(f"TPU block_k must be a multiple of 128, got {sizes.block_k}")
        bq = min(sizes.block_q, round_up(rows, sub))
        # A key block either covers all keys (any size is legal then) or is lane-aligned.
        bk = num_keys if num_keys <= sizes.block_k else sizes.block_k
    elif backend == "gpu":
        for name, value in (("block_q", sizes.block_q), ("block_k", sizes.block_k)):
            if value < 16 or value & (value - 1):
                raise ValueError(f"GPU (Triton) {name} must be a power of two >= 16, got {value}")
        bq = min(sizes.block_q, max(16, _next_pow2(rows)))
        bk = min(sizes.block_k, max(16, _next_pow2(num_keys)))
    else:
        raise ValueError(f"kernel backend must be 'tpu' or 'gpu', got {backend!r}")
    rp = round_up(rows, bq)
    return Tiling(bq, bk, rows, rp, rp // bq, -(-num_keys // bk))


def fold_rows(meta: RowMeta, heads_per_kv: int, tiling: Tiling):
    """Per folded row metadata: q_limit, q_group int32[B, Rp] (padding rows see nothing)."""
    pad = tiling.rows_padded - tiling.rows

    def fold(x, fill):
        x = jnp.tile(x.astype(jnp.int32), (1, heads_per_kv))
        return jnp.pad(x, ((0, 0), (0, pad)), constant_values=fill)

    return fold(meta.q_limit, 0), fold(meta.q_group, -1)


def key_groups(meta: RowMeta, num_clean: int, tiling: Tiling):
    """Group of every key slot, padded to whole key blocks: int32[B, num_k_blocks * block_k]."""
    b = meta.k_group.shape[0]
    total = tiling.num_k_blocks * tiling.block_k
    parts = [
        jnp.full((b, num_clean), CLEAN_KEY_GROUP, jnp.int32),
        meta.k_group.astype(jnp.int32),
        jnp.full((b, total - num_clean - meta.num_mask_keys), PAD_KEY_GROUP, jnp.int32),
    ]
    return jnp.concatenate(parts, axis=1)


class BlockMeta(NamedTuple):
    """Block-sparse structure of one call, computed on device.

    visible  int32[B, nq, nk]  1 where some row of query block i may see a key of key block j
    fetch    int32[B, nq, nk]  key block to DMA at step j: j if visible, else the last visible block
                               before it (the TPU pipeline skips a copy whose block index repeats)
    ranges   int32[B, nq, 4]   [0, clean_hi, mask_lo, mask_hi]: key-block loops of the GPU kernel
                               (clean blocks [0, clean_hi), mask blocks [mask_lo, mask_hi))
    """

    visible: jnp.ndarray
    fetch: jnp.ndarray
    ranges: jnp.ndarray


def block_meta(q_limit, q_group, k_groups, num_clean: int, tiling: Tiling) -> BlockMeta:
    """q_limit, q_group: folded rows int32[B, Rp]; k_groups: int32[B, nk * block_k]."""
    b = q_limit.shape[0]
    nq, nk, bq, bk = tiling.num_q_blocks, tiling.num_k_blocks, tiling.block_q, tiling.block_k
    big = jnp.iinfo(jnp.int32).max
    # Query blocks: furthest clean key any row sees, and the range of groups of its mask rows.
    lim = jnp.clip(q_limit.reshape(b, nq, bq).max(axis=2), 0, num_clean)
    g = q_group.reshape(b, nq, bq)
    g_lo = jnp.where(g >= 0, g, big).min(axis=2)
    g_hi = jnp.where(g >= 0, g, -1).max(axis=2)
    # Key blocks: clean blocks are a prefix; mask keys carry groups >= 0.
    kg = k_groups.reshape(b, nk, bk)
    k_lo = jnp.where(kg >= 0, kg, big).min(axis=2)
    k_hi = jnp.where(kg >= 0, kg, -1).max(axis=2)
    clean_hi = -(-lim // bk)  # [B, nq]: blocks holding a visible clean key
    j = jnp.arange(nk, dtype=jnp.int32)
    clean_vis = j[None, None, :] < clean_hi[:, :, None]
    mask_vis = (k_lo[:, None, :] <= g_hi[:, :, None]) & (k_hi[:, None, :] >= g_lo[:, :, None])
    visible = clean_vis | mask_vis
    # Last visible block at or before j (or the first visible one, for leading skipped steps).
    last = jax.lax.cummax(jnp.where(visible, j, -1), axis=2)
    first = jnp.argmax(visible, axis=2).astype(jnp.int32)[:, :, None]
    fetch = jnp.where(last >= 0, last, first)
    any_mask = mask_vis.any(axis=2)
    mask_lo = jnp.where(any_mask, jnp.argmax(mask_vis, axis=2), nk).astype(jnp.int32)
    mask_hi = jnp.where(any_mask, nk - jnp.argmax(mask_vis[:, :, ::-1], axis=2), 0)
    mask_lo = jnp.maximum(mask_lo, clean_hi)  # a block straddling Sc is visited once
    ranges = jnp.stack(
        [jnp.zeros_like(clean_hi), clean_hi, mask_lo, mask_hi.astype(jnp.int32)], axis=2
    )
    return BlockMeta(visible.astype(jnp.int32), fetch.astype(jnp.int32), ranges.astype(jnp.int32))
