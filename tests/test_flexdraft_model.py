"""FlexDraft model: the dual-path forward keeps the target exact, groups are independent, every
layout's mask is the documented grid, and release-format draft checkpoints round-trip.

Tiny llama-, qwen2- (q/k/v biases) and qwen3-style (q/k norm, tied embeddings) models with block
sizes 4 and 8, random target and random draft parameters (never the identity initialisation, so a
clean row that leaked into the draft path would show). One jitted `forward` is shared by every test
so each shape compiles once.
"""

from __future__ import annotations

import functools
import json
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from flexdraft_jax.checkpoints import release
from flexdraft_jax.kernels.mask import dense_mask
from flexdraft_jax.models import layouts
from flexdraft_jax.models import transformer as T
from flexdraft_jax.models.config import DraftConfig, ModelConfig

# Tolerances, float32. Clean rows must match the plain target to a few ulps (O(1) logits); a mask
# group compared across programs of different shapes (other group counts, the sequential draft
# pass) may differ by the reassociation of its reductions.
CLEAN_TOL = 1e-6  # clean rows and caches vs the plain target; a group vs itself in the same program
SHAPE_TOL = 1e-5  # a group across group counts
SEQ_TOL = 1e-5  # a parallel group vs the sequential draft pass

_BASE = dict(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4,
    num_kv_heads=2, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-6,
)  # fmt: skip
ARCHS = {
    "llama": ModelConfig(arch="llama", **_BASE),
    "qwen2": ModelConfig(arch="qwen2", attention_bias=True, **_BASE),
    "qwen3": ModelConfig(
        arch="qwen3", qk_norm=True, tie_word_embeddings=True, **{**_BASE, "head_dim": 16}
    ),
}
DEPTH = 2
BLOCK_SIZES = (4, 8)
PROMPT = 7  # prompt rows; the second sequence has length PROMPT - 2 (padded rows after it)

# Compiling is what these tiny models cost; XLA's backend optimisation and CPU fusion emitters
# quadruple it. Every program compared in a test is compiled with the same options.
_JIT_OPTS = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
_forward = jax.jit(
    T.forward,
    static_argnums=0,
    static_argnames=("dcfg",),
    compiler_options=_JIT_OPTS,
)
_draft_logits = jax.jit(T.draft_logits, static_argnums=0, compiler_options=_JIT_OPTS)


def _fill(shapes, rng, rule) -> dict:
    """A tree of float32 numpy arrays shaped like `shapes`, leaf values from rule(name, shape)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    return jax.tree.unflatten(
        treedef,
        [rule(jax.tree_util.keystr(p), x.shape).astype(np.float32) for p, x in leaves],
    )


def random_target(cfg: ModelConfig, seed: int) -> dict:
    """Target parameters in init_target's tree: non-trivial norms and biases, logits of std ~0.4
    (tied or not) so that CLEAN_TOL is a few float32 ulps of the largest logit."""
    rng = np.random.default_rng(seed)
    n = rng.standard_normal

    def rule(name, shape):
        if "embedding" in name or "lm_head" in name:
            return 0.4 * n(shape) / np.sqrt(cfg.hidden_size)
        if "scale" in name:
            return 1 + 0.2 * n(shape)
        if "bias" in name:
            return 0.2 * n(shape)
        return n(shape) / np.sqrt(shape[-2])  # kernels [L, in, out]

    return _fill(jax.eval_shape(lambda: T.init_target(cfg, jax.random.key(0))), rng, rule)


def random_draft(cfg: ModelConfig, dcfg: DraftConfig, target: dict, seed: int) -> dict:
    """init_draft's tree: the target's deep projectors perturbed, a random mask embedding and a
    random nonzero calibration MLP (never the identity start, so leaks would show)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda t: T.init_draft(cfg, dcfg, t, jax.random.key(0)), target)
    s = dcfg.split(cfg)
    layers = jax.tree.map(
        lambda x: (x[s:] + 0.1 * rng.standard_normal(x[s:].shape)).astype(np.float32),
        target["layers"]["attn"],
    )
    assert jax.tree.structure(layers) == jax.tree.structure(shapes["layers"])
    return {
        "mask_embedding": rng.standard_normal(cfg.hidden_size).astype(np.float32),
        "layers": layers,
        "calibration": _fill(
            shapes["calibration"], rng, lambda _, shape: 0.1 * rng.standard_normal(shape)
        ),
    }


class Model(NamedTuple):
    cfg: ModelConfig
    dcfg: DraftConfig
    target: dict
    draft: dict
    prompt: np.ndarray  # int32[B, PROMPT], padded past `lengths`
    lengths: np.ndarray  # int32[B]
    cand: np.ndarray  # int32[B, W] candidate block C = [x0, d1 .. d(W-1)]
    capacity: int


def run(m: Model, tokens, lay: layouts.Layout, cache=None, *, flex=True):
    """(clean logits, mask hidden, cache) of one forward; `flex=False` is the plain target."""
    return _forward(
        m.cfg,
        m.target,
        tokens,
        lay.positions,
        lay.meta,
        cache,
        draft=m.draft if flex else None,
        dcfg=m.dcfg if flex else None,
        mask_positions=lay.mask_positions if flex else None,
    )


def plain_prefill(m: Model):
    """Plain causal prefill of the (padded) prompts; cache lengths set to the prompt lengths."""
    lay = layouts.causal(np.zeros_like(m.lengths), PROMPT)
    logits, _, cache = run(m, m.prompt, lay, T.init_cache(m.cfg, 2, m.capacity), flex=False)
    return logits, cache._replace(lengths=m.lengths)


def maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def cache_tol(ref) -> float:
    """CLEAN_TOL relative to the largest cached value (keys after RoPE and q/k norm reach ~4)."""
    return CLEAN_TOL * max(1.0, float(np.max(np.abs(np.asarray(ref)))))


def groups(hidden, w):
    """[B, G*W, H] -> [B, G, W, H]."""
    return hidden.reshape(hidden.shape[0], -1, w, hidden.shape[-1])


def make_model(arch: str, w: int) -> Model:
    cfg = ARCHS[arch]
    dcfg = DraftConfig(depth=DEPTH, block_size=w, calib_rank=16)
    seed = 10 * list(ARCHS).index(arch) + w
    target = random_target(cfg, seed)
    draft = random_draft(cfg, dcfg, target, seed + 1)
    toks = np.random.default_rng(seed + 2).integers(0, cfg.vocab_size, (2, PROMPT + w), np.int32)
    lengths = np.array([PROMPT, PROMPT - 2], np.int32)
    return Model(
        cfg,
        dcfg,
        target,
        draft,
        toks[:, :PROMPT],
        lengths,
        toks[:, PROMPT:],
        capacity=PROMPT + w + 1,
    )


@pytest.fixture(
    scope="module",
    params=[(a, w) for a in ARCHS for w in BLOCK_SIZES],
    ids=[f"{a}-W{w}" for a in ARCHS for w in BLOCK_SIZES],
)
def model(request) -> Model:
    return make_model(*request.param)


@pytest.fixture(scope="module", params=list(ARCHS))
def model_w4(request) -> Model:
    """Block size 4 only: for the gradient programs, the costliest to compile."""
    return make_model(request.param, 4)


# ----------------------------------------------------------------------------- (a, b) exactness


def test_prefill_block_clean_rows_and_cache_equal_target(model):
    m = model
    ref_logits, ref_cache = plain_prefill(m)
    lay = layouts.prefill_block(m.lengths, PROMPT, m.dcfg.block_size)
    logits, hidden, cache = run(m, m.prompt, lay, T.init_cache(m.cfg, 2, m.capacity))
    assert hidden.shape == (2, m.dcfg.block_size, m.cfg.hidden_size)
    assert maxdiff(logits, ref_logits) <= CLEAN_TOL
    # The cache holds the plain model's clean rows: no mask row was written anywhere.
    assert maxdiff(cache.k, ref_cache.k) <= cache_tol(ref_cache.k)
    assert maxdiff(cache.v, ref_cache.v) <= cache_tol(ref_cache.v)
    assert not np.any(np.asarray(cache.k[:, :, PROMPT:]))  # slots past the prompt untouched


@pytest.mark.parametrize("rows,num_groups", [("W", "W"), ("W", 1), (2, 2)])
def test_parallel_clean_rows_and_cache_equal_target(model, rows, num_groups):
    m = model
    w = m.dcfg.block_size
    rows = w if rows == "W" else rows
    num_groups = w if num_groups == "W" else num_groups
    _, cache0 = plain_prefill(m)
    ref_logits, _, ref_cache = run(m, m.cand, layouts.causal(m.lengths, w), cache0, flex=False)
    lay = layouts.parallel(m.lengths, rows, num_groups, w)
    logits, hidden, cache = run(m, m.cand[:, :rows], lay, cache0)
    assert hidden.shape == (2, num_groups * w, m.cfg.hidden_size)
    assert maxdiff(logits, ref_logits[:, :rows]) <= CLEAN_TOL
    # Slots start .. start+rows-1 hold the plain verify's rows, every other slot is unchanged.
    slot = np.arange(m.capacity)[None, :]
    written = (slot >= m.lengths[:, None]) & (slot < m.lengths[:, None] + rows)
    written = written[None, :, :, None, None]  # [L, B, S, K, D]
    for got, ref, before in ((cache.k, ref_cache.k, cache0.k), (cache.v, ref_cache.v, cache0.v)):
        got, ref, before = np.asarray(got), np.asarray(ref), np.asarray(before)
        assert maxdiff(np.where(written, got, ref), ref) <= cache_tol(ref)
        assert maxdiff(np.where(written, before, got), before) == 0.0


def _training_case(m: Model):
    seq = PROMPT + m.dcfg.block_size
    tokens = np.concatenate([m.prompt, m.cand], axis=1)
    anchors = np.array([[0, 3, seq - 1], [2, 5, seq - 3]], np.int32)  # blocks may run past the end
    return tokens, layouts.training(seq, anchors, m.dcfg.block_size)


def test_training_clean_rows_equal_target(model):
    m = model
    tokens, lay = _training_case(m)
    plain = layouts.causal(np.zeros((2,), np.int32), tokens.shape[1])
    ref_logits, _, _ = run(m, tokens, plain, flex=False)
    logits, hidden, _ = run(m, tokens, lay)
    assert hidden.shape == (2, 3 * m.dcfg.block_size, m.cfg.hidden_size)
    assert maxdiff(logits, ref_logits) <= CLEAN_TOL


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=_JIT_OPTS)
def _vjp_clean_and_mask(cfg, dcfg, target, draft, tokens, lay, cache, w_clean, w_mask):
    """Gradients w.r.t. the draft of <w_clean, clean logits> and of <w_mask, mask hidden>."""

    def f(d):
        logits, hidden, _ = T.forward(
            cfg,
            target,
            tokens,
            lay.positions,
            lay.meta,
            cache,
            draft=d,
            dcfg=dcfg,
            mask_positions=lay.mask_positions,
        )
        return logits, hidden

    (logits, hidden), vjp = jax.vjp(f, draft)
    (g_clean,) = vjp((w_clean, jnp.zeros_like(hidden)))
    (g_mask,) = vjp((jnp.zeros_like(logits), w_mask))
    return g_clean, g_mask


@pytest.mark.parametrize("layout", ["prefill_block", "parallel", "training"])
def test_clean_logits_have_zero_gradient_wrt_draft(model_w4, layout):
    m = model_w4
    w = m.dcfg.block_size
    if layout == "prefill_block":
        tokens, lay = m.prompt, layouts.prefill_block(m.lengths, PROMPT, w)
        cache = T.init_cache(m.cfg, 2, m.capacity)
    elif layout == "parallel":
        tokens, lay, cache = m.cand, layouts.parallel(m.lengths, w, w, w), plain_prefill(m)[1]
    else:
        (tokens, lay), cache = _training_case(m), None
    tc, tm = tokens.shape[1], lay.mask_positions.shape[1]
    rng = np.random.default_rng(7)
    w_clean = rng.standard_normal((2, tc, m.cfg.vocab_size)).astype(np.float32)
    w_mask = rng.standard_normal((2, tm, m.cfg.hidden_size)).astype(np.float32)
    g_clean, g_mask = _vjp_clean_and_mask(
        m.cfg, m.dcfg, m.target, m.draft, tokens, lay, cache, w_clean, w_mask
    )
    for path, g in jax.tree_util.tree_flatten_with_path(g_clean)[0]:
        where = jax.tree_util.keystr(path)
        assert np.all(np.asarray(g) == 0.0), f"clean logits depend on draft{where}"
    # ...while the mask rows do depend on every draft projector and the mask embedding.
    assert np.any(np.asarray(g_mask["mask_embedding"]) != 0)
    for path, g in jax.tree_util.tree_flatten_with_path(g_mask["layers"])[0]:
        assert np.any(np.asarray(g) != 0), f"mask rows ignore draft{jax.tree_util.keystr(path)}"


# ----------------------------------------------------------------------------- (c) group isolation


def test_group_unaffected_by_later_candidates_and_other_groups(model):
    m = model
    w = m.dcfg.block_size
    _, cache0 = plain_prefill(m)
    _, full, _ = run(m, m.cand, layouts.parallel(m.lengths, w, w, w), cache0)
    full = groups(np.asarray(full), w)
    # Different candidate tokens after C[0..keep]: groups 0..keep are unchanged, later ones move.
    keep = w // 2 - 1
    other = (m.cand + 1 + np.arange(w)) % m.cfg.vocab_size
    altered = np.where(np.arange(w) > keep, other, m.cand).astype(np.int32)
    _, alt, _ = run(m, altered, layouts.parallel(m.lengths, w, w, w), cache0)
    alt = groups(np.asarray(alt), w)
    assert maxdiff(alt[:, : keep + 1], full[:, : keep + 1]) <= CLEAN_TOL
    assert maxdiff(alt[:, keep + 1 :], full[:, keep + 1 :]) > 1e-3
    # Fewer groups (and fewer candidate rows): the remaining groups are unchanged.
    _, one, _ = run(m, m.cand, layouts.parallel(m.lengths, w, 1, w), cache0)
    assert maxdiff(one, full[:, 0]) <= SHAPE_TOL
    _, two, _ = run(m, m.cand[:, :2], layouts.parallel(m.lengths, 2, 2, w), cache0)
    assert maxdiff(groups(np.asarray(two), w), full[:, :2]) <= SHAPE_TOL


def test_parallel_group_equals_sequential_draft_pass(model):
    """Group k of the parallel pass == the draft pass after committing C[0..k] (DESIGN §2.3)."""
    m = model
    w = m.dcfg.block_size
    _, cache0 = plain_prefill(m)
    _, par, _ = run(m, m.cand, layouts.parallel(m.lengths, w, w, w), cache0)
    par = groups(np.asarray(par), w)
    # Verify pass over all W candidates; committing C[0..k] is then a length update (rollback).
    _, _, verified = run(m, m.cand, layouts.causal(m.lengths, w), cache0, flex=False)
    bonus = np.array([1, m.cfg.vocab_size - 1], np.int32)
    no_rows = np.zeros((2, 0), np.int32)
    for k in range(w):
        committed = verified._replace(lengths=m.lengths + k + 1)
        _, seq, after = run(m, no_rows, layouts.draft_pass(committed.lengths, w), committed)
        assert maxdiff(seq, par[:, k]) <= SEQ_TOL, k
        d_seq = _draft_logits(m.cfg, m.target, m.draft, seq, bonus)
        d_par = _draft_logits(m.cfg, m.target, m.draft, par[:, k], bonus)
        assert maxdiff(d_seq, d_par) <= SEQ_TOL, k
        assert maxdiff(after.k, committed.k) == 0.0  # a draft pass writes nothing
    # The same with a verify pass over exactly C[0..1] (nothing stale past the committed length).
    _, _, verified = run(m, m.cand[:, :2], layouts.causal(m.lengths, 2), cache0, flex=False)
    committed = verified._replace(lengths=m.lengths + 2)
    _, seq, _ = run(m, no_rows, layouts.draft_pass(committed.lengths, w), committed)
    assert maxdiff(seq, par[:, 1]) <= SEQ_TOL


def test_prefill_block_equals_draft_pass_after_prefill(model):
    m = model
    w = m.dcfg.block_size
    lay = layouts.prefill_block(m.lengths, PROMPT, w)
    _, block, _ = run(m, m.prompt, lay, T.init_cache(m.cfg, 2, m.capacity))
    _, cache = plain_prefill(m)
    _, seq, _ = run(m, np.zeros((2, 0), np.int32), layouts.draft_pass(m.lengths, w), cache)
    assert maxdiff(seq, block) <= SEQ_TOL


# ----------------------------------------------------------------------------- (d) literal grids


def _grid(*rows: str) -> np.ndarray:
    """'x' = visible, '.' = hidden, '|' separates clean slots from mask keys (ignored)."""
    return np.array([[c == "x" for c in r if c != "|"] for r in rows])[None]


CACHE = 6  # cache capacity for the grid cases; 3 context slots, block size 2
GRIDS = {
    "causal": (
        layouts.causal(jnp.array([3]), 2), CACHE, [[3, 4]], [[]],
        _grid("xxxx..",
              "xxxxx."),
    ),
    "prefill_block": (
        layouts.prefill_block(jnp.array([3]), 3, 2), CACHE, [[0, 1, 2]], [[3, 4]],
        _grid("x.....|..",
              "xx....|..",
              "xxx...|..",
              "xxx...|xx",  # slot 0 at position 3: sees the prompt 0..2 and its block
              "xxx...|xx"),
    ),
    "parallel": (
        layouts.parallel(jnp.array([3]), 2, 2, 2), CACHE, [[3, 4]], [[4, 5, 5, 6]],
        _grid("xxxx..|....",  # x0 at slot 3
              "xxxxx.|....",  # d1 at slot 4
              "xxxx..|xx..",  # group 0: 0 drafts accepted, anchored at 4, sees x0
              "xxxx..|xx..",
              "xxxxx.|..xx",  # group 1: d1 accepted, anchored at 5, sees x0 d1
              "xxxxx.|..xx"),
    ),
    "draft_pass": (
        layouts.draft_pass(jnp.array([3]), 2), CACHE, [[]], [[3, 4]],
        _grid("xxx...|xx",
              "xxx...|xx"),
    ),
    "training": (
        layouts.training(4, jnp.array([[1, 2]]), 2), 4, [[0, 1, 2, 3]], [[1, 2, 2, 3]],
        _grid("x...|....",
              "xx..|....",
              "xxx.|....",
              "xxxx|....",
              "x...|xx..",  # block anchored at 1
              "x...|xx..",
              "xx..|..xx",  # block anchored at 2: blocks never see each other
              "xx..|..xx"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(GRIDS))
def test_layout_mask_is_the_literal_grid(name):
    lay, num_clean, positions, mask_positions, want = GRIDS[name]
    np.testing.assert_array_equal(np.asarray(lay.positions), np.array(positions).reshape(1, -1))
    np.testing.assert_array_equal(
        np.asarray(lay.mask_positions), np.array(mask_positions).reshape(1, -1)
    )
    np.testing.assert_array_equal(np.asarray(dense_mask(lay.meta, num_clean)), want)


# ----------------------------------------------------------------------------- (e) checkpoints


def _release_by_hand(
    path,
    cfg: ModelConfig,
    w: int,
    rank: int,
    *,
    key="flexdraft_config",
    layer_ids=None,
    extra=True,
    drop=(),
) -> dict:
    """Write a release-format draft with random weights, straight in the release's naming.

    Returns the draft tree load_release must produce (transposed from torch layout)."""
    rng = np.random.default_rng(0)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)
    h, v, hd, d = cfg.hidden_size, cfg.vocab_size, cfg.head_dim, DEPTH
    nq, nk = cfg.num_heads * hd, cfg.num_kv_heads * hd
    t, layers = {}, []
    for i in range(d):
        pre = f"layers.{i}.self_attn."
        attn = {}
        for p, (o, n) in {
            "q_proj": (nq, h),
            "k_proj": (nk, h),
            "v_proj": (nk, h),
            "o_proj": (h, nq),
        }.items():
            t[pre + p + ".weight"] = r(o, n)
            attn[p] = {"kernel": t[pre + p + ".weight"].T}
            if cfg.attention_bias and p != "o_proj":
                t[pre + p + ".bias"] = attn[p]["bias"] = r(o)
        if cfg.qk_norm:
            for n in ("q_norm", "k_norm"):
                t[pre + n + ".weight"] = r(hd)
                attn[n] = {"scale": t[pre + n + ".weight"]}
        if extra:  # what the release also stores and we ignore
            t[f"layers.{i}.mlp.gate_proj.weight"] = r(cfg.intermediate_size, h)
            t[f"layers.{i}.input_layernorm.weight"] = r(h)
            t[f"layers.{i}.post_attention_layernorm.weight"] = r(h)
        layers.append(attn)
    if extra:
        t["norm.weight"] = r(h)
    t["mask_embedding"] = r(h)
    t["anchor_bias_mlp.0.weight"], t["anchor_bias_mlp.0.bias"] = r(rank, 2 * h), r(rank)
    t["anchor_bias_mlp.2.weight"], t["anchor_bias_mlp.2.bias"] = r(v, rank), r(v)
    for name in drop:
        del t[name]
    os.makedirs(path, exist_ok=True)
    save_file(t, os.path.join(path, "model.safetensors"))
    ids = list(range(cfg.num_layers - d, cfg.num_layers)) if layer_ids is None else layer_ids
    conf = {
        "model_type": "qwen3",
        "num_hidden_layers": d,
        "block_size": w,
        key: {
            "target_layer_ids": ids,
            "block_size": w,
            "enable_anchor_bias_logits": True,
            "anchor_bias_rank": rank,
        },
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(conf, f)
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    return {
        "mask_embedding": t["mask_embedding"],
        "layers": stacked,
        "calibration": {
            "fc1": {"kernel": t["anchor_bias_mlp.0.weight"].T, "bias": t["anchor_bias_mlp.0.bias"]},
            "fc2": {"kernel": t["anchor_bias_mlp.2.weight"].T, "bias": t["anchor_bias_mlp.2.bias"]},
        },
    }


def _assert_trees_equal(got, want, **tol):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        assert a.shape == b.shape, jax.tree_util.keystr(path)
        if tol:
            np.testing.assert_allclose(a, b, err_msg=jax.tree_util.keystr(path), **tol)
        else:
            np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("key", ["flexdraft_config", "dflash_config"])
def test_release_checkpoint_loads(tmp_path, arch, key):
    cfg = ARCHS[arch]
    want = _release_by_hand(tmp_path, cfg, w=8, rank=12, key=key)
    dcfg, draft = release.load_release(str(tmp_path), cfg)
    assert dcfg == DraftConfig(depth=DEPTH, block_size=8, calib_rank=12, use_calibration=True)
    _assert_trees_equal(draft, want)
    # Same tree and shapes as the model's own draft parameters, so it plugs into `forward`.
    ref = jax.eval_shape(
        lambda: T.init_draft(cfg, dcfg, T.init_target(cfg, jax.random.key(0)), jax.random.key(1))
    )
    assert jax.tree.structure(ref) == jax.tree.structure(draft)
    assert [x.shape for x in jax.tree.leaves(ref)] == [x.shape for x in jax.tree.leaves(draft)]
    # The weights file itself is accepted too (config.json beside it).
    _, again = release.load_release(str(tmp_path / "model.safetensors"), cfg)
    _assert_trees_equal(again, want)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_release_export_import_round_trip(tmp_path, arch):
    cfg = ARCHS[arch]
    dcfg = DraftConfig(depth=DEPTH, block_size=4, calib_rank=16)
    draft = random_draft(cfg, dcfg, random_target(cfg, 1), 2)
    out = release.save_release(str(tmp_path / "f32"), cfg, dcfg, draft)
    dcfg2, back = release.load_release(out, cfg)
    assert dcfg2 == dcfg
    _assert_trees_equal(back, draft)  # float32: exact
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["flexdraft_config"]["target_layer_ids"] == [2, 3]

    out = release.save_release(str(tmp_path / "bf16"), cfg, dcfg, draft, dtype="bfloat16")
    with safe_open(os.path.join(out, "model.safetensors"), framework="numpy") as f:
        assert f.get_tensor("mask_embedding").dtype == ml_dtypes.bfloat16
    _, back = release.load_release(out, cfg)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(back))
    rounded = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), draft)
    _assert_trees_equal(back, rounded)  # exactly the bf16 values
    _assert_trees_equal(back, draft, rtol=2**-8, atol=0)  # i.e. within bf16 precision


def test_release_without_calibration(tmp_path):
    cfg = ARCHS["llama"]
    dcfg = DraftConfig(depth=1, block_size=4, calib_rank=8, use_calibration=False)
    draft = random_draft(cfg, dcfg, random_target(cfg, 1), 2)
    out = release.save_release(str(tmp_path / "d"), cfg, dcfg, draft)
    with safe_open(os.path.join(out, "model.safetensors"), framework="numpy") as f:
        assert not [k for k in f.keys() if k.startswith("anchor_bias_mlp")]
    dcfg2, back = release.load_release(out, cfg)
    assert dcfg2 == dcfg
    assert not any(np.any(x) for x in jax.tree.leaves(back["calibration"]))  # an exact no-op
    _assert_trees_equal(back["layers"], draft["layers"])


@pytest.mark.parametrize("ids", [[1, 2], [2, 4], [3, 2], [0, 1]])
def test_release_rejects_non_final_target_layers(tmp_path, ids):
    cfg = ARCHS["qwen3"]
    _release_by_hand(tmp_path, cfg, w=4, rank=8, layer_ids=ids)
    with pytest.raises(ValueError, match=rf"target_layer_ids \[{ids[0]}, {ids[1]}\].*\[2, 3\]"):
        release.load_release(str(tmp_path), cfg)


def test_release_rejects_shape_mismatch_and_missing_pieces(tmp_path):
    cfg = ARCHS["qwen2"]
    _release_by_hand(tmp_path / "ok", cfg, w=4, rank=8)
    with pytest.raises(ValueError, match=r"q_proj.weight.*shape \(32, 32\).*\(32, 48\)"):
        release.load_release(str(tmp_path / "ok"), cfg.replace(hidden_size=48))
    with pytest.raises(ValueError, match=r"anchor_bias_mlp.2.weight.*\(96, 8\).*\(95, 8\)"):
        release.load_release(str(tmp_path / "ok"), cfg.replace(vocab_size=95))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        release.load_release(str(tmp_path / "nope"), cfg)
    _release_by_hand(tmp_path / "miss", cfg, w=4, rank=8, drop=["layers.1.self_attn.v_proj.bias"])
    with pytest.raises(KeyError, match=r"layers\.1\.self_attn\.v_proj\.bias"):
        release.load_release(str(tmp_path / "miss"), cfg)
    os.remove(tmp_path / "ok" / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        release.load_release(str(tmp_path / "ok"), cfg)
    _release_by_hand(tmp_path / "q3", ARCHS["qwen3"].replace(head_dim=8), w=4, rank=8)
    with pytest.raises(ValueError, match="q_norm"):  # a Qwen3 drafter for a llama target
        release.load_release(str(tmp_path / "q3"), ARCHS["llama"])


def test_save_release_is_atomic(tmp_path, monkeypatch):
    cfg = ARCHS["llama"]
    dcfg = DraftConfig(depth=DEPTH, block_size=4, calib_rank=8)
    draft = random_draft(cfg, dcfg, random_target(cfg, 1), 2)

    def broken_save(tensors, fname, metadata=None):
        with open(fname, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(release, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        release.save_release(str(tmp_path / "new"), cfg, dcfg, draft)
    assert os.listdir(tmp_path) == []  # no checkpoint, no temporary directory
    monkeypatch.undo()

    out = release.save_release(str(tmp_path / "ckpt"), cfg, dcfg, draft)
    monkeypatch.setattr(release, "save_file", broken_save)
    changed = {**draft, "mask_embedding": draft["mask_embedding"] + 1}
    with pytest.raises(OSError, match="disk full"):
        release.save_release(out, cfg, dcfg, changed)
    assert os.listdir(tmp_path) == ["ckpt"]
    _, back = release.load_release(out, cfg)  # the previous checkpoint is intact
    _assert_trees_equal(back, draft)
    monkeypatch.undo()
    release.save_release(out, cfg, dcfg, changed)  # overwrite succeeds
    assert os.listdir(tmp_path) == ["ckpt"]
    np.testing.assert_array_equal(
        release.load_release(out, cfg)[1]["mask_embedding"], changed["mask_embedding"]
    )
    with pytest.raises(FileExistsError):
        release.save_release(out, cfg, dcfg, draft, overwrite=False)


# ----------------------------------------------------------------------------- draft vocabulary


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_restricted_draft_vocab_logits_are_the_full_logits_columns(arch):
    cfg = ARCHS[arch]
    dcfg = DraftConfig(depth=DEPTH, block_size=4, calib_rank=16)
    target = jax.tree.map(jnp.asarray, random_target(cfg, 1))
    draft = jax.tree.map(jnp.asarray, random_draft(cfg, dcfg, target, 2))
    hidden = jax.random.normal(jax.random.PRNGKey(0), (2, 3, cfg.hidden_size))
    bonus = jnp.array([1, 7], jnp.int32)
    ids = np.array([5, 0, 17, 3, cfg.vocab_size - 1], np.int32)
    small = T.restrict_draft_vocab(cfg, target, draft, ids)
    np.testing.assert_array_equal(small["head"]["ids"], ids)
    for calib in (True, False):
        full = T.draft_logits(cfg, target, draft, hidden, bonus, calib)
        part = T.draft_logits(cfg, target, small, hidden, bonus, calib)
        assert part.shape == (2, 3, len(ids))
        np.testing.assert_allclose(part, full[..., ids], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"ids must lie in"):
        T.restrict_draft_vocab(cfg, target, draft, [0, cfg.vocab_size])


def test_release_stores_the_draft_vocabulary(tmp_path):
    from flexdraft_jax.recipes import loading

    cfg = ARCHS["llama"]
    dcfg = DraftConfig(depth=DEPTH, block_size=4, calib_rank=16)
    target = random_target(cfg, 1)
    draft = random_draft(cfg, dcfg, target, 2)
    plain = release.save_release(str(tmp_path / "plain"), cfg, dcfg, draft)
    assert release.load_draft_vocab(plain, cfg) is None
    modes = {f: os.stat(os.path.join(plain, f)).st_mode & 0o777 for f in ("", *os.listdir(plain))}
    assert modes == {"": 0o755, "config.json": 0o644, release.WEIGHTS_FILE: 0o644}  # shareable
    assert loading.load_draft(plain, cfg, target).vocab is None
    order = np.random.default_rng(0).permutation(cfg.vocab_size).astype(np.int32)
    out = release.save_release(str(tmp_path / "v"), cfg, dcfg, draft, vocab=order)
    np.testing.assert_array_equal(release.load_draft_vocab(out, cfg), order)
    back = loading.load_draft(out, cfg, target)
    np.testing.assert_array_equal(back.vocab, order)
    _assert_trees_equal(jax.tree.map(np.asarray, back.params), draft)
    assert back.vocab_size is None and release.load_draft_vocab_size(out, cfg) is None
    # The number of leading ids the draft was trained over: decoding's default vocabulary.
    sized = release.save_release(str(tmp_path / "s"), cfg, dcfg, draft, vocab=order, vocab_size=9)
    assert release.load_draft_vocab_size(sized, cfg) == 9
    back = loading.load_draft(sized, cfg, target)
    assert back.vocab_size == 9

    # Only the 9 trained ids' calibration rows are stored; the others load as zeros, so the
    # draft restricted to its vocabulary (as decoding runs it) gives the same logits.
    def fc2_rows(d):
        with safe_open(os.path.join(d, release.WEIGHTS_FILE), framework="numpy") as f:
            return f.get_slice("anchor_bias_mlp.2.weight").get_shape()[0]

    assert fc2_rows(out) == cfg.vocab_size and fc2_rows(sized) == 9
    fc2, got = draft["calibration"]["fc2"], jax.tree.map(np.asarray, back.params)
    np.testing.assert_array_equal(got["calibration"]["fc2"]["kernel"][:, order[:9]],
                                  fc2["kernel"][:, order[:9]])  # fmt: skip
    dropped = np.setdiff1d(np.arange(cfg.vocab_size), order[:9])
    assert not got["calibration"]["fc2"]["kernel"][:, dropped].any()
    assert not got["calibration"]["fc2"]["bias"][dropped].any()
    hidden = jax.random.normal(jax.random.PRNGKey(0), (2, 3, cfg.hidden_size))
    bonus = jnp.array([1, 7], jnp.int32)
    logits = [
        T.draft_logits(
            cfg, target, T.restrict_draft_vocab(cfg, target, d, order[:9]), hidden, bonus, True
        )  # fmt: skip
        for d in (draft, got)
    ]
    np.testing.assert_allclose(*logits, rtol=1e-6, atol=1e-6)
    full = release.save_release(str(tmp_path / "f"), cfg, dcfg, draft, vocab=order, vocab_size=9,
                                trained_rows_only=False)  # fmt: skip
    assert fc2_rows(full) == cfg.vocab_size
    _assert_trees_equal(jax.tree.map(np.asarray, loading.load_draft(full, cfg, target).params),
                        draft)  # fmt: skip
    for bad, why in (([1, 1, 2], "distinct"), ([cfg.vocab_size], "distinct"), ([], "non-empty")):
        with pytest.raises(ValueError, match=why):
            release.save_release(str(tmp_path / "bad"), cfg, dcfg, draft, vocab=np.array(bad))
        assert not os.path.exists(tmp_path / "bad")
    for kw in (dict(vocab=order, vocab_size=cfg.vocab_size + 1), dict(vocab_size=4)):
        with pytest.raises(ValueError, match="vocab_size"):
            release.save_release(str(tmp_path / "bad"), cfg, dcfg, draft, **kw)
        assert not os.path.exists(tmp_path / "bad")


def test_release_records_the_held_out_acceptance(tmp_path):
    """The acceptance per draft position a trained draft measured on held-out data travels in
    config.json; `load_draft` returns it for the decoder's cost model."""
    from flexdraft_jax.recipes import loading

    cfg = ARCHS["llama"]
    dcfg = DraftConfig(depth=DEPTH, block_size=4, calib_rank=16)
    target = random_target(cfg, 1)
    draft = random_draft(cfg, dcfg, target, 2)
    plain = release.save_release(str(tmp_path / "plain"), cfg, dcfg, draft)
    assert release.load_acceptance(plain, 4) is None
    assert loading.load_draft(plain, cfg, target).acceptance is None
    assert loading.load_draft(plain, cfg, target).prefill_confidence is None
    out = release.save_release(str(tmp_path / "a"), cfg, dcfg, draft, acceptance=[0.6, 0.5, 0.4],
                               prefill_confidence=[0.9, 0.5, 0.2])  # fmt: skip
    back = loading.load_draft(out, cfg, target)
    np.testing.assert_allclose(back.acceptance, [0.6, 0.5, 0.4])
    np.testing.assert_allclose(back.prefill_confidence, [0.9, 0.5, 0.2])
    _assert_trees_equal(jax.tree.map(np.asarray, back.params), draft)
    for bad in ([0.6, 0.5], [0.6, 0.5, 1.5], ["x", 1, 2]):
        with pytest.raises(ValueError, match="acceptance must be"):
            release.save_release(str(tmp_path / "bad"), cfg, dcfg, draft, acceptance=bad)
        with pytest.raises(ValueError, match="confidence must be"):
            release.save_release(str(tmp_path / "bad"), cfg, dcfg, draft, acceptance=[0.5] * 3,
                                 prefill_confidence=bad)  # fmt: skip
        assert not os.path.exists(tmp_path / "bad")
    with pytest.raises(ValueError, match="needs the acceptance"):
        release.save_release(str(tmp_path / "bad"), cfg, dcfg, draft, prefill_confidence=[0.5] * 3)


def test_device_training_bf16_export_keeps_what_flex_reads(tmp_path):
    """The accelerator check's bfloat16 re-export of a trainer's release keeps the vocabulary, its
    size, the acceptance prior and its prefill-confidence calibration."""
    from flexdraft_jax.recipes import device_train, loading

    cfg = ARCHS["llama"]
    dcfg = DraftConfig(depth=DEPTH, block_size=4, calib_rank=16)
    target = random_target(cfg, 1)
    draft = random_draft(cfg, dcfg, target, 2)
    order = np.random.default_rng(0).permutation(cfg.vocab_size).astype(np.int32)
    src = release.save_release(
        str(tmp_path / "f32"),
        cfg,
        dcfg,
        draft,
        vocab=order,
        vocab_size=9,
        acceptance=[0.6, 0.5, 0.4],
        prefill_confidence=[0.9, 0.5, 0.2],
    )
    device_train.export_bf16(src, str(tmp_path / "bf16"), cfg, "bfloat16", 2**30)
    back = loading.load_draft(str(tmp_path / "bf16"), cfg, target)
    np.testing.assert_array_equal(back.vocab, order)
    assert back.vocab_size == 9
    np.testing.assert_allclose(back.acceptance, [0.6, 0.5, 0.4])
    np.testing.assert_allclose(back.prefill_confidence, [0.9, 0.5, 0.2])


def test_a_release_names_its_target_and_another_target_is_refused(tmp_path):
    """The release records the fingerprint of the target it was trained for: loading it for the
    same target (in any dtype) works, for another target of the same shape it fails, naming both;
    an older release without the record loads for any target."""
    from flexdraft_jax.models.draft import target_fingerprint
    from flexdraft_jax.recipes import loading

    cfg = ARCHS["llama"]
    dcfg = DraftConfig(depth=DEPTH, block_size=4, calib_rank=16)
    target, other = random_target(cfg, 1), random_target(cfg, 2)
    draft = random_draft(cfg, dcfg, target, 2)
    fp = target_fingerprint(cfg, target)
    assert fp != target_fingerprint(cfg, other)
    bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), target)
    assert target_fingerprint(cfg, bf16) == fp
    out = release.save_release(str(tmp_path / "r"), cfg, dcfg, draft, target_fingerprint=fp)
    assert loading.load_draft(out, cfg, target).target == fp
    assert loading.load_draft(out, cfg, bf16).target == fp
    with pytest.raises(ValueError, match=f"different target.*{fp}"):
        loading.load_draft(out, cfg, other)
    plain = release.save_release(str(tmp_path / "p"), cfg, dcfg, draft)
    assert loading.load_draft(plain, cfg, other).target is None
