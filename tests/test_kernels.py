"""The Pallas masked-attention kernels against the jnp reference (interpret mode on CPU).

Covers every layout of `models/layouts.py` with random lengths and groups, GQA, head dims 64 and
128, float32 and bfloat16, both kernel variants (Mosaic/TPU and Triton/GPU, interpreted); gradients
on the training layout; the block-sparse map against `mask.block_visibility`; skipping against a
dense sweep; validation errors; lowering for real TPU and CUDA targets with `jax.export`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexdraft_jax.kernels import blocks as blocks_lib
from flexdraft_jax.kernels import pallas_attention
from flexdraft_jax.kernels.blocks import BlockSizes
from flexdraft_jax.kernels.mask import RowMeta, block_visibility
from flexdraft_jax.kernels.pallas_attention import attention
from flexdraft_jax.kernels.reference import GRAD_TOLERANCE as GRAD_TOL
from flexdraft_jax.kernels.reference import TOLERANCE as TOL
from flexdraft_jax.kernels.reference import attention_reference_jit as attention_reference
from flexdraft_jax.models import layouts

SMALL_TPU = BlockSizes(block_q=16, block_k=128)  # several query blocks, lane-aligned key blocks
SMALL_GPU = BlockSizes(block_q=16, block_k=16)


def make_case(kind, seed, *, batch=2, block=4, cache=None):
    """A layout with random lengths/groups. Returns (RowMeta, Sc): keys are [Sc clean ; Sm mask]."""
    rng = np.random.default_rng(seed)
    if kind == "causal":
        start = rng.integers(0, 20, batch)
        return layouts.causal(start, int(rng.integers(1, 6))).meta, cache or 32
    if kind == "prefill_block":
        rows = int(rng.integers(6, 14))
        lengths = rng.integers(1, rows + 1, batch)
        return layouts.prefill_block(lengths, rows, block).meta, rows
    if kind == "parallel":  # R candidate rows + g groups against a ragged cache
        cache = cache or 48
        g = int(rng.integers(1, block))
        rows = int(rng.integers(g, block + 1))
        start = rng.integers(0, cache - rows - g, batch)
        return layouts.parallel(start, rows, g, block).meta, cache
    if kind == "draft_pass":
        cache = cache or 40
        return layouts.draft_pass(rng.integers(0, cache, batch), block).meta, cache
    if kind == "training":
        seq = int(rng.integers(12, 24))
        anchors = np.sort(rng.integers(1, seq, (batch, int(rng.integers(2, 5)))), axis=1)
        return layouts.training(seq, anchors, block).meta, seq
    raise ValueError(kind)


def make_qkv(meta, num_clean, heads, kv_heads, head_dim, dtype, seed=0):
    b, t = meta.q_limit.shape
    s = num_clean + meta.num_mask_keys
    rng = np.random.default_rng(seed)
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dtype)  # noqa: E731
    return (
        draw(b, t, heads, head_dim),
        draw(b, s, kv_heads, head_dim),
        draw(b, s, kv_heads, head_dim),
    )


def max_err(a, b):
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


# kind, (N, K, D), dtype, backend, block sizes, extra (cache)
CASES = [
    ("causal", (9, 3, 64), jnp.float32, "tpu", None, {}),
    ("prefill_block", (8, 2, 128), jnp.float32, "tpu", SMALL_TPU, {}),
    ("parallel", (9, 3, 64), jnp.float32, "tpu", SMALL_TPU, {"cache": 200}),  # partial key block
    ("parallel", (8, 2, 128), jnp.bfloat16, "tpu", None, {}),
    ("draft_pass", (9, 3, 64), jnp.bfloat16, "tpu", SMALL_TPU, {}),
    ("training", (4, 4, 64), jnp.float32, "tpu", None, {}),
    ("parallel", (9, 3, 64), jnp.float32, "gpu", SMALL_GPU, {"cache": 70}),  # masked tail loads
    ("training", (8, 2, 128), jnp.bfloat16, "gpu", SMALL_GPU, {}),
    ("prefill_block", (9, 3, 64), jnp.float32, "gpu", None, {}),
    ("draft_pass", (8, 4, 128), jnp.float32, "gpu", SMALL_GPU, {}),
]


@pytest.mark.parametrize(
    "kind,heads,dtype,backend,sizes,extra",
    CASES,
    ids=[f"{c[0]}-{c[1][0]}x{c[1][1]}x{c[1][2]}-{jnp.dtype(c[2]).name}-{c[3]}" for c in CASES],
)
def test_layout_matches_reference(kind, heads, dtype, backend, sizes, extra):
    n, kh, d = heads
    meta, num_clean = make_case(kind, seed=hash((kind, n, d, backend)) % 1000, **extra)
    q, k, v = make_qkv(meta, num_clean, n, kh, d, dtype)
    out = attention(q, k, v, meta, block_sizes=sizes, backend=backend)
    ref = attention_reference(q, k, v, meta)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not bool(jnp.isnan(out).any())
    assert max_err(out, ref) <= TOL[jnp.dtype(dtype)]


def test_tpu_faithful_interpreter():
    """The Mosaic kernel under the TPU interpreter (simulated DMAs, scalar prefetch in SMEM, VMEM
    scratch), with a partial last key block and skipped blocks."""
    from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

    meta, num_clean = make_case("parallel", seed=7, cache=200)
    q, k, v = make_qkv(meta, num_clean, 9, 3, 64, jnp.float32)
    out = attention(
        q, k, v, meta, block_sizes=SMALL_TPU, backend="tpu", interpret=pltpu.InterpretParams()
    )
    assert max_err(out, attention_reference(q, k, v, meta)) <= TOL[jnp.dtype(jnp.float32)]


def test_rows_that_see_nothing_give_zero():
    """Rows with q_limit 0 and no group (and a group with no keys) give 0, not NaN."""
    t, sm = 6, 4
    meta = RowMeta(
        q_limit=jnp.array([[0, 3, 0, 5, 0, 0], [2, 0, 0, 0, 1, 0]], jnp.int32),
        q_group=jnp.array([[-1, -1, 0, -1, 7, -1], [-1, -1, 1, -1, -1, -1]], jnp.int32),
        k_group=jnp.array([[0, 0, 1, 1], [1, 1, 0, 0]], jnp.int32),
    )
    q, k, v = make_qkv(meta, 10, 4, 2, 64, jnp.float32)
    out = attention(q, k, v, meta)
    ref = attention_reference(q, k, v, meta)
    assert t == q.shape[1] and sm == meta.num_mask_keys
    assert not bool(jnp.isnan(out).any())
    assert float(jnp.abs(out[0, 0]).max()) == 0.0 and float(jnp.abs(out[0, 4]).max()) == 0.0
    assert max_err(out, ref) <= TOL[jnp.dtype(jnp.float32)]


def test_training_gradients_match_reference():
    meta, num_clean = make_case("training", seed=3)
    q, k, v = make_qkv(meta, num_clean, 8, 2, 64, jnp.float32)
    cot = jnp.asarray(np.random.default_rng(9).standard_normal(q.shape, np.float32))

    def loss(fn):
        return lambda q_, k_, v_: jnp.sum(fn(q_, k_, v_, meta) * cot)

    kernel = jax.jit(jax.grad(loss(attention), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.grad(loss(attention_reference), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(kernel, ref):
        assert max_err(got, want) <= GRAD_TOL[jnp.dtype(jnp.float32)]


def _folded_meta(meta, num_clean, g, tiling):
    """The kernel's folded, padded RowMeta, so `block_visibility` can score the kernel's map."""
    q_limit, q_group = blocks_lib.fold_rows(meta, g, tiling)
    k_groups = blocks_lib.key_groups(meta, num_clean, tiling)
    return RowMeta(q_limit, q_group, k_groups[:, num_clean:]), (q_limit, q_group, k_groups)


@pytest.mark.parametrize("kind", ["causal", "prefill_block", "parallel", "draft_pass", "training"])
@pytest.mark.parametrize("g", [1, 3])
def test_block_map_equals_block_visibility(kind, g):
    """The on-device block map equals `block_visibility` of the folded metadata (exact, not just
    conservative, on every layout), `fetch` names a visible block, GPU ranges cover every visible
    block once."""
    meta, num_clean = make_case(kind, seed=11, batch=3, cache=300)
    s = num_clean + meta.num_mask_keys
    for backend, sizes in (("tpu", BlockSizes(16, 128)), ("gpu", BlockSizes(16, 16))):
        tiling = blocks_lib.choose_tiling(backend, g * meta.q_limit.shape[1], s, sizes, jnp.float32)
        folded, (q_limit, q_group, k_groups) = _folded_meta(meta, num_clean, g, tiling)
        bm = jax.jit(blocks_lib.block_meta, static_argnums=(3, 4))(
            q_limit, q_group, k_groups, num_clean, tiling
        )
        want = block_visibility(folded, num_clean, tiling.block_q, tiling.block_k)
        np.testing.assert_array_equal(np.asarray(bm.visible, bool), want)
        vis, fetch, rng = (np.asarray(x) for x in bm)
        j = np.arange(tiling.num_k_blocks)
        assert (fetch[vis == 1] == np.broadcast_to(j, vis.shape)[vis == 1]).all()
        if vis.any():
            rows_with_any = vis.any(axis=2)
            assert vis[np.arange(vis.shape[0])[:, None], np.arange(vis.shape[1]), fetch[..., 0]][
                rows_with_any
            ].all()
        covered = np.zeros_like(vis)
        for bi, qi in np.ndindex(vis.shape[:2]):
            _, c_hi, m_lo, m_hi = rng[bi, qi]
            covered[bi, qi, :c_hi] += 1
            covered[bi, qi, m_lo:m_hi] += 1
        assert (covered <= 1).all() and (covered[vis == 1] == 1).all()


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_skipping_matches_dense_sweep(backend, monkeypatch):
    """A decode step against a long cache skips most key blocks; visiting all of them (every block
    marked visible) gives the same output."""
    num_clean = 512
    meta = layouts.parallel(np.array([37, 90]), 4, 3, 8).meta  # keys past ~100 are unused cache
    q, k, v = make_qkv(meta, num_clean, 9, 3, 64, jnp.float32)
    sizes = SMALL_TPU if backend == "tpu" else BlockSizes(16, 64)
    tiling = blocks_lib.choose_tiling(backend, 3 * 28, num_clean + 24, sizes, jnp.float32)
    _, rows = _folded_meta(meta, num_clean, 3, tiling)
    visible = blocks_lib.block_meta(*rows, num_clean, tiling).visible
    assert float(visible.mean()) < 0.5  # most tiles are skipped

    fwd = lambda: jax.jit(  # noqa: E731 (a fresh function: traced anew, after the patch too)
        lambda *a: pallas_attention._forward(*a, 64**-0.5, sizes, True, backend)
    )(q, k, v, meta)
    sparse = fwd()
    real_block_meta = blocks_lib.block_meta

    def dense(q_limit, q_group, k_groups, num_clean, tiling):
        bm = real_block_meta(q_limit, q_group, k_groups, num_clean, tiling)
        nk = tiling.num_k_blocks
        ranges = bm.ranges.at[..., 1].set(nk).at[..., 2:].set(nk)
        j = jnp.broadcast_to(jnp.arange(nk, dtype=jnp.int32), bm.visible.shape)
        return blocks_lib.BlockMeta(jnp.ones_like(bm.visible), j, ranges)

    monkeypatch.setattr(blocks_lib, "block_meta", dense)
    full = fwd()
    assert max_err(sparse, full) == 0.0
    assert max_err(sparse, attention_reference(q, k, v, meta)) <= TOL[jnp.dtype(jnp.float32)]


def test_validation_errors():
    meta, num_clean = make_case("parallel", seed=1)
    q, k, v = make_qkv(meta, num_clean, 9, 3, 64, jnp.float32)
    with pytest.raises(ValueError, match="N=9 must be a multiple of kv heads K=2"):
        attention(q, k[:, :, :2], v[:, :, :2], meta)
    with pytest.raises(ValueError, match=r"k and v must have the same shape"):
        attention(q, k, v[:, :-1], meta)
    with pytest.raises(ValueError, match=r"D 64 vs 32"):
        attention(q, k[..., :32], v[..., :32], meta)
    with pytest.raises(ValueError, match=r"k and v must share a dtype, got k float32 v bfloat16"):
        attention(q, k, v.astype(jnp.bfloat16), meta)
    with pytest.raises(ValueError, match="q dtype must be float32, bfloat16 or float16, got int32"):
        attention(q.astype(jnp.int32), k, v, meta)
    with pytest.raises(ValueError, match=r"meta.q_limit must have shape \[B, T\]"):
        attention(q, k, v, meta._replace(q_limit=meta.q_limit[:, :-1]))
    with pytest.raises(ValueError, match=r"Sm <= S="):
        attention(q[:, :, :, :], k[:, :3], v[:, :3], meta)
    with pytest.raises(ValueError, match="expected q"):
        attention(q[0], k, v, meta)
    with pytest.raises(ValueError, match="block_q must be a positive multiple of 8, got 12"):
        BlockSizes(block_q=12)
    with pytest.raises(ValueError, match="TPU block_k must be a multiple of 128, got 64"):
        attention(q, k, v, meta, block_sizes=BlockSizes(16, 64), backend="tpu")
    with pytest.raises(ValueError, match="power of two >= 16, got 24"):
        attention(q, k, v, meta, block_sizes=BlockSizes(24, 16), backend="gpu")
    with pytest.raises(ValueError, match="backend must be 'tpu' or 'gpu', got 'metal'"):
        attention(q, k, v, meta, backend="metal")
    with pytest.raises(dataclasses.FrozenInstanceError):
        BlockSizes().block_q = 8


# SmolLM2-135M (9 heads / 3 kv heads, D 64, block 8, cache 1024) and a Llama-3-8B-like model.
EXPORT_SHAPES = {"smollm2": (9, 3, 64, 1024), "llama8b": (32, 8, 128, 2048)}


@pytest.mark.parametrize("model", sorted(EXPORT_SHAPES))
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_lowers_for_accelerators(platform, model):
    """Lower the real (non-interpreted) kernels for TPU (Mosaic) and CUDA (Triton) from CPU: this
    applies Pallas's block-shape rules (e.g. TPU's (8, 128)) and each backend's lowering rules."""
    n, kh, d, cache = EXPORT_SHAPES[model]
    b, block, rows, groups = 2, 8, 8, 8
    meta = layouts.parallel(jnp.zeros((b,), jnp.int32), rows, groups, block).meta
    t, s = rows + groups * block, cache + groups * block
    spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
    backend = "tpu" if platform == "tpu" else "gpu"
    fn = lambda q, k, v, m: attention(q, k, v, m, backend=backend, interpret=False)  # noqa: E731
    exported = jax.export.export(
        jax.jit(fn),
        platforms=[platform],
        # Triton calls carry no serialization-compatibility guarantee; we only need the lowering.
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(
        spec((b, t, n, d), jnp.bfloat16),
        spec((b, s, kh, d), jnp.bfloat16),
        spec((b, s, kh, d), jnp.bfloat16),
        jax.tree.map(lambda x: spec(x.shape, jnp.int32), meta),
    )
    text = exported.mlir_module()
    assert ("tpu_custom_call" if platform == "tpu" else "xla.gpu.triton") in text
