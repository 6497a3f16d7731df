"""Llama-family transformer (linen modules, pure-functional forward) with FlexDraft deep layers.

Parameters are plain pytrees, created by the linen modules below and stacked over layers:

  target = {"embed": {"embedding": [V, H]},
            "layers": {"input_norm", "attn": {q_proj, k_proj, v_proj, o_proj, [q_norm, k_norm]},
                       "post_norm", "mlp": {gate_proj, up_proj, down_proj}}   # leaves [L, ...]
            "final_norm": {"scale": [H]},
            "lm_head": {"kernel": [H, V]}}                 # absent when embeddings are tied
  draft  = {"mask_embedding": [H],
            "layers": <"attn" subtree stacked over the D deep layers>,
            "calibration": {"fc1": {kernel [2H, r], bias}, "fc2": {kernel [r, V], bias}}}

One forward (`forward`) serves every case. Its rows are `Tc` clean rows (real tokens, AR convention)
followed by `Tm` mask rows (FlexDraft drafts, diffusion convention) that exist only in the deep
layers `s .. L-1`; clean rows use the target's projectors and mask rows the draft copies; norms,
MLP, final norm and lm_head are shared. Attention goes through `kernels.api.attention` with the
per-row `RowMeta` (see `kernels/mask.py` and `layouts.py`). Clean rows are written to the KV cache
(a value passed in and returned); mask rows never are. Layers run in `lax.fori_loop`s that index the
stacked parameters, so compile time does not grow with depth and the cache is updated in place.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flexdraft_jax.kernels.api import attention, cached_attention
from flexdraft_jax.kernels.mask import RowMeta
from flexdraft_jax.models.config import DraftConfig, ModelConfig


class KVCache(NamedTuple):
    """Clean-row keys/values of every layer. k, v: [L, B, S, K, D]; lengths: int32[B].

    Slots >= lengths[b] may hold stale rows (rejected candidates, prompt padding); attention never
    sees them because every row's `q_limit` stops at the committed length plus its own step's rows.
    Rollback is therefore a length update.
    """

    k: jnp.ndarray
    v: jnp.ndarray
    lengths: jnp.ndarray

    @property
    def capacity(self) -> int:
        return self.k.shape[2]


class Pending(NamedTuple):
    """Clean rows a decode step has computed but not written to the cache (`write_pending`).

    k, v: [L, B, R, K, D]; slots: int32[B, R], each row's cache slot (its position); a slot at or
    past the capacity is not written. Branches of a compiled step return these instead of
    updating the cache, so the cache is written once, in place, after the branch.
    """

    k: jnp.ndarray
    v: jnp.ndarray
    slots: jnp.ndarray

    def padded(self, rows: int, capacity: int) -> Pending:
        """The same rows padded to `rows` (padding rows are not written)."""
        extra = rows - self.slots.shape[1]
        if extra == 0:
            return self
        pad = [(0, 0), (0, 0), (0, extra), (0, 0), (0, 0)]
        slots = jnp.pad(self.slots, [(0, 0), (0, extra)], constant_values=capacity)
        return Pending(jnp.pad(self.k, pad), jnp.pad(self.v, pad), slots)


def write_pending(cache: KVCache, pending: Pending, lengths) -> KVCache:
    """The cache with `pending`'s rows written (in place when the cache is donated)."""
    bidx = jnp.arange(cache.k.shape[1])[:, None]
    k = cache.k.at[:, bidx, pending.slots].set(pending.k.astype(cache.k.dtype), mode="drop")
    v = cache.v.at[:, bidx, pending.slots].set(pending.v.astype(cache.v.dtype), mode="drop")
    return KVCache(k, v, lengths)


def init_cache(cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.float32) -> KVCache:
    shape = (cfg.num_layers, batch, capacity, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))


# ----------------------------------------------------------------------------- linen modules


class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale).astype(x.dtype)


def rope(x, positions, inv_freq):
    """Rotate-half RoPE (the Hugging Face Llama convention). x [B, T, N, D], positions [B, T]."""
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
    cos = jnp.cos(freqs)[:, :, None, :]
    sin = jnp.sin(freqs)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class AttnProj(nn.Module):
    """q/k/v/o projectors of one layer (the part FlexDraft copies for mask rows)."""

    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        dense = lambda n, bias: nn.Dense(n, use_bias=bias, param_dtype=jnp.float32)
        self.q_proj = dense(c.num_heads * c.head_dim, c.attention_bias)
        self.k_proj = dense(c.num_kv_heads * c.head_dim, c.attention_bias)
        self.v_proj = dense(c.num_kv_heads * c.head_dim, c.attention_bias)
        self.o_proj = dense(c.hidden_size, c.o_proj_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.rms_norm_eps)
            self.k_norm = RMSNorm(c.rms_norm_eps)

    def qkv(self, h, positions):
        """h [B, T, H] -> q [B, T, N, D], k, v [B, T, K, D], RoPE applied."""
        c = self.cfg
        b, t, _ = h.shape
        q = self.q_proj(h).reshape(b, t, c.num_heads, c.head_dim)
        k = self.k_proj(h).reshape(b, t, c.num_kv_heads, c.head_dim)
        v = self.v_proj(h).reshape(b, t, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = jnp.asarray(c.inv_freq())
        return rope(q, positions, inv_freq), rope(k, positions, inv_freq), v

    def out(self, a):
        """a [B, T, N, D] -> [B, T, H]."""
        return self.o_proj(a.reshape(*a.shape[:2], a.shape[2] * a.shape[3]))

    def __call__(self, h, positions):  # used only to create parameters
        q, _, _ = self.qkv(h, positions)
        return self.out(q)


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        dense = lambda n, name: nn.Dense(n, use_bias=False, name=name, param_dtype=jnp.float32)
        g = dense(self.cfg.intermediate_size, "gate_proj")(x)
        u = dense(self.cfg.intermediate_size, "up_proj")(x)
        return dense(self.cfg.hidden_size, "down_proj")(nn.silu(g) * u)


class Block(nn.Module):
    """One decoder layer's parameters: input_norm, attn, post_norm, mlp."""

    cfg: ModelConfig

    def setup(self):
        self.input_norm = RMSNorm(self.cfg.rms_norm_eps)
        self.attn = AttnProj(self.cfg)
        self.post_norm = RMSNorm(self.cfg.rms_norm_eps)
        self.mlp = MLP(self.cfg)

    def __call__(self, x, positions):
        x = x + self.attn(self.input_norm(x), positions)
        return x + self.mlp(self.post_norm(x))


def _dot_f32(lhs, rhs, dimension_numbers, precision=None, **kw):
    """`lax.dot_general` accumulating (and returning) float32 whatever the operands' dtype."""
    return jax.lax.dot_general(
        lhs, rhs, dimension_numbers, precision, preferred_element_type=jnp.float32
    )


class Calibration(nn.Module):
    """Bonus-guided calibration: MLP([E(bonus) ; n_j]) -> V logits correction (DESIGN §2.2).
    The correction is float32 (fc2 accumulates in float32), like the logits it is added to."""

    rank: int
    vocab_size: int

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.rank, name="fc1", param_dtype=jnp.float32)(x)
        return nn.Dense(
            self.vocab_size, name="fc2", kernel_init=nn.initializers.zeros,
            param_dtype=jnp.float32, dot_general=_dot_f32,
        )(nn.silu(x))  # fmt: skip


# ----------------------------------------------------------------------------- parameter init


def init_target(cfg: ModelConfig, key) -> dict:
    """Random target parameters (for tests and shape inference)."""
    k_embed, k_layers, k_head = jax.random.split(key, 3)
    h = jnp.zeros((1, 1, cfg.hidden_size), jnp.float32)
    pos = jnp.zeros((1, 1), jnp.int32)
    layer_keys = jax.random.split(k_layers, cfg.num_layers)
    layers = jax.vmap(lambda k: Block(cfg).init(k, h, pos)["params"])(layer_keys)
    params = {
        "embed": {
            "embedding": jax.random.normal(k_embed, (cfg.vocab_size, cfg.hidden_size)) * 0.02
        },
        "layers": layers,
        "final_norm": {"scale": jnp.ones((cfg.hidden_size,), jnp.float32)},
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {
            "kernel": jax.random.normal(k_head, (cfg.hidden_size, cfg.vocab_size)) * 0.02
        }
    return params


def init_draft(cfg: ModelConfig, dcfg: DraftConfig, target: dict, key) -> dict:
    """FlexDraft parameters: mask embedding ~ N(0, 0.02), draft projectors copied from the target's
    last D layers, calibration MLP with a zero output layer (a no-op at start)."""
    s = dcfg.split(cfg)
    k_mask, k_cal = jax.random.split(key)
    draft_layers = jax.tree.map(lambda x: jnp.array(x[s:]), target["layers"]["attn"])
    calib = Calibration(dcfg.calib_rank, cfg.vocab_size).init(
        k_cal, jnp.zeros((1, 2 * cfg.hidden_size), jnp.float32)
    )["params"]
    return {
        "mask_embedding": jax.random.normal(k_mask, (cfg.hidden_size,), jnp.float32) * 0.02,
        "layers": draft_layers,
        "calibration": calib,
    }


# ----------------------------------------------------------------------------- forward


def _index(tree, i):
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), tree)


def _layer(cfg, lp, dp, x, n_clean, positions, meta, cache_kv, write_slots, kv_window=None):
    """One decoder layer over [clean rows ; mask rows]. x [B, T, H], positions [B, T].

    cache_kv: (k, v, i) with the whole cache k, v [L, B, S, K, D] and this layer's index i, or
      None (keys are this call's clean rows). The clean rows' keys/values are scattered straight
      into the whole cache (in place inside the layer loop) at `write_slots` int32[B, Tc].
    kv_window: attend to cache slots [0, kv_window) only (None: the whole capacity).
    Returns the new x and the updated whole (k, v) (or None).
    """
    t = x.shape[1]
    norm = lambda p, y: RMSNorm(cfg.rms_norm_eps).apply({"params": p}, y)
    proj = lambda p, *a, method: AttnProj(cfg).apply({"params": p}, *a, method=method)
    h = norm(lp["input_norm"], x)
    q, k, v = proj(lp["attn"], h[:, :n_clean], positions[:, :n_clean], method="qkv")
    if cache_kv is not None:
        ck, cv, i = cache_kv
        if n_clean:
            bidx = jnp.arange(x.shape[0])[:, None]
            ck = ck.at[i, bidx, write_slots].set(k.astype(ck.dtype), mode="drop")
            cv = cv.at[i, bidx, write_slots].set(v.astype(cv.dtype), mode="drop")
        keys = jax.lax.dynamic_index_in_dim(ck, i, keepdims=False)[:, :kv_window]
        values = jax.lax.dynamic_index_in_dim(cv, i, keepdims=False)[:, :kv_window]
        new_kv = (ck, cv)
    else:
        keys, values, new_kv = k, v, None
    if t > n_clean:
        qm, km, vm = proj(dp, h[:, n_clean:], positions[:, n_clean:], method="qkv")
        q = jnp.concatenate([q, qm], axis=1)
        keys = jnp.concatenate([keys, km.astype(keys.dtype)], axis=1)
        values = jnp.concatenate([values, vm.astype(values.dtype)], axis=1)
    a = attention(q, keys, values, meta, impl=cfg.attention_impl)
    o = proj(lp["attn"], a[:, :n_clean], method="out")
    if t > n_clean:
        o = jnp.concatenate([o, proj(dp, a[:, n_clean:], method="out")], axis=1)
    x = x + o
    x = x + MLP(cfg).apply({"params": lp["mlp"]}, norm(lp["post_norm"], x))
    return x, new_kv


def _run_layers(
    cfg, target, draft, lo, hi, x, n_clean, positions, meta, cache, write_slots, kv_window=None
):
    """Layers lo..hi-1 in a fori_loop. Draft projectors (if any) are indexed from layer `lo`.

    A cache may cover only the last layers (k.shape[0] < L, e.g. precomputed deep-layer K/V for
    training); it is then indexed from layer L - k.shape[0].
    """
    has_cache = cache is not None
    offset = cfg.num_layers - cache.k.shape[0] if has_cache else 0
    if offset > lo:
        raise ValueError(f"the cache covers layers {offset}.. but layer {lo} needs it")

    def body(i, carry):
        x, ck, cv = carry
        lp = _index(target["layers"], i)
        dp = _index(draft["layers"], i - lo) if draft is not None else None
        kv = (ck, cv, i - offset) if has_cache else None
        x, new_kv = _layer(cfg, lp, dp, x, n_clean, positions, meta, kv, write_slots, kv_window)
        if has_cache:
            ck, cv = new_kv
        return x, ck, cv

    ck, cv = (cache.k, cache.v) if has_cache else (jnp.zeros(()), jnp.zeros(()))
    x, ck, cv = jax.lax.fori_loop(lo, hi, body, (x, ck, cv))
    return x, (cache._replace(k=ck, v=cv) if has_cache else None)


def _layer_deferred(cfg, lp, dp, x, n_clean, positions, meta, cache_kv, cached, extra, impl):
    """`_layer` against a read-only cache window. cache_kv: (k, v) [B, Sw, K, D]; cached int32[B]
    the valid cache length; extra: (k, v [B, Se, K, D], slots [B, Se]) clean rows of an earlier
    pass of the same step, or None. Returns the new x and this call's clean (k, v)."""
    t = x.shape[1]
    norm = lambda p, y: RMSNorm(cfg.rms_norm_eps).apply({"params": p}, y)
    proj = lambda p, *a, method: AttnProj(cfg).apply({"params": p}, *a, method=method)
    h = norm(lp["input_norm"], x)
    q, k, v = proj(lp["attn"], h[:, :n_clean], positions[:, :n_clean], method="qkv")
    nk, nv, slots = [k], [v], [positions[:, :n_clean]]
    if extra is not None:
        nk, nv, slots = [extra[0]] + nk, [extra[1]] + nv, [extra[2]] + slots
    if t > n_clean:
        qm, km, vm = proj(dp, h[:, n_clean:], positions[:, n_clean:], method="qkv")
        q = jnp.concatenate([q, qm], axis=1)
        nk, nv = nk + [km], nv + [vm]
    cat = lambda xs: jnp.concatenate([y.astype(xs[0].dtype) for y in xs], axis=1)
    ck, cv = cache_kv
    a = cached_attention(
        q, ck, cv, cached, cat(nk), cat(nv), cat(slots), meta, impl=impl
    )  # fmt: skip
    o = proj(lp["attn"], a[:, :n_clean], method="out")
    if t > n_clean:
        o = jnp.concatenate([o, proj(dp, a[:, n_clean:], method="out")], axis=1)
    x = x + o
    x = x + MLP(cfg).apply({"params": lp["mlp"]}, norm(lp["post_norm"], x))
    return x, (k, v)


def _run_layers_deferred(
    cfg, target, draft, lo, hi, x, n_clean, positions, meta, cache, window, pending, out
):
    """Layers lo..hi-1 against the read-only `cache` (slots [0, window) read); each layer's clean
    k, v go into `out` ([L, B, Tc, K, D] pair) at its index."""
    b = x.shape[0]

    def body(i, carry):
        x, ok, ov = carry
        lp = _index(target["layers"], i)
        dp = _index(draft["layers"], i - lo) if draft is not None else None
        shape = (1, b, window) + cache.k.shape[3:]
        ck = jax.lax.dynamic_slice(cache.k, (i, 0, 0, 0, 0), shape)[0]
        cv = jax.lax.dynamic_slice(cache.v, (i, 0, 0, 0, 0), shape)[0]
        extra = None
        if pending is not None:
            extra = (_index(pending.k, i), _index(pending.v, i), pending.slots)
        x, (k, v) = _layer_deferred(
            cfg, lp, dp, x, n_clean, positions, meta, (ck, cv), cache.lengths, extra,
            cfg.attention_impl,
        )  # fmt: skip
        if n_clean:
            ok = jax.lax.dynamic_update_index_in_dim(ok, k.astype(ok.dtype), i, 0)
            ov = jax.lax.dynamic_update_index_in_dim(ov, v.astype(ov.dtype), i, 0)
        return x, ok, ov

    return jax.lax.fori_loop(lo, hi, body, (x, *out))


def step_forward(
    cfg: ModelConfig,
    target: dict,
    tokens,
    positions,
    meta: RowMeta,
    cache: KVCache,
    *,
    window: int,
    pending: Pending | None = None,
    draft: dict | None = None,
    dcfg: DraftConfig | None = None,
    mask_positions=None,
):
    """`forward` for a decode step: the cache is read, never written.

    cache: its `lengths` are the committed lengths before this step (slots below them are read,
      through the first `window` slots only: every visible slot must lie below it).
    tokens, positions: int32[B, Tc], the clean rows at slots = positions; `meta` as for `forward`.
    pending: clean rows of an earlier pass of this step (all L layers), seen as keys at their
      slots (the sequential step's draft pass sees its verify pass's rows this way).
    Returns (clean logits [B, Tc, V], mask hidden [B, Tm, H], Pending of this call's clean rows).
    """
    b, n_clean = tokens.shape
    n_mask = 0 if mask_positions is None else mask_positions.shape[1]
    if n_mask and (draft is None or dcfg is None):
        raise ValueError("mask rows need draft parameters and a DraftConfig")
    if window > cache.capacity:
        raise ValueError(f"window {window} exceeds the cache capacity {cache.capacity}")
    split = dcfg.split(cfg) if n_mask else cfg.num_layers
    kv_shape = (cfg.num_layers, b, n_clean) + cache.k.shape[3:]
    out = (jnp.zeros(kv_shape, cache.k.dtype), jnp.zeros(kv_shape, cache.v.dtype))
    clean_meta = RowMeta(meta.q_limit[:, :n_clean], meta.q_group[:, :n_clean], meta.k_group[:, :0])
    run = lambda *a: _run_layers_deferred(cfg, target, *a, cache, window, pending, out)
    x = embed(target, tokens)
    if n_clean and split > 0:
        x, *out = run(None, 0, split, x, n_clean, positions, clean_meta)
    if n_mask:
        mask_rows = jnp.broadcast_to(draft["mask_embedding"], (b, n_mask, cfg.hidden_size))
        x = jnp.concatenate([x, mask_rows.astype(x.dtype)], axis=1)
        pos = jnp.concatenate([positions, mask_positions], axis=1)
        x, *out = run(draft, split, cfg.num_layers, x, n_clean, pos, meta)
    h = final_norm(cfg, target, x)
    logits = lm_head(cfg, target, h[:, :n_clean])
    return logits, h[:, n_clean:], Pending(out[0], out[1], positions)


def embed(target, tokens):
    return jnp.take(target["embed"]["embedding"], tokens, axis=0)


def lm_head(cfg: ModelConfig, target, h):
    """h [..., H] (after the final norm) -> float32 logits [..., V], accumulated in float32
    whatever the weights' dtype (the softmax, sampling and verification read them)."""
    if cfg.tie_word_embeddings:
        return jnp.matmul(h, target["embed"]["embedding"].T, preferred_element_type=jnp.float32)
    return jnp.matmul(h, target["lm_head"]["kernel"], preferred_element_type=jnp.float32)


def final_norm(cfg: ModelConfig, target, x):
    return RMSNorm(cfg.rms_norm_eps).apply({"params": target["final_norm"]}, x)


def forward(
    cfg: ModelConfig,
    target: dict,
    tokens,
    positions,
    meta: RowMeta,
    cache: KVCache | None = None,
    write_start=None,
    *,
    draft: dict | None = None,
    dcfg: DraftConfig | None = None,
    mask_positions=None,
    return_hidden: bool = False,
    kv_window: int | None = None,
):
    """One pass over Tc clean rows and (with a draft) Tm mask rows.

    tokens, positions: int32[B, Tc] (Tc may be 0: the sequential draft pass, deep layers only).
    mask_positions: int32[B, Tm] positions of the mask rows (Tm may be 0 or None).
    meta: RowMeta over the Tc + Tm query rows; its q_limit counts cache slots (or, without a cache,
      this call's clean rows).
    cache, write_start: the KV cache and int32[B] slot where the clean rows are written.
    kv_window: static; attention reads only cache slots [0, kv_window) (every visible slot must
      lie below it). Reading the whole capacity dominates a large-batch decode step on a CPU.

    Returns (clean_logits [B, Tc, V], mask_hidden [B, Tm, H] after the final norm, cache). With
    `return_hidden`, clean final-normed hidden states [B, Tc, H] are returned instead of logits.
    """
    b, n_clean = tokens.shape
    n_mask = 0 if mask_positions is None else mask_positions.shape[1]
    if n_mask and (draft is None or dcfg is None):
        raise ValueError("mask rows need draft parameters and a DraftConfig")
    if cache is not None and write_start is None:
        write_start = cache.lengths
    write_slots = write_start[:, None] + jnp.arange(n_clean)[None, :] if cache is not None else None
    split = dcfg.split(cfg) if n_mask else cfg.num_layers
    # Shallow layers: clean rows only (their meta is the clean sub-block of `meta`).
    clean_meta = RowMeta(meta.q_limit[:, :n_clean], meta.q_group[:, :n_clean], meta.k_group[:, :0])
    x = embed(target, tokens)
    if n_clean and split > 0:
        x, cache = _run_layers(
            cfg, target, None, 0, split, x, n_clean, positions, clean_meta, cache, write_slots,
            kv_window,
        )  # fmt: skip
    if n_mask:
        mask_rows = jnp.broadcast_to(draft["mask_embedding"], (b, n_mask, cfg.hidden_size))
        x = jnp.concatenate([x, mask_rows.astype(x.dtype)], axis=1)
        pos = jnp.concatenate([positions, mask_positions], axis=1)
        x, cache = _run_layers(
            cfg, target, draft, split, cfg.num_layers, x, n_clean, pos, meta, cache, write_slots,
            kv_window,
        )  # fmt: skip
    h = final_norm(cfg, target, x)
    hc, hm = h[:, :n_clean], h[:, n_clean:]
    clean_out = hc if return_hidden else lm_head(cfg, target, hc)
    return clean_out, hm, cache


def apply(cfg: ModelConfig, params: dict, tokens, positions, cache: KVCache | None, meta: RowMeta):
    """Plain target forward: (logits [B, T, V], cache). Clean rows only."""
    logits, _, cache = forward(cfg, params, tokens, positions, meta, cache)
    return logits, cache


def draft_logits(cfg: ModelConfig, target: dict, draft: dict, hidden, bonus, use_calibration=True):
    """Calibrated draft logits: lm_head(n_j) + MLP([E(bonus) ; n_j]), float32 whatever the
    parameters' dtype (both output layers accumulate in float32).

    hidden [B, W, H] mask-row states after the final norm; bonus int32[B]. Returns [B, W, V], or
    [B, W, N] over the draft vocabulary `draft["head"]["ids"]` of a draft made by
    `restrict_draft_vocab` (slot 0 is included for shape simplicity; callers discard it).
    """
    head = draft.get("head")
    if head is None:
        logits = lm_head(cfg, target, hidden)
    else:
        logits = jnp.matmul(hidden, head["kernel"], preferred_element_type=jnp.float32)
    if not use_calibration:
        return logits
    e = embed(target, bonus)[:, None, :]
    e = jnp.broadcast_to(e, hidden.shape)
    fc2 = draft["calibration"]["fc2"]["kernel"]
    corr = Calibration(fc2.shape[0], fc2.shape[1]).apply(
        {"params": draft["calibration"]}, jnp.concatenate([e, hidden], axis=-1)
    )
    return logits + corr


def restrict_draft_vocab(cfg: ModelConfig, target: dict, draft: dict, ids) -> dict:
    """The draft with its output layers (lm_head rows, calibration fc2 columns) restricted to the
    token ids `ids` (as FR-Spec / EAGLE-3 do): drafts are picked among them, verification still
    uses the target's whole vocabulary, so decoding stays lossless; the draft pass's output
    layers cost N/V of the full ones. The ids go into `draft["head"]["ids"]`."""
    if not isinstance(ids, jax.core.Tracer):
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(
                f"draft vocabulary must be a non-empty 1-D list of ids, got {ids.shape}"
            )
        if int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size:
            raise ValueError(f"draft vocabulary ids must lie in [0, {cfg.vocab_size})")
    ids = jnp.asarray(ids, jnp.int32)
    if cfg.tie_word_embeddings:
        kernel = target["embed"]["embedding"][ids].T
    else:
        kernel = target["lm_head"]["kernel"][:, ids]
    out = dict(draft, head={"ids": ids, "kernel": kernel})
    if "calibration" in draft:
        fc2 = draft["calibration"]["fc2"]
        out["calibration"] = dict(
            draft["calibration"], fc2={"kernel": fc2["kernel"][:, ids], "bias": fc2["bias"][ids]}
        )
    return out
