"""Per-row attention metadata and the one rule that turns it into a mask.

Every attention layout of FlexDraft (prefill plus a mask block, the parallel step, the verify pass,
the sequential draft pass, training packing) is described by `RowMeta`, three small integer arrays:

  q_limit  int32[B, T]   a query row sees the clean keys with slot index < q_limit
  q_group  int32[B, T]   -1 for a clean row, else the mask group (block) the row belongs to
  k_group  int32[B, Sm]  the group of each mask key (mask keys follow the Sc clean keys)

Keys are laid out as [Sc clean slots ; Sm mask rows]. The rule (`allowed`):

  clean key s   visible to row t  iff  s < q_limit[t]
  mask key j    visible to row t  iff  q_group[t] >= 0 and k_group[j] == q_group[t]

so a clean row never sees a mask key, and mask blocks never see each other. `dense_mask` is the
literal boolean grid (used by the jnp reference and by the tests); the Pallas kernels evaluate the
same rule per tile and use `block_visibility` to skip tiles no row can see.

This module imports nothing from the rest of the package (kernels sit at the bottom of the graph).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


class RowMeta(NamedTuple):
    q_limit: jnp.ndarray  # int32[B, T]
    q_group: jnp.ndarray  # int32[B, T]
    k_group: jnp.ndarray  # int32[B, Sm]

    @property
    def num_mask_keys(self) -> int:
        return self.k_group.shape[1]


def visible(q_limit, q_group, k_slot, k_group, is_clean_key):
    """The visibility rule over keys named by slot and group (broadcastable).

    q_limit, q_group: [..., T, 1]; k_slot: [..., 1, S] the key's cache slot (clean keys);
    k_group: [..., 1, S] the key's mask group (mask keys); is_clean_key: bool [..., 1, S].
    """
    clean_ok = is_clean_key & (k_slot < q_limit)
    mask_ok = (~is_clean_key) & (q_group >= 0) & (k_group == q_group)
    return clean_ok | mask_ok


def allowed(q_limit, q_group, k_index, k_group, num_clean):
    """`visible` over keys laid out [Sc clean slots ; Sm mask rows].

    q_limit, q_group: [..., T, 1]; k_index: [S] (key slot index); k_group: [..., 1, S] (group of the
    key, ignored for clean keys); num_clean: number of clean key slots Sc.
    """
    return visible(q_limit, q_group, k_index, k_group, k_index < num_clean)


def dense_mask(meta: RowMeta, num_clean: int) -> jnp.ndarray:
    """bool[B, T, Sc + Sm]: which key each query row may attend to."""
    b = meta.q_limit.shape[0]
    sm = meta.num_mask_keys
    k_index = jnp.arange(num_clean + sm)
    k_group = jnp.concatenate(
        [jnp.full((b, num_clean), -2, jnp.int32), meta.k_group.astype(jnp.int32)], axis=1
    )
    return allowed(
        meta.q_limit[:, :, None], meta.q_group[:, :, None], k_index, k_group[:, None, :], num_clean
    )


def cached_masks(meta: RowMeta, cached, window: int, new_slots):
    """The rule for a decode step whose clean rows are not yet written to the cache.

    Keys are [cache slots 0..window-1 ; Sn new clean rows at `new_slots` int32[B, Sn] ; Sm mask
    rows]. Cache slots at or past `cached` int32[B] (the length before this step) hold stale rows
    that the new rows will overwrite, so they are invisible; the new rows follow the clean rule
    by their slots. Returns (bool[B, T, window], bool[B, T, Sn + Sm]).
    """
    b = meta.q_limit.shape[0]
    q_limit, q_group = meta.q_limit[:, :, None], meta.q_group[:, :, None]
    limit = jnp.minimum(q_limit, jnp.asarray(cached, jnp.int32)[:, None, None])
    slots = jnp.arange(window, dtype=jnp.int32)[None, None, :]
    in_cache = visible(limit, q_group, slots, slots, True)
    n_new, n_mask = new_slots.shape[1], meta.num_mask_keys
    k_slot = jnp.concatenate([new_slots, jnp.zeros((b, n_mask), new_slots.dtype)], axis=1)
    k_group = jnp.concatenate([jnp.zeros((b, n_new), meta.k_group.dtype), meta.k_group], axis=1)
    is_clean = jnp.arange(n_new + n_mask) < n_new
    new = visible(q_limit, q_group, k_slot[:, None, :], k_group[:, None, :], is_clean)
    return in_cache, new


def block_visibility(meta: RowMeta, num_clean: int, block_q: int, block_k: int) -> np.ndarray:
    """bool[B, T/block_q, S/block_k]: tiles with at least one visible (row, key) pair.

    Computed on host from concrete metadata (outside jit, as splash attention builds its
    block-sparse structure); kernels use the in-kernel equivalent on traced metadata.
    """
    m = np.asarray(dense_mask(meta, num_clean))
    b, t, s = m.shape
    if t % block_q or s % block_k:
        raise ValueError(f"rows {t} / keys {s} not divisible by blocks {block_q} / {block_k}")
    return m.reshape(b, t // block_q, block_q, s // block_k, block_k).any(axis=(2, 4))
