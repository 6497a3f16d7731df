"""Decoding in bfloat16 (issue: accelerator dtypes): casting the parameters, the forward's dtypes,
and bfloat16 decoding on CPU against bfloat16 AR.

In float32, greedy speculative decoding equals AR token for token (tests/test_decoding.py). In
bfloat16 it need not: a verify pass computes a row batched with other rows, AR computes it alone,
and two logits that tie within bfloat16 rounding may order either way. What stays exactly
checkable is that each committed token is a greedy choice of the target: within `BF16_TIE` of the
largest logit of its row when the target is re-run teacher-forced over prompt + output, and a
decode parts from AR only at such a tie.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexdraft_jax.checkpoints import release
from flexdraft_jax.decoding import ar, engine
from flexdraft_jax.decoding.decoder import CostProfile, Decoder, RunConfig
from flexdraft_jax.models import layouts, precision
from flexdraft_jax.models import transformer as tf
from flexdraft_jax.models.config import DraftConfig, ModelConfig
from flexdraft_jax.recipes import loading

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4], [9, 9, 9, 9, 9], [2, 7]]
# Two bfloat16 evaluations of one row of the tiny model's logits differ by less than this: its
# logits span about +-0.4, and bfloat16 arithmetic moves them by under 0.006 from float32
# arithmetic on the same (bfloat16) weights (`test_bfloat16_decoding_on_cpu` checks half of it).
BF16_TIE = 0.02


def tiny(peaky=50.0):
    """The tiny random target of tests/test_decoding.py (a peaky embedding: repetitive greedy
    text, so drafts are sometimes accepted) and a noisy copy of its projectors as the draft."""
    cfg = ModelConfig(
        arch="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4,
        num_heads=4, num_kv_heads=2, head_dim=8,
    )  # fmt: skip
    target = tf.init_target(cfg, jax.random.PRNGKey(0))
    target["embed"]["embedding"] = target["embed"]["embedding"] * peaky
    dcfg = DraftConfig(depth=2, block_size=4, calib_rank=16)
    draft = tf.init_draft(cfg, dcfg, target, jax.random.PRNGKey(1))
    leaves, tree = jax.tree.flatten(draft)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    leaves = [x + 0.01 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return cfg, target, dcfg, jax.tree.unflatten(tree, leaves)


def test_cast_params_casts_floating_leaves_only():
    cfg, target, dcfg, draft = tiny()
    draft = tf.restrict_draft_vocab(cfg, target, draft, [3, 1, 4])
    out = precision.cast_params(draft, jnp.bfloat16)
    kinds = {jnp.dtype(x.dtype) for x in jax.tree.leaves(out)}
    assert kinds == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.int32)}
    assert out["head"]["ids"] is draft["head"]["ids"]  # the draft vocabulary, untouched
    np.testing.assert_array_equal(
        np.asarray(out["mask_embedding"], np.float32),
        np.asarray(draft["mask_embedding"].astype(jnp.bfloat16), np.float32),
    )
    again = precision.cast_params(out, jnp.bfloat16)
    assert all(a is b for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(out)))
    host = precision.cast_params({"w": np.ones((2, 2), np.float32)}, jnp.bfloat16)
    assert isinstance(host["w"], np.ndarray) and host["w"].dtype == jnp.bfloat16
    assert precision.decode_dtype("auto") == jnp.float32  # these tests run on CPU
    assert precision.decode_dtype("bfloat16") == jnp.bfloat16
    with pytest.raises(ValueError, match="decoding dtype must be one of auto, bfloat16, float32"):
        precision.decode_dtype("float16")
    with pytest.raises(ValueError, match="floating dtype, got int32"):
        precision.cast_params(draft, jnp.int32)


def _dot_generals(jaxpr):
    """Every dot_general of a jaxpr, nested jaxprs (loops, conds, custom_jvp) included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _dot_generals(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _dot_generals(sub)


def test_bfloat16_forward_multiplies_weights_in_bfloat16_and_returns_float32_logits():
    """Prefill with a mask block (`forward`), a parallel decode step (`step_forward`) and the
    calibrated draft logits, with bfloat16 parameters and cache: every product with a weight
    matrix (a rank-2 operand) takes bfloat16 operands; logits come out float32, hidden states
    and K/V bfloat16."""
    cfg, target, dcfg, draft = tiny()
    bf = jnp.bfloat16
    target, draft = precision.cast_params(target, bf), precision.cast_params(draft, bf)
    b, t, w = 2, 8, dcfg.block_size
    lengths = jnp.asarray([5, 8], jnp.int32)
    tokens = jnp.ones((b, t), jnp.int32)
    cache = tf.init_cache(cfg, b, 32, bf)

    def prefill(target, draft, tokens, cache):
        lay = layouts.prefill_block(lengths, t, w)
        return tf.forward(
            cfg, target, tokens, lay.positions, lay.meta, cache, jnp.zeros_like(lengths),
            draft=draft, dcfg=dcfg, mask_positions=lay.mask_positions,
        )  # fmt: skip

    def step(target, draft, tokens, cache):
        lay = layouts.parallel(lengths, 2, 2, w)
        logits, hm, pending = tf.step_forward(
            cfg, target, tokens[:, :2], lay.positions, lay.meta, cache._replace(lengths=lengths),
            window=32, draft=draft, dcfg=dcfg, mask_positions=lay.mask_positions,
        )  # fmt: skip
        return logits, tf.draft_logits(cfg, target, draft, hm[:, :w], tokens[:, 0]), pending

    for fn in (prefill, step):
        closed = jax.make_jaxpr(fn)(target, draft, tokens, cache)
        dots = list(_dot_generals(closed.jaxpr))
        weights = [e for e in dots if any(v.aval.ndim == 2 for v in e.invars)]
        assert weights and len(weights) < len(dots)  # (the rest: attention, float32 inside)
        for eqn in weights:
            assert [v.aval.dtype for v in eqn.invars] == [bf, bf], eqn
    logits, hm, cache = jax.jit(prefill)(target, draft, tokens, cache)
    assert (logits.dtype, hm.dtype, cache.k.dtype, cache.v.dtype) == (jnp.float32, bf, bf, bf)
    logits, draft_logits, pending = jax.jit(step)(target, draft, tokens, cache)
    assert (logits.dtype, draft_logits.dtype) == (jnp.float32, jnp.float32)
    assert (pending.k.dtype, pending.v.dtype) == (bf, bf)


def test_load_draft_takes_the_targets_dtype(tmp_path):
    cfg, target, dcfg, draft = tiny()
    dtypes = lambda tree: {x.dtype for x in jax.tree.leaves(tree)}  # noqa: E731
    bf16 = precision.cast_params(target, jnp.bfloat16)
    made = loading.load_draft(None, cfg, bf16, depth=2, block_size=4, calib_rank=8).params
    assert dtypes(made) == {jnp.dtype(jnp.bfloat16)}
    made = loading.load_draft(None, cfg, bf16, depth=2, block_size=4, dtype="float32").params
    assert dtypes(made) == {jnp.dtype(jnp.float32)}
    path = release.save_release(str(tmp_path / "release"), cfg, dcfg, draft, dtype="bfloat16")
    assert dtypes(loading.load_draft(path, cfg, bf16).params) == {jnp.dtype(jnp.bfloat16)}
    assert dtypes(loading.load_draft(path, cfg, None).params) == {jnp.dtype(jnp.float32)}


def test_match_rate_counts_tokens_before_the_first_difference():
    assert ar.match_rate([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]]) == 1.0
    assert ar.match_rate([[1, 9, 3], [4, 5]], [[1, 2, 3], [4, 5]]) == 3 / 5  # 3 after 9 is luck
    assert ar.match_rate([[1, 2]], [[1, 2, 3, 4]]) == 0.5
    with pytest.raises(ValueError, match="2 sequences against 1"):
        ar.match_rate([[1], [2]], [[1]])


def teacher_forced(cfg, target, prompt, output) -> np.ndarray:
    """float32 logits [len(output), V]: the target over prompt + output in one causal pass, row i
    predicting output[i]."""
    seq = jnp.asarray([list(prompt) + list(output)], jnp.int32)
    lay = layouts.causal(jnp.zeros((1,), jnp.int32), seq.shape[1])
    logits, _, _ = tf.forward(cfg, target, seq, lay.positions, lay.meta, None)
    return np.asarray(logits[0, len(prompt) - 1 : -1], np.float32)


@pytest.mark.slow
def test_bfloat16_decoding_on_cpu():  # ~20 s
    """bfloat16 target, draft and cache; flex, sequential and parallel through the device loop
    (16 steps per call) against bfloat16 AR: the token match rate is reported, every committed
    token is a greedy choice up to bfloat16 ties, and a decode parts from AR only at a tie."""
    cfg, target, dcfg, draft = tiny()
    bf = jnp.bfloat16
    target, draft = precision.cast_params(target, bf), precision.cast_params(draft, bf)
    n = 40
    ref = ar.generate(cfg, target, PROMPTS, n, eos_ids=())
    # The tie band's premise, on AR's output: bfloat16 against float32 arithmetic on one row.
    exact = precision.cast_params(target, jnp.float32)
    gap = max(
        float(np.abs(teacher_forced(cfg, target, p, o) - teacher_forced(cfg, exact, p, o)).max())
        for p, o in zip(PROMPTS, ref.tokens)
    )
    assert gap < BF16_TIE / 2, gap
    b = len(PROMPTS)
    times = {"ar1": 1.0, "seq2": 1.2, "seq4": 1.5, "par2": 1.1, "par4": 1.4}
    profiles = {b: CostProfile(b, times, 0.3)}
    rates, argmax, accepted = {}, {}, {}
    for mode in ("flex", "sequential", "parallel"):
        dec = Decoder(
            cfg, target, draft, dcfg,
            engine.EngineConfig(mode=mode, alpha_prior_weight=0.5),  # flex switches branches
            cache_len=128, eos_ids=(), profiles=profiles,
            run=RunConfig(steps_per_call=16, dispatch="device"),
        )  # fmt: skip
        gen = dec.generate(PROMPTS, n)
        assert [len(t) for t in gen.tokens] == [n] * b
        rates[mode] = ar.match_rate(gen.tokens, ref.tokens)
        accepted[mode] = sum(gen.stats["per_position_acceptance"])
        hits = 0
        for prompt, out, want in zip(PROMPTS, gen.tokens, ref.tokens):
            z = teacher_forced(cfg, target, prompt, out)
            chosen = z[np.arange(n), out]
            assert (chosen >= z.max(axis=1) - BF16_TIE).all(), (mode, prompt)
            hits += int((chosen == z.max(axis=1)).sum())
            k = next((i for i, (x, y) in enumerate(zip(out, want)) if x != y), None)
            if k is not None:  # same prefix up to k: both choices must tie at row k
                assert abs(z[k, out[k]] - z[k, want[k]]) <= BF16_TIE, (mode, prompt, k)
        argmax[mode] = hits / (b * n)
    print(f"bfloat16 token match rate against bfloat16 AR: {rates}")
    print(f"committed tokens that are the teacher-forced argmax exactly: {argmax}")
    assert min(rates.values()) >= 0.5, rates
    assert min(accepted.values()) > 0, accepted  # drafts were accepted: not all AR-like steps
