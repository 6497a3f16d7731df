"""The attention entry points every model layer calls: `attention(q, k, v, meta, impl=...)`, and
`cached_attention` for a decode step whose new clean rows are not yet in the cache.

`impl` is "xla" (the jnp reference, fused by XLA), "pallas" or "auto" (Pallas when the default
backend is TPU/GPU, XLA on CPU). "pallas" picks its kernel when the program is lowered, by the
platform it is lowered for (`lax.platform_dependent`): Mosaic on TPU, Triton on CUDA/ROCm, the
Mosaic kernel in interpret mode anywhere else (CPU tests). So a program exported from a CPU host
with `jax.export(..., platforms=["tpu"])` holds the real TPU kernel. "auto" is decided when the
program is traced, from `jax.default_backend()`: exporting from a CPU host, say "pallas".

On a mesh (traced under `jax.set_mesh` / `use_abstract_mesh`, as a sharded decode is), attention
runs per shard in a `jax.shard_map`: rows over the batch axes ("data", "fsdp") and heads over
"tensor" where they divide them. Attention is independent per sequence and per kv head with its
query group, so each shard computes exactly its part, and a Pallas kernel (which XLA cannot
partition) sees only local blocks instead of gathered ones.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from flexdraft_jax.kernels.mask import RowMeta
from flexdraft_jax.kernels.reference import attention_reference, cached_attention_reference


def resolve_impl(impl: str) -> str:
    if impl == "auto":
        return "pallas" if jax.default_backend() in ("tpu", "gpu") else "xla"
    if impl not in ("xla", "pallas"):
        raise ValueError(f"attention impl must be xla, pallas or auto, got {impl!r}")
    return impl


BATCH_AXES = ("data", "fsdp")  # mesh axes the batch is split over (kernels import no sharding.py)
HEAD_AXIS = "tensor"


def _shard_specs(b: int, n: int, kh: int):
    """(batch entry, head entry) of the mesh in context for [B, ., N|K, D] operands, or None when
    there is no mesh or nothing of these shapes splits over it."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    bat = axes if axes and b % math.prod(mesh.shape[a] for a in axes) == 0 else ()
    t = mesh.shape[HEAD_AXIS] if HEAD_AXIS in mesh.axis_names else 1
    heads = HEAD_AXIS if t > 1 and n % t == 0 and kh % t == 0 else None
    if not bat and heads is None:
        return None
    return (bat[0] if len(bat) == 1 else bat or None), heads


def _per_shard(fn, heads_args, rows_args, b, n, kh):
    """fn(*heads_args, *rows_args) in a shard_map: heads_args [B, ., N|K, D] split over batch and
    heads, rows_args (per-row metadata, [B, ...]) over batch. Without a mesh: fn itself."""
    specs = _shard_specs(b, n, kh)
    if specs is None:
        return fn(*heads_args, *rows_args)
    bat, heads = specs
    h_spec = P(bat, None, heads, None)
    row = lambda x: P(bat, *([None] * (x.ndim - 1)))
    in_specs = (*[h_spec] * len(heads_args), *jax.tree.map(row, rows_args))
    # check_vma off: a pallas_call declares no varying-axes type for its output.
    return jax.shard_map(fn, in_specs=in_specs, out_specs=h_spec, check_vma=False)(
        *heads_args, *rows_args
    )


def attention(q, k, v, meta: RowMeta, *, impl: str = "xla", scale: float | None = None):
    """Masked attention over [clean slots ; mask rows]. q [B,T,N,D], k/v [B,S,K,D] -> [B,T,N,D]."""
    fn = lambda q, k, v, meta: _attention(q, k, v, meta, impl=impl, scale=scale)
    return _per_shard(fn, (q, k, v), (meta,), q.shape[0], q.shape[2], k.shape[2])


def _attention(q, k, v, meta: RowMeta, *, impl: str, scale: float | None):
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

    def fn(q, ck, cv, nk, nv, cached, new_slots, meta):
        return _cached_attention(q, ck, cv, cached, nk, nv, new_slots, meta, impl=impl)

    heads_args, rows_args = (q, ck, cv, nk, nv), (cached, new_slots, meta)
    return _per_shard(fn, heads_args, rows_args, q.shape[0], q.shape[2], ck.shape[2])


def _cached_attention(q, ck, cv, cached, nk, nv, new_slots, meta: RowMeta, *, impl: str):
    if resolve_impl(impl) == "xla":
        return cached_attention_reference(q, ck, cv, cached, nk, nv, new_slots, meta)
    n_new = new_slots.shape[1]
    bidx = jnp.arange(ck.shape[0])[:, None]
    keys = ck.at[bidx, new_slots].set(nk[:, :n_new].astype(ck.dtype), mode="drop")
    values = cv.at[bidx, new_slots].set(nv[:, :n_new].astype(cv.dtype), mode="drop")
    keys = jnp.concatenate([keys, nk[:, n_new:].astype(ck.dtype)], axis=1)
    values = jnp.concatenate([values, nv[:, n_new:].astype(cv.dtype)], axis=1)
    return _attention(q, keys, values, meta, impl=impl, scale=None)
