"""Model-level checks of the Pallas attention path: `attention_impl="pallas"` (interpreted on CPU)
gives the same clean logits and mask hidden states as "xla" through `transformer.forward`, for the
prefill-plus-block pass and a parallel step against a ragged cache; the same greedy tokens through
the compiled decode loop (`engine.run`); and that loop, every branch included, lowers for TPU and
CUDA with the Pallas kernels inside."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexdraft_jax.decoding import engine
from flexdraft_jax.decoding.decoder import CostProfile, Decoder
from flexdraft_jax.kernels import api
from flexdraft_jax.models import layouts, precision, transformer
from flexdraft_jax.models.config import DraftConfig, ModelConfig

# Max |pallas - xla| of float32 logits / hidden states after a few layers, declared once.
MODEL_TOL = 1e-4


def _tiny():
    cfg = ModelConfig(
        arch="llama",
        vocab_size=97,
        hidden_size=96,
        intermediate_size=128,
        num_layers=3,
        num_heads=6,
        num_kv_heads=2,
        head_dim=64,
    )
    dcfg = DraftConfig(depth=2, block_size=4, calib_rank=16)
    key_t, key_d = jax.random.split(jax.random.key(0))
    target = transformer.init_target(cfg, key_t)
    draft = transformer.init_draft(cfg, dcfg, target, key_d)
    return cfg, dcfg, target, draft


def test_pallas_forward_matches_xla():
    cfg, dcfg, target, draft = _tiny()
    rng = np.random.default_rng(0)
    b, rows, capacity, w = 2, 10, 48, dcfg.block_size
    lengths = np.array([6, 10], np.int32)  # ragged prompts
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, rows)), jnp.int32)

    def run(impl, layout, toks, cache, write_start):
        c = cfg.replace(attention_impl=impl)
        fn = jax.jit(
            lambda tg, dr, tk, lay, ca, ws: transformer.forward(
                c, tg, tk, lay.positions, lay.meta, ca, ws,
                draft=dr, dcfg=dcfg, mask_positions=lay.mask_positions,
            )
        )  # fmt: skip
        return fn(target, draft, toks, layout, cache, write_start)

    # Prefill (causal prompt rows + one mask block at each length), written to a fresh cache.
    prefill = layouts.prefill_block(lengths, rows, w)
    outs = {}
    for impl in ("xla", "pallas"):
        cache = transformer.init_cache(cfg, b, capacity)
        outs[impl] = run(impl, prefill, tokens, cache, jnp.zeros((b,), jnp.int32))
    (lx, hx, cache_x), (lp, hp, cache_p) = outs["xla"], outs["pallas"]
    assert float(jnp.abs(lx - lp).max()) <= MODEL_TOL
    assert float(jnp.abs(hx - hp).max()) <= MODEL_TOL
    assert float(jnp.abs(cache_x.k - cache_p.k).max()) <= MODEL_TOL

    # A parallel step: R candidate rows at each sequence's length, G groups of W mask rows.
    num_rows, groups = 3, 3
    step = layouts.parallel(lengths, num_rows, groups, w)
    cand = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, num_rows)), jnp.int32)
    start = jnp.asarray(lengths)
    cache = cache_x._replace(lengths=start)
    lx, hx, _ = run("xla", step, cand, cache, start)
    lp, hp, _ = run("pallas", step, cand, cache, start)
    assert lx.shape == (b, num_rows, cfg.vocab_size) and hx.shape == (
        b,
        groups * w,
        cfg.hidden_size,
    )
    assert float(jnp.abs(lx - lp).max()) <= MODEL_TOL
    assert float(jnp.abs(hx - hp).max()) <= MODEL_TOL


def test_pallas_greedy_flexdraft_tokens_match_xla():
    """Decoding end to end (prefill + parallel and sequential FlexDraft steps) with the Pallas
    kernel (interpreted) commits the same greedy tokens, per step, as with the XLA reference."""
    from flexdraft_jax.decoding.decoder import Decoder
    from flexdraft_jax.decoding.engine import EngineConfig

    cfg, dcfg, target, draft = _tiny()
    target["embed"]["embedding"] = target["embed"]["embedding"] * 40.0  # structured greedy text
    prompts = [[5, 6, 7, 8, 9], [3, 1, 4]]
    runs = {}
    for impl in ("xla", "pallas"):
        c = cfg.replace(attention_impl=impl)
        for mode in ("parallel", "sequential"):
            dec = Decoder(
                c,
                target,
                draft,
                dcfg,
                EngineConfig(mode=mode, threshold=0.0),
                cache_len=64,
                eos_ids=(),
            )
            runs[impl, mode] = dec.generate(prompts, 8)
    for mode in ("parallel", "sequential"):
        a, b = runs["xla", mode], runs["pallas", mode]
        assert a.tokens == b.tokens, mode
        assert a.stats["committed_per_step"] == b.stats["committed_per_step"], mode


# Flex costs under which the decode below runs AR, sequential and parallel steps: a strong prior
# acceptance makes par4 worth its cost first, rejections then move flex to seq2 and to AR, and
# probes (every 2 AR steps) bring seq2 back.
FLEX_TIMES = {"ar1": 1.0, "seq2": 1.3, "seq4": 9.0, "par2": 9.0, "par4": 2.0}
FLEX = dict(
    mode="flex", threshold=0.0, alpha_init=0.9, alpha_prior_weight=2.0, gain="acceptance",
    probe_interval=2, probe_budget=1.0,
)  # fmt: skip


def test_pallas_flex_decode_loop_matches_xla():
    """Flex decoding (AR, sequential and parallel branches of one `lax.switch` inside the device
    loop's `lax.while_loop`, 16 steps per call) with the Pallas kernel (interpreted) takes the
    same branches and commits the same greedy tokens as with XLA attention."""
    cfg, dcfg, target, draft = _tiny()
    target["embed"]["embedding"] = target["embed"]["embedding"] * 40.0
    prompts = [[5, 6, 7, 8, 9], [3, 1, 4]]
    runs = {}
    for impl in ("xla", "pallas"):
        dec = Decoder(
            cfg.replace(attention_impl=impl), target, draft, dcfg, engine.EngineConfig(**FLEX),
            cache_len=64, eos_ids=(), profiles={2: CostProfile(2, FLEX_TIMES, 0.3)},
        )  # fmt: skip
        runs[impl] = dec.generate(prompts, 16)
    a, b = runs["xla"], runs["pallas"]
    assert a.tokens == b.tokens
    assert a.stats["branch_per_step"] == b.stats["branch_per_step"]
    assert a.stats["committed_per_step"] == b.stats["committed_per_step"]
    kinds = {name.rstrip("0123456789") for name in a.stats["branch_per_step"]}
    assert kinds == {"ar", "seq", "par"}, a.stats["branch_per_step"]


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_decode_loop_lowers_with_pallas_for_accelerators(platform, monkeypatch):
    """The whole compiled decode loop (`engine.run`: a `lax.while_loop` of flex steps, each a
    `lax.switch` over AR, sequential and parallel branches), bfloat16 as on accelerators, lowers
    from this CPU host for TPU (Mosaic) and CUDA (Triton) with `attention_impl="pallas"`: every
    attention goes through the kernel (the XLA reference is never traced) and the kernel's custom
    call is in the module."""

    def no_reference(*args, **kw):
        raise AssertionError("the XLA attention reference was traced")

    monkeypatch.setattr(api, "attention_reference", no_reference)
    monkeypatch.setattr(api, "cached_attention_reference", no_reference)
    cfg, dcfg, target, draft = _tiny()
    cfg = cfg.replace(attention_impl="pallas")
    bf = jnp.bfloat16
    target, draft = precision.cast_params(target, bf), precision.cast_params(draft, bf)
    b, capacity, width = 2, 256, 16
    dec = Decoder(
        cfg, target, draft, dcfg, engine.EngineConfig(mode="flex"), cache_len=capacity,
        eos_ids=(), profiles={b: CostProfile(b, FLEX_TIMES, 0.3)},
    )  # fmt: skip
    st = dec.static(b)
    assert {kind for kind, _ in st.branches} == {"ar", "seq", "par"}
    spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
    target, draft = jax.tree.map(spec, target), jax.tree.map(spec, draft)
    prefill_args = (
        jax.ShapeDtypeStruct((b, width), jnp.int32),  # prompts
        jax.ShapeDtypeStruct((b,), jnp.int32),  # lengths
        jax.eval_shape(lambda: transformer.init_cache(cfg, b, capacity, bf)),
        jax.ShapeDtypeStruct((2,), jnp.uint32),  # key
        jax.ShapeDtypeStruct((), jnp.int32),  # max_new
    )
    state = jax.eval_shape(lambda *a: engine.prefill(st, *a), target, draft, *prefill_args)
    costs = jax.ShapeDtypeStruct((len(st.branches) + 1,), jnp.float32)
    exported = jax.export.export(
        engine.run,
        platforms=[platform],
        # Triton calls carry no serialization-compatibility guarantee; we only need the lowering.
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(st, target, draft, state, costs, window=128, steps=16)
    text = exported.mlir_module()
    assert "stablehlo.while" in text and "stablehlo.case" in text
    assert ("tpu_custom_call" if platform == "tpu" else "xla.gpu.triton") in text
