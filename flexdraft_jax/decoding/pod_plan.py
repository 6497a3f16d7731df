"""Pod-size evidence without a pod: the sharded decode step of a large target, exported for TPU on
an abstract mesh, and each device's share of parameters, draft and KV cache.

`plan(cfg, dcfg, mesh_shape, ...)` builds the target, draft and decode state as ShapeDtypeStructs
(`jax.eval_shape`: no weight is allocated) with the shardings a `Decoder(mesh=...)` gives them
(`sharding.DECODE_RULES`, `engine.state_layout`), lowers the compiled step (`engine.step`: every
branch under `lax.switch`, the cache donated) with `jax.export` for the requested platforms on a
`jax.sharding.AbstractMesh`, and counts bytes per device from the shardings. Activations (the
step's working set: a few [B, rows, V] float32 logits) are not counted.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flexdraft_jax import sharding as shd
from flexdraft_jax.decoding import engine, placement
from flexdraft_jax.models import transformer as tf
from flexdraft_jax.models.config import DraftConfig, ModelConfig

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class PodPlan:
    """One configuration's decode step on one mesh: bytes per device and the exported step."""

    mesh: dict[str, int]
    batch: int
    cache_len: int
    params_bytes: int  # per device
    draft_bytes: int
    cache_bytes: int  # the KV cache's k and v
    state_bytes: int  # the rest of the decode state (tokens, drafts, statistics)
    params_total: int  # one copy of everything, unsharded
    draft_total: int
    cache_total: int
    exported: jax.export.Exported | None

    @property
    def per_device(self) -> int:
        return self.params_bytes + self.draft_bytes + self.cache_bytes + self.state_bytes

    def row(self) -> dict:
        return {
            "mesh": ",".join(f"{a}:{n}" for a, n in self.mesh.items()),
            "batch": self.batch,
            "cache": self.cache_len,
            "params_gib": self.params_bytes / GIB,
            "draft_gib": self.draft_bytes / GIB,
            "cache_gib": self.cache_bytes / GIB,
            "per_device_gib": self.per_device / GIB,
            "unsharded_gib": (self.params_total + self.draft_total + self.cache_total) / GIB,
        }


def _total(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _with(tree, specs, mesh):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
        tree,
        specs,
        is_leaf=lambda x: isinstance(x, P),
    )


def abstract_model(cfg: ModelConfig, dcfg: DraftConfig, dtype) -> tuple[dict, dict]:
    """(target, draft) ShapeDtypeStructs in `dtype`, as decoding holds them."""
    cast = lambda t: jax.tree.map(lambda x: x.astype(dtype), t)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    target = jax.eval_shape(lambda k: cast(tf.init_target(cfg, k)), key)
    draft = jax.eval_shape(lambda t, k: cast(tf.init_draft(cfg, dcfg, t, k)), target, key)
    return target, draft


def plan(
    cfg: ModelConfig,
    dcfg: DraftConfig,
    mesh_shape: dict[str, int],
    *,
    batch: int = 8,
    cache_len: int = 4096,
    dtype="bfloat16",
    mode: str = "flex",
    prompt_width: int = 128,
    platforms: tuple[str, ...] | None = ("tpu",),
    attention_impl: str = "pallas",
) -> PodPlan:
    """The decode step of `mode` for `batch` sequences in a `cache_len`-slot cache on an abstract
    mesh of `mesh_shape` ({"data": d, "tensor": t}); platforms None: count bytes, export nothing."""
    dtype = jnp.dtype(dtype)
    mesh = AbstractMesh(tuple(mesh_shape.get(a, 1) for a in shd.DECODE_AXES), shd.DECODE_AXES)
    cfg = dataclasses.replace(cfg, attention_impl=attention_impl)
    target, draft = abstract_model(cfg, dcfg, dtype)
    t_specs = shd.decode_param_specs(cfg, target, mesh)
    d_specs = shd.decode_param_specs(cfg, draft, mesh)
    ecfg = engine.EngineConfig(mode=mode, alpha_init=0.5)
    st = engine.Static(cfg, dcfg, ecfg, engine.branches_for(ecfg, dcfg.block_size, batch), ())
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    cache = jax.eval_shape(lambda: tf.init_cache(cfg, batch, cache_len, dtype))
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    prefill = lambda *a: engine.prefill(st, *a, drafts=engine.needs_drafts(st))
    state = jax.eval_shape(
        prefill, target, draft, i32(batch, prompt_width), i32(batch), cache, key, i32()
    )
    c_spec = shd.cache_spec(cfg, batch, mesh)
    s_specs = engine.state_layout(
        state, lambda x: c_spec, lambda x: placement.batch_spec(mesh, x.shape), lambda x: P()
    )
    exported = None
    if platforms:
        args = (
            _with(target, t_specs, mesh),
            _with(draft, d_specs, mesh),
            _with(state, s_specs, mesh),
            jax.ShapeDtypeStruct(
                (len(st.branches) + 1,), jnp.float32, sharding=NamedSharding(mesh, P())
            ),
            jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P())),
        )
        with jax.sharding.use_abstract_mesh(mesh):
            exported = jax.export.export(engine.step, platforms=platforms)(
                st, *args, window=cache_len
            )
    kv = (state.cache.k, state.cache.v)
    rest = state._replace(cache=state.cache._replace(k=None, v=None))
    rest_specs = s_specs._replace(cache=s_specs.cache._replace(k=None, v=None))
    return PodPlan(
        mesh={a: int(mesh.shape[a]) for a in shd.DECODE_AXES},
        batch=batch,
        cache_len=cache_len,
        params_bytes=shd.tree_bytes_per_device(target, t_specs, mesh),
        draft_bytes=shd.tree_bytes_per_device(draft, d_specs, mesh),
        cache_bytes=shd.tree_bytes_per_device(kv, (c_spec, c_spec), mesh),
        state_bytes=shd.tree_bytes_per_device(rest, rest_specs, mesh),
        params_total=_total(target),
        draft_total=_total(draft),
        cache_total=_total(kv),
        exported=exported,
    )


def format_table(rows: list[tuple[str, PodPlan]]) -> str:
    """A markdown table: one line per (name, plan)."""
    head = (
        "| config | mesh | batch | cache | params GiB/dev | draft GiB/dev | KV cache GiB/dev "
        "| total GiB/dev | unsharded GiB |"
    )
    out = [head, "|" + "---|" * 9]
    for name, p in rows:
        r = p.row()
        out.append(
            f"| {name} | {r['mesh']} | {r['batch']} | {r['cache']} | {r['params_gib']:.2f} "
            f"| {r['draft_gib']:.2f} | {r['cache_gib']:.2f} | {r['per_device_gib']:.2f} "
            f"| {r['unsharded_gib']:.2f} |"
        )
    return "\n".join(out)
