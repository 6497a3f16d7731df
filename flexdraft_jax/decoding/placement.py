"""Where decoding's arrays live when a `Decoder` runs on a mesh (`sharding.DECODE_RULES`).

Host side: `place_params` puts a target or draft on the mesh by the rules, `put` turns host values
into global arrays (every process passes the same values: one SPMD program), `init_cache` makes
the KV cache already sharded (batch over "data", kv heads over "tensor"), and `to_host` reads a
result back on every process (all-gathered when it spans processes).

Device side (while tracing under `jax.set_mesh` or `jax.sharding.use_abstract_mesh`): `batch`,
`cache` and `replicated` pin a decode state's leaves to those layouts, so the compiled prefill,
step and loop return the state sharded exactly as it came in (the donated cache is then aliased,
never resharded). Without a mesh in context they return their input: single-device decoding
traces the same program as before.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flexdraft_jax import sharding as shd
from flexdraft_jax.models import transformer as tf
from flexdraft_jax.models.config import ModelConfig


def current():
    """The mesh in context while tracing (an AbstractMesh), or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def _batch_entry(mesh, size: int):
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and mesh.shape[a] > 1)
    n = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if not axes or size % n:
        return None
    return axes[0] if len(axes) == 1 else axes


def batch_spec(mesh, shape) -> P:
    """Leading (batch) dimension over the data axes where it divides them; the rest replicated."""
    return P(_batch_entry(mesh, shape[0]), *([None] * (len(shape) - 1)))


def batch(x):
    mesh = current()
    return x if mesh is None else jax.lax.with_sharding_constraint(x, batch_spec(mesh, x.shape))


def replicated(x):
    return x if current() is None else jax.lax.with_sharding_constraint(x, P())


def cache(x, cfg: ModelConfig):
    """A KV cache array [L, B, S, K, D] pinned to `sharding.cache_spec`."""
    mesh = current()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, shd.cache_spec(cfg, x.shape[1], mesh))


# ----------------------------------------------------------------------------- host side


def put(x, sharding: NamedSharding):
    """A global array from a host value every process holds whole (numpy or a local array), or
    an array already on the mesh resharded."""
    if isinstance(x, jax.Array) and (jax.process_count() == 1 or not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def put_batch(x, mesh):
    x = np.asarray(x)
    return put(x, NamedSharding(mesh, batch_spec(mesh, x.shape)))


def put_replicated(x, mesh):
    return put(x, NamedSharding(mesh, P()))


def place_params(cfg: ModelConfig, tree, mesh):
    """A target or draft parameter tree on `mesh` by `sharding.decode_param_specs`."""
    if tree is None:
        return None
    specs = shd.decode_param_specs(cfg, tree, mesh)
    return jax.tree.map(lambda x, s: put(x, NamedSharding(mesh, s)), tree, specs)


def mesh_of(tree):
    """The mesh a parameter tree is sharded over (a NamedSharding of several devices), or None."""
    sh = getattr(jax.tree.leaves(tree)[0], "sharding", None)
    return sh.mesh if isinstance(sh, NamedSharding) and sh.mesh.size > 1 else None


def inputs_for(params):
    """A function turning host arrays into inputs of a computation on `params`: global replicated
    arrays when `params` span a mesh (every process passes the same values), else `jnp.asarray`."""
    mesh = mesh_of(params)
    if mesh is None:
        return jax.numpy.asarray
    return lambda x: put_replicated(np.asarray(x), mesh)


def init_cache(cfg: ModelConfig, batch_size: int, capacity: int, dtype, mesh) -> tf.KVCache:
    """An empty KV cache created sharded (no device ever holds all of it)."""
    spec = shd.cache_spec(cfg, batch_size, mesh)
    sh = tf.KVCache(
        NamedSharding(mesh, spec),
        NamedSharding(mesh, spec),
        NamedSharding(mesh, batch_spec(mesh, (batch_size,))),
    )
    make = jax.jit(lambda: tf.init_cache(cfg, batch_size, capacity, dtype), out_shardings=sh)
    return make()


def to_host(x) -> np.ndarray:
    """A numpy copy of `x` on every process (all-gathered when it spans processes)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def host_tree(tree):
    return jax.tree.map(to_host, tree)
