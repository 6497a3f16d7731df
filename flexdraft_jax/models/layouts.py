"""Row layouts: per-row positions and `RowMeta` for every FlexDraft forward (DESIGN §2.1, §2.3).

Each function returns a `Layout`: clean-row positions [B, Tc], mask-row positions [B, Tm] and the
`RowMeta` over the Tc + Tm query rows. Positions equal cache slots (sequences start at slot 0, no
left padding), so `q_limit` is both "clean keys visible" and "clean positions visible".

  causal         Tc clean rows at start .. start+Tc-1 (prefill, AR step, verify pass)
  prefill_block  causal prompt rows + one mask block anchored at each prompt's length
  parallel       R candidate rows + G mask groups; group k anchored at start + k + 1
  draft_pass     one mask block anchored at `anchor` (deep layers only, no clean rows)
  training       a whole sequence (no cache) + A blocks anchored at `anchors`

The boolean grid itself always comes from `kernels.mask.dense_mask` (or the kernel's in-tile
evaluation of the same rule); nothing here builds a mask by hand.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from flexdraft_jax.kernels.mask import RowMeta


class Layout(NamedTuple):
    positions: jnp.ndarray  # int32[B, Tc]
    mask_positions: jnp.ndarray  # int32[B, Tm]
    meta: RowMeta


def _i32(x):
    return jnp.asarray(x, jnp.int32)


def _clean_rows(start, num_rows):
    """Causal clean rows at slots start + i: (positions, q_limit, q_group)."""
    start = _i32(start)
    pos = start[:, None] + jnp.arange(num_rows, dtype=jnp.int32)[None, :]
    return pos, pos + 1, jnp.full(pos.shape, -1, jnp.int32)


def _mask_groups(anchors, block_size):
    """Blocks at anchors [B, G]: slot j of group g at anchor + j sees clean keys < anchor."""
    anchors = _i32(anchors)
    b, g = anchors.shape
    j = jnp.arange(block_size, dtype=jnp.int32)
    pos = (anchors[:, :, None] + j).reshape(b, g * block_size)
    limit = jnp.repeat(anchors, block_size, axis=1)
    group = jnp.broadcast_to(
        jnp.repeat(jnp.arange(g, dtype=jnp.int32), block_size), (b, g * block_size)
    )
    return pos, limit, group


def _join(clean, mask):
    (cp, cl, cg), (mp, ml, mg) = clean, mask
    meta = RowMeta(
        q_limit=jnp.concatenate([cl, ml], axis=1),
        q_group=jnp.concatenate([cg, mg], axis=1),
        k_group=mg,
    )
    return Layout(cp, mp, meta)


def _empty(b):
    z = jnp.zeros((b, 0), jnp.int32)
    return z, z, z


def causal(start, num_rows: int) -> Layout:
    """Clean rows only, written at slots start .. start + num_rows - 1."""
    start = _i32(start)
    return _join(_clean_rows(start, num_rows), _empty(start.shape[0]))


def prefill_block(lengths, num_rows: int, block_size: int) -> Layout:
    """Prompt rows 0 .. num_rows-1 (padded past each length) + one mask block at each length."""
    lengths = _i32(lengths)
    clean = _clean_rows(jnp.zeros_like(lengths), num_rows)
    return _join(clean, _mask_groups(lengths[:, None], block_size))


def parallel(start, num_rows: int, num_groups: int, block_size: int) -> Layout:
    """Candidate rows C[0..R-1] at start.. and G groups; group k hypothesises k accepted drafts."""
    start = _i32(start)
    anchors = start[:, None] + 1 + jnp.arange(num_groups, dtype=jnp.int32)[None, :]
    return _join(_clean_rows(start, num_rows), _mask_groups(anchors, block_size))


def draft_pass(anchor, block_size: int) -> Layout:
    """One mask block anchored at `anchor` [B], against the cache (no clean rows)."""
    anchor = _i32(anchor)
    return _join(_empty(anchor.shape[0]), _mask_groups(anchor[:, None], block_size))


def training(seq_len: int, anchors, block_size: int) -> Layout:
    """A sequence's clean rows 0..seq_len-1 (keys are these rows, no cache) + blocks at anchors."""
    anchors = _i32(anchors)
    clean = _clean_rows(jnp.zeros((anchors.shape[0],), jnp.int32), seq_len)
    return _join(clean, _mask_groups(anchors, block_size))
