"""Mesh, logical axis rules and parameter partitioning (MaxText-style, kept short).

The mesh has three axes: "data" (pure data parallelism), "fsdp" (data parallelism with parameters
and optimizer state sharded over it) and "tensor" (model parallelism over heads / MLP width /
vocabulary). Every parameter dimension gets a *logical* name (`logical_axes`, from the parameter's
path in the target / draft tree); the one `RULES` table maps logical names to mesh axes. A dimension
whose size does not divide its mesh axes falls back to replicated, so the same rules serve a tiny
test model on 8 simulated CPU devices and an 8B target on a pod slice.

  make_mesh(shape)                      Mesh over ("data", "fsdp", "tensor"), -1 fills
  param_specs(tree, mesh)               PartitionSpec per leaf (target, draft or grads)
  opt_state_specs(opt, opt_state, ps)   optimizer state mirrors its parameters' specs
  check_sharded(tree, mesh, min_bytes)  every leaf > min_bytes is sharded (abstract; no allocation)

Decoding has a mesh of its own, ("data", "tensor"), and its own short table, `DECODE_RULES`: no
fsdp (the parameters are read every step, so they stay whole on their `tensor` shard), heads, FFN
and vocabulary over "tensor", the batch and the KV cache's batch over "data", the cache's kv heads
over "tensor". Attention heads are split only where both head counts divide the tensor axis
(`decode_rules`), so every shard holds whole query groups with their kv head.

  parse_mesh("data:2,tensor:4")         {"data": 2, "tensor": 4}
  decode_mesh(spec, devices)            Mesh over ("data", "tensor"), -1 fills
  default_decode_mesh_shape(n, b, lim)  all on "data" where the model fits one device, else
                                        "tensor"
  decode_param_specs(cfg, tree, mesh)   PartitionSpec per target / draft leaf for decoding
  cache_spec(cfg, batch, mesh)          the KV cache's PartitionSpec
  tree_bytes_per_device(tree, specs, m) one device's share of a (possibly abstract) tree
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis names (one per kind of dimension).
BATCH = "batch"
LENGTH = "length"
LAYERS = "layers"
EMBED = "embed"  # model width H
VOCAB = "vocab"
HEADS = "heads"  # N * D (query heads, flattened)
KV_HEADS = "kv_heads"  # K * D
HEAD_DIM = "head_dim"
MLP = "mlp"  # F
CALIB = "calib"  # calibration MLP rank r
NORM = "norm"  # norm scales, mask embedding: small, replicated

# Logical name -> mesh axes (None: replicated). The whole sharding policy.
RULES: dict[str, str | tuple[str, ...] | None] = {
    BATCH: ("data", "fsdp"),
    LENGTH: None,
    LAYERS: None,
    EMBED: "fsdp",
    VOCAB: "tensor",
    HEADS: "tensor",
    KV_HEADS: "tensor",
    HEAD_DIM: None,
    MLP: "tensor",
    CALIB: None,
    NORM: None,
}

# Decoding: the same logical names, mapped without fsdp (`decode_rules` adapts it to a model).
DECODE_AXES = ("data", "tensor")
DECODE_RULES: dict[str, str | tuple[str, ...] | None] = {
    BATCH: "data",
    LENGTH: None,
    LAYERS: None,
    EMBED: None,
    VOCAB: "tensor",
    HEADS: "tensor",
    KV_HEADS: "tensor",  # k/v projections' K * D columns; the KV cache's K dimension
    HEAD_DIM: None,
    MLP: "tensor",
    CALIB: None,
    NORM: None,
}

# Parameter name (last path components) -> logical axes, *without* the leading layer axis.
_PARAM_AXES: dict[tuple[str, ...], tuple[str | None, ...]] = {
    ("embed", "embedding"): (VOCAB, EMBED),
    ("lm_head", "kernel"): (EMBED, VOCAB),
    ("q_proj", "kernel"): (EMBED, HEADS),
    ("k_proj", "kernel"): (EMBED, KV_HEADS),
    ("v_proj", "kernel"): (EMBED, KV_HEADS),
    ("o_proj", "kernel"): (HEADS, EMBED),
    ("q_proj", "bias"): (HEADS,),
    ("k_proj", "bias"): (KV_HEADS,),
    ("v_proj", "bias"): (KV_HEADS,),
    ("q_norm", "scale"): (HEAD_DIM,),
    ("k_norm", "scale"): (HEAD_DIM,),
    ("gate_proj", "kernel"): (EMBED, MLP),
    ("up_proj", "kernel"): (EMBED, MLP),
    ("down_proj", "kernel"): (MLP, EMBED),
    ("fc1", "kernel"): (EMBED, CALIB),  # [2H, r]: the concatenated [E(bonus); h] input
    ("fc1", "bias"): (CALIB,),
    ("fc2", "kernel"): (CALIB, VOCAB),
    ("fc2", "bias"): (VOCAB,),
    ("head", "kernel"): (EMBED, VOCAB),  # a restricted draft vocabulary's output layer
    ("head", "ids"): (NORM,),
    ("mask_embedding",): (NORM,),
    ("scale",): (NORM,),  # input_norm, post_norm, final_norm
}


def make_mesh(shape: Mapping[str, int] | Sequence[int], devices=None) -> Mesh:
    """Mesh over ("data", "fsdp", "tensor"); one entry may be -1 (all remaining devices)."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    sizes = list(shape.values() if isinstance(shape, Mapping) else shape)
    if isinstance(shape, Mapping) and tuple(shape) != MESH_AXES:
        raise ValueError(f"mesh axes must be {MESH_AXES} in that order, got {tuple(shape)}")
    sizes = resolve_mesh_shape(sizes, devices.size)
    if jax.default_backend() == "tpu":  # follow the physical topology (ICI rings)
        grid = mesh_utils.create_device_mesh(sizes, list(devices), allow_split_physical_axes=True)
    else:
        grid = devices.reshape(sizes)
    return Mesh(grid, MESH_AXES)


def resolve_mesh_shape(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
    sizes = [int(s) for s in sizes]
    if len(sizes) != len(MESH_AXES):
        raise ValueError(f"mesh shape needs {len(MESH_AXES)} entries {MESH_AXES}, got {sizes}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
    if -1 in sizes:
        rest = math.prod(s for s in sizes if s != -1)
        if num_devices % rest:
            raise ValueError(f"mesh {sizes} does not fit {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // rest
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices, "
            f"but {num_devices} are available"
        )
    return tuple(sizes)


def abstract_mesh(sizes: Sequence[int]) -> AbstractMesh:
    """A device-free mesh of the given shape (for sharding checks of pod-scale configs)."""
    return AbstractMesh(tuple(int(s) for s in sizes), MESH_AXES)


def _path_names(path) -> tuple[str, ...]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
    return tuple(out)


def logical_axes(path, shape) -> tuple[str | None, ...]:
    """Logical axis name of every dimension of the parameter at `path` (a key path or names)."""
    names = path if all(isinstance(n, str) for n in path) else _path_names(path)
    for n in (2, 1):
        axes = _PARAM_AXES.get(tuple(names[-n:]))
        if axes is not None:
            break
    else:
        raise ValueError(f"no logical axes for parameter {'/'.join(names)} of shape {shape}")
    extra = len(shape) - len(axes)
    if extra == 1 and "layers" in names:
        return (LAYERS, *axes)
    if extra != 0:
        raise ValueError(f"parameter {'/'.join(names)} has shape {shape}, expected axes {axes}")
    return axes


def _mesh_size(mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def spec_for(logical: Sequence[str | None], shape, mesh, rules=None) -> P:
    """PartitionSpec from logical axes; a dimension its mesh axes do not divide is replicated, and
    a mesh axis is used at most once per array."""
    rules = RULES if rules is None else rules
    used: set[str] = set()
    out = []
    for name, size in zip(logical, shape):
        axes = rules.get(name) if name is not None else None
        flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
        flat = tuple(a for a in flat if mesh.shape[a] > 1)  # size-1 axes add nothing
        if not flat or used & set(flat) or size % _mesh_size(mesh, flat):
            out.append(None)
            continue
        used |= set(flat)
        out.append(flat[0] if len(flat) == 1 else flat)
    return P(*out)


def param_specs(tree, mesh, rules=None):
    """PartitionSpec for every leaf of a parameter tree (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: spec_for(logical_axes(path, x.shape), x.shape, mesh, rules), tree
    )


def opt_state_specs(optimizer, opt_state, specs):
    """Optimizer state specs: moments mirror their parameter's spec, everything else replicated."""
    return optax.tree_map_params(
        optimizer,
        lambda _, spec: spec,
        opt_state,
        specs,
        transform_non_params=lambda _: P(),
        is_leaf=lambda x: isinstance(x, P),
    )


def shardings(specs, mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_spec(ndim: int) -> P:
    """Batch arrays: leading dimension over ("data", "fsdp"), the rest replicated."""
    return P(RULES[BATCH], *([None] * (ndim - 1)))


def check_sharded(tree, mesh, min_bytes: int = 4 * 2**20, rules=None) -> list[str]:
    """Names of the leaves larger than `min_bytes` that the rules leave fully replicated.

    `tree` may hold ShapeDtypeStructs (from `jax.eval_shape`) and `mesh` may be an `AbstractMesh`,
    so pod-scale configurations are checked without allocating anything. Empty list = all good.
    """
    bad = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        nbytes = math.prod(x.shape) * np.dtype(x.dtype).itemsize
        if nbytes <= min_bytes:
            continue
        spec = spec_for(logical_axes(path, x.shape), x.shape, mesh, rules)
        if all(s is None for s in spec):
            bad.append(f"{'/'.join(_path_names(path))} {tuple(x.shape)} {x.dtype}")
    return bad


# ----------------------------------------------------------------------------- decoding


def parse_mesh(spec: str) -> dict[str, int]:
    """ "data:2,tensor:4" -> {"data": 2, "tensor": 4}; axes missing from the spec are 1."""
    out = {a: 1 for a in DECODE_AXES}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, size = part.partition(":")
        if name not in DECODE_AXES or not size.lstrip("-").isdigit():
            raise ValueError(
                f"mesh {spec!r}: expected comma-separated AXIS:SIZE with AXIS in {DECODE_AXES} "
                f"(e.g. data:2,tensor:4), got {part!r}"
            )
        out[name] = int(size)
    return out


def default_decode_mesh_shape(num_devices: int, nbytes: int, limit: int | None) -> dict:
    """Every device on "data" when `nbytes` (parameters, draft and KV cache) fit one device's
    `limit` (None: unknown, as on a CPU), else on "tensor"."""
    if limit is None or nbytes <= limit:
        return {"data": num_devices, "tensor": 1}
    return {"data": 1, "tensor": num_devices}


def decode_mesh(shape: str | Mapping[str, int], devices=None) -> Mesh:
    """A decoding mesh over ("data", "tensor") from a spec ("data:2,tensor:4") or sizes."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    named = parse_mesh(shape) if isinstance(shape, str) else dict(shape)
    if set(named) - set(DECODE_AXES):
        raise ValueError(f"decoding mesh axes are {DECODE_AXES}, got {tuple(named)}")
    sizes = [named.get(a, 1) for a in DECODE_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(DECODE_AXES, sizes))}")
    if -1 in sizes:
        rest = math.prod(s for s in sizes if s != -1)
        sizes[sizes.index(-1)] = devices.size // max(rest, 1)
    if math.prod(sizes) != devices.size or min(sizes) < 1:
        raise ValueError(
            f"mesh {dict(zip(DECODE_AXES, sizes))} has {math.prod(sizes)} devices, "
            f"but {devices.size} are available"
        )
    if jax.default_backend() == "tpu":
        grid = mesh_utils.create_device_mesh(sizes, list(devices), allow_split_physical_axes=True)
    else:
        grid = devices.reshape(sizes)
    return Mesh(grid, DECODE_AXES)


def decode_rules(num_heads: int, num_kv_heads: int, mesh) -> dict:
    """`DECODE_RULES` for a model: attention heads (q, k, v, o columns and the cache's kv heads)
    over "tensor" only when both head counts divide it, else replicated (the MLP and vocabulary
    stay split). A shard then holds whole query groups together with their kv head."""
    t = mesh.shape["tensor"] if "tensor" in mesh.axis_names else 1
    if num_heads % t or num_kv_heads % t:
        return {**DECODE_RULES, HEADS: None, KV_HEADS: None}
    return DECODE_RULES


def decode_param_specs(cfg, tree, mesh):
    """PartitionSpec of every target or draft leaf for decoding on `mesh` (`decode_rules`); the
    draft's projectors get their target layers' specs (same names, same logical axes)."""
    return param_specs(tree, mesh, decode_rules(cfg.num_heads, cfg.num_kv_heads, mesh))


def cache_spec(cfg, batch: int, mesh) -> P:
    """The KV cache k, v [L, B, S, K, D]: batch over "data", kv heads over "tensor"."""
    rules = decode_rules(cfg.num_heads, cfg.num_kv_heads, mesh)
    if "fsdp" in mesh.axis_names:  # decoding on a training mesh (self-distillation)
        rules = {**rules, BATCH: ("data", "fsdp")}
    shape = (cfg.num_layers, batch, 1, cfg.num_kv_heads, cfg.head_dim)
    return spec_for((LAYERS, BATCH, LENGTH, KV_HEADS, HEAD_DIM), shape, mesh, rules)


def tree_bytes_per_device(tree, specs, mesh) -> int:
    """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs) sharded by `specs`."""
    total = 0
    leaves = jax.tree.leaves(tree)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    for x, spec in zip(leaves, spec_leaves):
        n = math.prod(x.shape) * np.dtype(x.dtype).itemsize
        total += n // math.prod(_mesh_size(mesh, a) for a in spec)
    return total
