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


def allowed(q_limit, q_group, k_index, k_group, num_clean):
    """Broadcastable form of the visibility rule.

    q_limit, q_group: [..., T, 1]; k_index: [S] (key slot index); k_group: [..., 1, S] (group of the
    key, ignored for clean keys); num_clean: number of clean key slots Sc.
    """
    is_clean_key = k_index < num_clean
    clean_ok = is_clean_key & (k_index < q_limit)
    mask_ok = (~is_clean_key) & (q_group >= 0) & (k_group == q_group)
    return clean_ok | mask_ok


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
