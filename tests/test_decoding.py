"""Flex decoding engine against its slow twin, plain AR decoding (issue: flex decoding engine).

Greedy speculative decoding in every mode must reproduce AR greedy token for token; parallel and
sequential must agree step for step (sampling against the exact distribution:
test_sampling_exact.py); a decode compiles a fixed set of functions; the flex policy follows the
cost profile.
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexdraft_jax.decoding import ar, engine, policy
from flexdraft_jax.decoding import decoder as decoder_mod
from flexdraft_jax.decoding.decoder import CostProfile, Decoder, RunConfig
from flexdraft_jax.decoding.sampling import SamplingParams
from flexdraft_jax.models import transformer as tf
from flexdraft_jax.models.config import DraftConfig, ModelConfig
from flexdraft_jax.models.draft import Draft

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4], [9, 9, 9, 9, 9], [2, 7]]


def tiny(vocab=64, arch="llama", seed=0, peaky=50.0):
    cfg = ModelConfig(
        arch=arch,
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        attention_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
    )
    target = tf.init_target(cfg, jax.random.PRNGKey(seed))
    # A peaky embedding makes greedy continuations repetitive, so drafts are sometimes accepted
    # and both the accept and the reject paths run.
    target["embed"]["embedding"] = target["embed"]["embedding"] * peaky
    return cfg, target


def random_draft(cfg, target, block_size, depth=2, noise=0.01, seed=1):
    dcfg = DraftConfig(depth=depth, block_size=block_size, calib_rank=16)
    draft = tf.init_draft(cfg, dcfg, target, jax.random.PRNGKey(seed))
    leaves, tree = jax.tree.flatten(draft)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [x + noise * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return dcfg, jax.tree.unflatten(tree, leaves)


DEVICE = RunConfig(dispatch="device")  # the compiled loop ("auto" is host dispatch on a CPU)


def decoder(cfg, target, draft, dcfg, **kw):
    cache_len = kw.pop("cache_len", 128)
    run = kw.pop("run", DEVICE)
    return Decoder(
        cfg, target, draft, dcfg, engine.EngineConfig(**kw), cache_len=cache_len, eos_ids=(),
        run=run,
    )  # fmt: skip


def forced(dec, st, state, branch):
    """One compiled step of `branch` (forced), as profiling runs it."""
    costs = jnp.zeros(len(st.branches) + 1, jnp.float32)
    window = engine.kv_window(np.asarray(state.cache.lengths), st.width, dec.cache_len)
    idx = jnp.int32(st.branches.index(branch))
    return engine.step(st, dec.target, dec.draft, state, costs, idx, window)[0]


@pytest.fixture(scope="module")
def tiny_llama():
    return tiny()


@pytest.mark.parametrize("block_size", [4, 8])
@pytest.mark.parametrize("threshold", [0.0, 0.01])
def test_greedy_all_modes_equal_ar(tiny_llama, block_size, threshold):
    cfg, target = tiny_llama
    dcfg, draft = random_draft(cfg, target, block_size)
    ref = ar.generate(cfg, target, PROMPTS, 24, eos_ids=())
    accepted = 0
    for mode in ("sequential", "parallel", "flex"):
        gen = decoder(cfg, target, draft, dcfg, mode=mode, threshold=threshold).generate(
            PROMPTS, 24
        )
        assert gen.tokens == ref.tokens, mode
        accepted += sum(gen.stats["per_position_acceptance"])
    assert accepted > 0  # the accept path ran, not only rejections


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_greedy_other_architectures(arch):
    cfg, target = tiny(arch=arch, seed=3)
    dcfg, draft = random_draft(cfg, target, 4)
    ref = ar.generate(cfg, target, PROMPTS[:4], 16, eos_ids=())
    gen = decoder(cfg, target, draft, dcfg, mode="flex", threshold=0.0).generate(PROMPTS[:4], 16)
    assert gen.tokens == ref.tokens


def test_parallel_and_sequential_agree_step_for_step(tiny_llama):
    cfg, target = tiny_llama
    dcfg, draft = random_draft(cfg, target, 8, seed=5)
    runs = [
        decoder(cfg, target, draft, dcfg, mode=m, threshold=0.01).generate(PROMPTS, 30)
        for m in ("sequential", "parallel")
    ]
    assert runs[0].tokens == runs[1].tokens
    assert runs[0].stats["committed_per_step"] == runs[1].stats["committed_per_step"]
    assert runs[0].stats["per_position_acceptance"] == runs[1].stats["per_position_acceptance"]
    assert max(max(c) for c in runs[0].stats["committed_per_step"]) > 1


def test_eos_and_max_tokens_stop_each_sequence(tiny_llama):
    cfg, target = tiny_llama
    dcfg, draft = random_draft(cfg, target, 4)
    ref = ar.generate(cfg, target, PROMPTS, 12, eos_ids=())
    eos = ref.tokens[1][3]  # a token the second sequence emits early
    want = ar.generate(cfg, target, PROMPTS, 12, eos_ids=(eos,))
    dec = Decoder(
        cfg,
        target,
        draft,
        dcfg,
        engine.EngineConfig(mode="parallel"),
        cache_len=128,
        eos_ids=(eos,),
    )
    gen = dec.generate(PROMPTS, 12)
    assert gen.tokens == want.tokens
    assert len(gen.tokens[1]) <= 4 and gen.tokens[1][-1] == eos
    assert all(len(t) <= 12 for t in gen.tokens)


def test_greedy_with_a_restricted_draft_vocabulary_equals_ar(tiny_llama):
    cfg, target = tiny_llama
    dcfg, draft = random_draft(cfg, target, 4)
    ref = ar.generate(cfg, target, PROMPTS, 24, eos_ids=())
    emitted = np.unique(np.concatenate([np.asarray(t) for t in ref.tokens]))
    # Half of the tokens the target emits are left out of the draft vocabulary.
    keep = np.concatenate([emitted[::2], np.setdiff1d(np.arange(cfg.vocab_size), emitted)])
    vocab = np.concatenate([keep, emitted[1::2]]).astype(np.int32)
    for mode in ("sequential", "parallel", "flex"):
        dec = decoder(
            cfg, target, Draft(draft, dcfg, vocab=vocab), None, mode=mode, threshold=0.0,
            draft_vocab_size=len(keep),
        )  # fmt: skip
        gen = dec.generate(PROMPTS, 24)
        assert gen.tokens == ref.tokens, mode
        if mode != "flex":  # (flex may find that speculating does not pay on this tiny model)
            assert sum(gen.stats["per_position_acceptance"]) > 0
    full = decoder(cfg, target, Draft(draft, dcfg, vocab=vocab), None, mode="sequential",
                   threshold=0.0, draft_vocab_size=0)  # fmt: skip
    assert "head" not in full.draft and full.draft.keys() == draft.keys()


def test_default_draft_vocabulary_is_the_one_the_draft_was_trained_over(tiny_llama, monkeypatch):
    """No explicit size: the release's recorded size (0 = all), else DEFAULT_DRAFT_VOCAB capped at
    the vocabulary; an explicit size overrides the record. The engine config says which it used."""
    cfg, target = tiny_llama
    dcfg, draft = random_draft(cfg, target, 4)
    vocab = np.random.default_rng(1).permutation(cfg.vocab_size).astype(np.int32)

    def used(extra, **kw):
        dec = decoder(
            cfg, target, Draft(draft, dcfg, vocab=vocab, **extra), None, mode="flex", **kw
        )
        n = dec.draft["head"]["ids"].size if "head" in dec.draft else 0
        assert dec.ecfg.draft_vocab_size == n
        if n:
            np.testing.assert_array_equal(dec.draft["head"]["ids"], vocab[:n])
        return n

    assert used({"vocab_size": 7}) == 7
    assert used({"vocab_size": 0}) == 0
    assert used({"vocab_size": 7}, draft_vocab_size=5) == 5
    assert used({"vocab_size": 7}, draft_vocab_size=0) == 0
    monkeypatch.setattr(engine, "DEFAULT_DRAFT_VOCAB", 11)  # the real one exceeds this vocabulary
    assert used({}) == 11
    monkeypatch.setattr(engine, "DEFAULT_DRAFT_VOCAB", cfg.vocab_size)
    assert used({}) == 0


# ----------------------------------------------------------------------------- compilation


@pytest.mark.parametrize("dispatch", ["auto", "device"])
def test_fixed_number_of_compilations(tiny_llama, dispatch):
    """After `precompile`, decodes of any length and acceptance pattern compile nothing."""
    cfg, target = tiny_llama
    dcfg, draft = random_draft(cfg, target, 4)
    _, other_draft = random_draft(cfg, target, 4, noise=0.5, seed=9)  # different acceptance
    jax.clear_caches()  # an earlier test may have compiled this configuration already
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: compiles.append(name) if "backend_compile" in name else None
    )
    profile = {
        5: CostProfile(5, {"ar1": 1.0, "seq2": 1.1, "seq4": 1.3, "par2": 1.05, "par4": 1.2}, 0.2)
    }
    dec = Decoder(
        cfg,
        target,
        draft,
        dcfg,
        engine.EngineConfig(mode="flex"),
        cache_len=128,
        eos_ids=(),
        profiles=profile,
        run=RunConfig(dispatch=dispatch),
    )
    dec.generate(PROMPTS, 8)
    lazily = len(compiles)
    dec.precompile(dec.start(PROMPTS, 31))
    first = len(compiles)
    assert 0 < lazily <= first  # a decode compiles what it reaches; precompile the rest
    for n, d in [(3, draft), (20, other_draft), (31, draft)]:
        dec.draft = d
        gen = dec.generate([p[::-1] for p in PROMPTS], n)
        assert all(len(t) == n for t in gen.tokens)
    assert len(compiles) == first, compiles[first:]


# ----------------------------------------------------------------------------- flex policy


def test_flex_follows_cost_profile(tiny_llama):
    cfg, target = tiny_llama
    dcfg, draft = random_draft(cfg, target, 4)
    b = len(PROMPTS)

    def run(times, draft_pass=0.1, d=draft, **kw):
        prof = {b: CostProfile(b, times, draft_pass)}
        dec = Decoder(
            cfg,
            target,
            d,
            dcfg,
            engine.EngineConfig(mode="flex", threshold=0.0, **kw),
            cache_len=128,
            eos_ids=(),
            profiles=prof,
        )
        return dec.generate(PROMPTS, 30).stats

    cheap_par = run({"ar1": 1.0, "seq2": 3.0, "seq4": 3.0, "par2": 3.0, "par4": 0.5})
    assert set(cheap_par["branch_per_step"]) == {"par4"}
    expensive = {"ar1": 1.0, "seq2": 9.0, "seq4": 9.0, "par2": 9.0, "par4": 9.0}
    # A probe costs 8 extra AR steps: with a 3% budget it waits 8 / 0.03 AR steps, so a 30-token
    # decode never probes; with the whole budget it probes every `probe_interval` = 16 steps.
    assert set(run(expensive)["branch_per_step"]) == {"ar1"}
    steps = run(expensive, probe_budget=1.0)["branch_per_step"]
    assert steps[:16] == ["ar1"] * 16 and steps[16] != "ar1", steps
    # Speculation predicted 3% faster than AR (acceptance 0.5 per slot: 1.875 tokens for seq4 at
    # 1.82 AR steps) runs only without a margin; the default 5% margin keeps AR. (Expected tokens
    # from the acceptance alone: with "confidence" they would rest on this draft's confidences.)
    near = {"ar1": 1.0, "seq2": 9.0, "seq4": 1.875 / 1.03, "par2": 9.0, "par4": 9.0}
    kw = dict(gain="acceptance")
    assert run(near, spec_margin=0.0, **kw)["branch_per_step"][0] == "seq4"
    assert run(near, **kw)["branch_per_step"][0] == "ar1"
    assert run({**near, "seq4": 1.875 / 1.10}, **kw)["branch_per_step"][0] == "seq4"
    # Low acceptance (a draft unrelated to the target): flex learns alpha and stops speculating.
    _, bad = random_draft(cfg, target, 4, noise=2.0, seed=21)
    low = run({"ar1": 1.0, "seq2": 1.4, "seq4": 1.8, "par2": 1.5, "par4": 1.9}, d=bad)
    tail = low["branch_per_step"][5:]
    assert tail.count("ar1") > len(tail) // 2, low["branch_per_step"]


# ----------------------------------------------------------------------------- bad input


def test_bad_input_errors(tiny_llama):
    cfg, target = tiny_llama
    dcfg, draft = random_draft(cfg, target, 8)
    with pytest.raises(ValueError, match="block_size 8 leaves no room"):
        Decoder(cfg, target, draft, dcfg, cache_len=9)
    dec = decoder(cfg, target, draft, dcfg, mode="parallel", cache_len=32)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        dec.generate([[1, 2], []], 4)
    with pytest.raises(ValueError, match="exceeds the KV cache capacity"):
        dec.generate([[1] * 20], 10)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        engine.EngineConfig(mode="fast")
    with pytest.raises(ValueError, match="outside"):
        dec.generate([[1, 999]], 4)


# ----------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    from flexdraft_jax.recipes import loading

    return loading.load_target(None)


@pytest.mark.parametrize("mode,block_size,threshold", [("flex", 8, 0.01), ("parallel", 4, 0.0)])
def test_smollm2_untrained_draft_is_lossless(smollm2, mode, block_size, threshold):
    from flexdraft_jax.recipes import loading

    cfg, target, tok = smollm2
    prompts = loading.encode(
        tok,
        ["What is 2+2?", "Write a Python function to add numbers.", "Name three colors.", "Hi"],
        chat=True,
    )
    ref = ar.generate(cfg, target, prompts, 16, eos_ids=())
    draft = loading.load_draft(None, cfg, target, depth=6, block_size=block_size)
    dcfg = draft.config
    prof = {
        4: CostProfile(
            4, {f"{k}{r}": 1.0 + 0.1 * r for k in ("ar", "seq", "par") for r in (1, 2, 4, 8)}, 0.3
        )
    }
    dec = Decoder(
        cfg,
        target,
        draft,
        dcfg,
        engine.EngineConfig(mode=mode, threshold=threshold),
        cache_len=256,
        eos_ids=(),
        profiles=prof,
    )
    assert dec.generate(prompts, 16).tokens == ref.tokens


def test_acceptance_estimate_starts_at_the_drafts_prior_and_forgets(tiny_llama):
    """The cost model's acceptance per position: the draft's recorded prior, moved by verified
    positions as (discounted hits + w * prior) / (discounted tries + w); steps without
    verification (AR) only discount, so the estimate drifts back to the prior."""
    cfg, target = tiny_llama
    dcfg, draft = random_draft(cfg, target, 4, seed=7)
    prior = (0.9, 0.8, 0.7)
    ecfg = engine.EngineConfig(mode="flex", alpha_decay=0.5, alpha_prior_weight=2.0)
    dec = Decoder(
        cfg, target, Draft(draft, dcfg, acceptance=prior), None, ecfg, cache_len=128,
        eos_ids=(), profiles={len(PROMPTS): CostProfile(len(PROMPTS), {}, 0.0)},
    )  # fmt: skip
    assert dec.ecfg.alpha_init == prior and dec.draft.keys() == draft.keys()
    st = dec.static(len(PROMPTS))
    state, _ = dec._prefill(st, PROMPTS, 20, 0)
    np.testing.assert_allclose(state.stats.alpha, prior, rtol=1e-6)
    prior = np.asarray(prior)
    state = forced(dec, st, state, ("seq", 4))
    hits, tried = (
        np.asarray(state.stats.hits, np.float64),
        np.asarray(state.stats.tried, np.float64),
    )
    assert tried[0] == len(PROMPTS)  # the first position is verified in every sequence
    want = (hits + 2.0 * prior) / (tried + 2.0)
    np.testing.assert_allclose(state.stats.alpha, want, rtol=1e-5)
    state = forced(dec, st, state, ("ar", 1))
    want = (0.5 * hits + 2.0 * prior) / (0.5 * tried + 2.0)
    np.testing.assert_allclose(state.stats.alpha, want, rtol=1e-5)
    after_seq = (hits + 2.0 * prior) / (tried + 2.0)
    assert (np.abs(want - prior) <= np.abs(after_seq - prior)).all()  # back toward the prior
    # Without a recorded prior: 0.5 everywhere; a prior for another block size: its mean.
    assert Decoder(cfg, target, draft, dcfg, ecfg).ecfg.alpha_init == 0.5
    other = Draft(draft, dcfg, acceptance=(0.2, 0.4))
    assert Decoder(cfg, target, other, ecfg=ecfg).ecfg.alpha_init == pytest.approx(0.3)
    for bad in (dict(alpha_decay=0.0), dict(alpha_prior_weight=0.0), dict(alpha_init="conf")):
        with pytest.raises(ValueError, match="alpha"):
            engine.EngineConfig(**bad)


def test_the_prior_is_the_prefill_confidence_scaled_as_the_release_records(tiny_llama):
    """A draft recording its held-out acceptance and prefill confidence: `Decoder` resolves the
    scale acceptance / confidence, and a prefill's prior is its own drafts' mean confidence
    times that scale (clipped), the same for speculation's gain before any verify; lossless."""
    cfg, target = tiny_llama
    dcfg, draft = random_draft(cfg, target, 4, seed=7)
    acc, conf = (0.6, 0.4, 0.2), (0.3, 0.4, 0.5)
    ecfg = engine.EngineConfig(mode="flex", buckets=(2, 4))
    b = len(PROMPTS)
    dec = Decoder(
        cfg, target, Draft(draft, dcfg, acceptance=acc, prefill_confidence=conf), None, ecfg,
        cache_len=128, eos_ids=(),
        profiles={b: CostProfile(b, {"ar1": 1.0, "seq2": 1.0, "seq4": 1.0, "par2": 9.0,
                                     "par4": 9.0}, 0.1)},
    )  # fmt: skip
    np.testing.assert_allclose(dec.ecfg.alpha_scale, [2.0, 1.0, 0.4])
    st = dec.static(b)
    state, _ = dec._prefill(st, PROMPTS, 12, 0)
    mean_conf = np.asarray(state.block.conf).mean(0)
    want = np.clip(np.minimum(mean_conf * [2.0, 1.0, 0.4], 1.25 * np.array(acc)), 0.05, 0.95)
    np.testing.assert_allclose(state.stats.alpha_prior, want, rtol=1e-5)
    np.testing.assert_allclose(state.stats.alpha, want, rtol=1e-5)
    gain = 1 + np.cumsum(np.cumprod(np.clip(np.asarray(state.block.conf) * [2.0, 1.0, 0.4], 0, 1),
                                    axis=1), axis=1).mean(0)  # fmt: skip
    np.testing.assert_allclose(state.block.gain[1:], gain, rtol=1e-5)
    want_tokens = ar.generate(cfg, target, PROMPTS, 12, eos_ids=()).tokens
    assert dec.generate(PROMPTS, 12).tokens == want_tokens
    # Without the confidence, the recorded acceptance alone; a scale must be positive.
    plain = Decoder(cfg, target, Draft(draft, dcfg, acceptance=acc), None, ecfg, cache_len=128)
    assert plain.ecfg.alpha_scale is None and plain.ecfg.alpha_init == acc
    with pytest.raises(ValueError, match="alpha_scale"):
        engine.EngineConfig(alpha_scale=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="alpha_lift"):
        engine.EngineConfig(alpha_lift=0.5)
    # Confident drafts lift the prior at most to alpha_lift x the recorded acceptance.
    lifted = policy.scaled_prior(dec.ecfg, 4, jnp.ones(3))
    np.testing.assert_allclose(lifted, [0.75, 0.5, 0.25], rtol=1e-6)


def test_a_prefilled_batch_decodes_again_from_the_same_state(tiny_llama):
    """`start` prefills once; `decode` runs from a copy (benchmark repeats), or consumes it."""
    cfg, target = tiny_llama
    dcfg, draft = random_draft(cfg, target, 4, seed=7)
    costs = {"ar1": 1.0, "seq2": 1.1, "seq4": 1.2, "par2": 1.1, "par4": 1.3}
    prof = {len(PROMPTS): CostProfile(len(PROMPTS), costs, 0.2)}
    ecfg = engine.EngineConfig(mode="flex", buckets=(2, 4))
    dec = Decoder(cfg, target, draft, dcfg, ecfg, cache_len=128, eos_ids=(), profiles=prof)
    pre = dec.start(PROMPTS, 12)
    first, again = dec.decode(pre), dec.decode(pre, reuse=False)
    want = ar.generate(cfg, target, PROMPTS, 12, eos_ids=()).tokens
    assert first.tokens == again.tokens == dec.generate(PROMPTS, 12).tokens == want
    assert first.stats["branch_per_step"] == again.stats["branch_per_step"]
    assert first.stats["prefill_seconds"] == again.stats["prefill_seconds"] > 0
    assert_step_times(again.stats)


def test_a_capped_prefilled_batch_decodes_a_prefix_and_leaves_the_batch_intact(tiny_llama):
    """A warm-up decode of 2 tokens from a prefilled batch; the batch then decodes in full."""
    cfg, target = tiny_llama
    dcfg, draft = random_draft(cfg, target, 4, seed=7)
    dec = Decoder(cfg, target, draft, dcfg, engine.EngineConfig(mode="sequential"),
                  cache_len=128, eos_ids=())  # fmt: skip
    want = ar.generate(cfg, target, PROMPTS, 12, eos_ids=()).tokens
    pre = dec.start(PROMPTS, 12)
    for n in (2, 1):
        short = dec.decode(pre.capped(n), reuse=True)
        assert short.tokens == [w[:n] for w in want]
    assert pre.capped(50).max_new_tokens == 12
    assert dec.decode(pre, reuse=False).tokens == want


def test_a_decode_follows_the_profile_as_it_is_when_it_decodes(tiny_llama):
    """A benchmark refines its cost profile after prefilling the first batches: their decodes
    must choose branches by the refined profile."""
    cfg, target = tiny_llama
    dcfg, draft = random_draft(cfg, target, 4, seed=7)
    b = len(PROMPTS)
    cheap = {"ar1": 1.0, "seq2": 1.0, "seq4": 1.0, "par2": 9.0, "par4": 9.0}
    dear = {k: 1.0 if k == "ar1" else 50.0 for k in cheap}
    ecfg = engine.EngineConfig(mode="flex", buckets=(2, 4))
    dec = Decoder(cfg, target, draft, dcfg, ecfg, cache_len=128, eos_ids=(),
                  profiles={b: CostProfile(b, dear, 5.0)})  # fmt: skip
    pre = dec.start(PROMPTS, 8)
    assert set(dec.decode(pre).stats["branch_per_step"]) == {"ar1"}
    dec.profiles[b] = CostProfile(b, cheap, 0.1)
    assert "ar1" not in dec.decode(pre).stats["branch_per_step"][:1]


def test_expected_tokens_of_the_drafts_in_hand(tiny_llama):
    """Block.gain: per sequence 1 + sum_v prod_j (confidence_j * ratio_j), ratio_j the
    discounted (accepted + w * prior) / (tried confidence + w * prior) of position j, averaged
    over active sequences; 1 (the draft's confidence as it is) before any verification."""
    cfg, target = tiny_llama
    dcfg, draft = random_draft(cfg, target, 4, noise=0.002, seed=3)
    b = len(PROMPTS)
    ecfg = engine.EngineConfig(mode="flex", alpha_init=(0.6, 0.5, 0.4), alpha_prior_weight=2.0)
    dec = Decoder(cfg, target, draft, dcfg, ecfg, cache_len=128, eos_ids=(),
                  profiles={b: CostProfile(b, {}, 0.0)})  # fmt: skip
    st = dec.static(b)

    def want(state):
        conf, seen = (
            np.asarray(state.block.conf, np.float64),
            np.asarray(state.stats.seen, np.float64),
        )
        w0 = 2.0 * np.asarray(state.stats.alpha_prior, np.float64)
        a = np.clip(conf * (seen[0] + w0) / (seen[2] + w0), 0.0, 1.0)
        per_seq = 1.0 + np.cumsum(np.cumprod(a, axis=1), axis=1)
        active = ~np.asarray(state.output.done)
        return np.concatenate([[1.0], per_seq[active].mean(axis=0)])

    state, _ = dec._prefill(st, PROMPTS, 20, 0)
    assert float(np.asarray(state.block.conf).min()) > 0 and not np.asarray(state.stats.seen).any()
    np.testing.assert_allclose(state.block.gain, want(state), rtol=1e-5)
    state = forced(dec, st, state, ("seq", 4))
    seen = np.asarray(state.stats.seen)
    assert seen[1, 0] == b and 0 < seen[2, 0] <= b  # tries and their confidence, position 1
    np.testing.assert_allclose(state.block.gain, want(state), rtol=1e-5)


def test_flex_verifies_confident_drafts_further(tiny_llama):
    """Whether to speculate rests on the running acceptance; which speculative branch, on the
    drafts in hand: a confident block takes the longer verify, a doubtful one the shorter
    (with gain "acceptance", the same branch either way)."""
    cfg, target = tiny_llama
    dcfg, draft = random_draft(cfg, target, 4)
    b = len(PROMPTS)
    dec = Decoder(cfg, target, draft, dcfg, engine.EngineConfig(mode="flex"), cache_len=128,
                  eos_ids=())  # fmt: skip
    st = dec.static(b)
    names = [decoder_mod.branch_name(x) for x in st.branches]
    costs = jnp.asarray([1.0, 1.3, 1.5, 9.0, 9.0, 0.3])  # ar1 seq2 seq4 par2 par4, draft pass
    assert names == ["ar1", "seq2", "seq4", "par2", "par4"]
    confident = jnp.asarray([1.0, 1.9, 2.8, 3.7])
    doubtful = jnp.asarray([1.0, 1.4, 1.45, 1.46])

    def pick(gain, alpha, has_drafts=True, st=st):
        return names[int(policy.choose(
            st.branches, st.ecfg, jnp.int32(3), jnp.array(has_drafts), jnp.asarray(alpha), gain,
            jnp.int32(0), jnp.int32(16), costs,
        ))]  # fmt: skip

    good = [0.8, 0.7, 0.6]  # seq4 at 2.78 tokens / 1.5 beats AR
    assert pick(confident, good) == "seq4" and pick(doubtful, good) == "seq2"
    assert pick(doubtful, [0.1, 0.1, 0.1]) == "ar1" == pick(confident, [0.1, 0.1, 0.1])
    assert pick(doubtful, good, has_drafts=False) == "seq4"  # no drafts: by the acceptance
    by_acceptance = dataclasses.replace(st, ecfg=dataclasses.replace(st.ecfg, gain="acceptance"))
    assert pick(doubtful, good, st=by_acceptance) == "seq4"
    with pytest.raises(ValueError, match="gain"):
        engine.EngineConfig(gain="conf")


def test_flex_prefills_without_drafts_when_it_would_start_in_ar(tiny_llama):
    """Where even drafts in hand would not pay, flex prefills like AR (no mask block) and stays
    lossless; a later speculative step drafts first. Otherwise (and with the prior unknown
    before the prefill) it drafts in the prefill."""
    cfg, target = tiny_llama
    dcfg, draft = random_draft(cfg, target, 4, seed=7)
    b = len(PROMPTS)
    cheap = {"ar1": 1.0, "seq2": 1.0, "seq4": 1.0, "par2": 9.0, "par4": 9.0}
    dear = {k: 1.0 if k == "ar1" else 50.0 for k in cheap}
    want = ar.generate(cfg, target, PROMPTS, 12, eos_ids=()).tokens
    for costs, alpha_init, drafts in (
        (dear, 0.5, False), (cheap, 0.5, True), (dear, None, True),
    ):  # fmt: skip
        # (The random draft's confidence is near 0: expected tokens from the acceptance prior.)
        ecfg = engine.EngineConfig(
            mode="flex", buckets=(2, 4), alpha_init=alpha_init, gain="acceptance"
        )
        dec = Decoder(cfg, target, draft, dcfg, ecfg, cache_len=128, eos_ids=(),
                      profiles={b: CostProfile(b, costs, 0.1)})  # fmt: skip
        pre = dec.start(PROMPTS, 12)
        assert bool(pre.state.block.has_drafts) == drafts == pre.drafts, (costs, alpha_init)
        assert dec.decode(pre).tokens == want and dec.current(pre)
        if alpha_init is not None:  # (None: the prior is the random draft's low confidence)
            dec.profiles[b] = CostProfile(b, cheap, 0.1)  # speculation pays: drafts first
            gen = dec.decode(pre)
            assert gen.tokens == want and gen.stats["branch_per_step"][0] != "ar1"
            # A prefill now would draft: `pre` is stale unless it drafted too.
            assert dec.current(pre) == drafts
    seq = Decoder(cfg, target, draft, dcfg, engine.EngineConfig(mode="sequential"),
                  cache_len=128, eos_ids=())  # fmt: skip
    assert bool(seq.start(PROMPTS, 12).state.block.has_drafts)


def test_prompt_width_buckets():
    """Quarter-octave widths: under a quarter of a prefill is padding, with few compilations."""
    widths = [ar.bucket(n) for n in range(1, 4097)]
    assert widths[:8] == [8] * 8 and ar.bucket(75) == 80 and ar.bucket(129) == 160
    for n, w in enumerate(widths, start=1):
        assert w >= n and (n <= 8 or w < 1.25 * n), (n, w)
    assert sorted(set(widths))[:13] == [8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64]
    assert len(set(widths)) == 4 * 9 + 1  # 4 per octave from 8 to 4096
    assert ar.bucket(3, minimum=16) == 16


def test_steps_per_call_changes_nothing_but_the_syncs(tiny_llama):
    """The device loop at 1, 3 and 16 steps per call and host dispatch: the same branches, tokens
    and acceptance (the policy, probing and running acceptance live on device)."""
    cfg, target = tiny_llama
    dcfg, draft = random_draft(cfg, target, 4, seed=7)
    prof = {
        len(PROMPTS): CostProfile(
            len(PROMPTS), {"ar1": 1.0, "seq2": 1.2, "seq4": 1.5, "par2": 1.1, "par4": 1.4}, 0.3
        )
    }
    runs = [
        Decoder(
            cfg,
            target,
            draft,
            dcfg,
            # A weak prior: the estimate follows what is accepted, so the policy switches.
            engine.EngineConfig(mode="flex", alpha_prior_weight=0.5),
            cache_len=128,
            eos_ids=(),
            profiles=prof,
            run=run,
        ).generate(PROMPTS, 20)
        for run in (
            RunConfig(steps_per_call=1, dispatch="device"),
            RunConfig(steps_per_call=3, dispatch="device"),
            RunConfig(steps_per_call=16, dispatch="device"),
            RunConfig(dispatch="host", lookahead=0),  # one executable per step
        )
    ]
    for other in runs[1:]:
        assert other.tokens == runs[0].tokens
        assert other.stats["branch_per_step"] == runs[0].stats["branch_per_step"]
        assert other.stats["committed_per_step"] == runs[0].stats["committed_per_step"]
        assert other.stats["branch_counts"] == runs[0].stats["branch_counts"]
    names = runs[0].stats["branch_per_step"]
    assert len(set(names)) > 1  # the policy really switched
    assert runs[0].stats["branch_counts"] == {
        n: names.count(n) for n in runs[0].stats["branch_counts"]
    }
    for run in runs:  # each step's wall time, adding up to the decode's
        assert_step_times(run.stats)


def assert_step_times(stats):
    steps = np.asarray(stats["step_seconds"])
    assert len(steps) == stats["steps"] and (steps > 0).all()
    decode = stats["seconds"] - stats["prefill_seconds"]
    assert steps.sum() == pytest.approx(decode, rel=0.05)


@pytest.mark.parametrize(
    "run, syncs",
    [
        (RunConfig(steps_per_call=3, dispatch="device"), 3),
        (RunConfig(dispatch="host", lookahead=0), 9),
    ],
)
def test_step_seconds_share_each_host_syncs_time(tiny_llama, monkeypatch, run, syncs):
    """A clock that ticks once per reading: the 9 steps of a 10-token AR decode at 3 steps per
    device call share each call's tick three ways; host dispatch syncs after every step. The
    decode's seconds run from the prefill (2 readings) through every sync to the end."""
    import types

    cfg, target = tiny_llama
    dcfg, _ = random_draft(cfg, target, 4)
    dec = decoder(cfg, target, None, dcfg, mode="ar", run=run)
    dec.generate(PROMPTS[:1], 10)  # compile first (compilation reads clocks of its own)
    ticks = iter(range(1000))
    clock = types.SimpleNamespace(perf_counter=lambda: next(ticks))
    monkeypatch.setattr(decoder_mod, "time", clock)
    stats = dec.generate(PROMPTS[:1], 10).stats
    assert stats["step_seconds"] == pytest.approx([syncs / 9] * 9)
    assert stats["prefill_seconds"] == 1 and stats["seconds"] == 1 + syncs + 1


def test_decodes_in_turns_are_lossless_and_time_their_own_steps(tiny_llama, monkeypatch):
    """AR and flex advanced step by step in turns (`decode_in_turns`, as the benchmark times
    them) give the tokens and branches each gives alone; with a clock that ticks once per
    reading, each decode's steps count only their own ticks, as alone, never the other's."""
    import types

    cfg, target = tiny_llama
    dcfg, draft = random_draft(cfg, target, 4, seed=7)
    host = RunConfig(dispatch="host", lookahead=0)
    prof = {
        1: CostProfile(1, {"ar1": 1.0, "seq2": 1.2, "seq4": 1.5, "par2": 1.1, "par4": 1.4}, 0.3)
    }
    decs = [
        Decoder(cfg, target, draft, dcfg, engine.EngineConfig(mode=m), cache_len=128,
                eos_ids=(), profiles=prof, run=host)
        for m in ("ar", "flex")
    ]  # fmt: skip
    pres = [d.start(PROMPTS[:1], 12) for d in decs]
    alone = [d.decode(p) for d, p in zip(decs, pres)]  # compiles every step they take
    assert alone[1].stats["steps"] < alone[0].stats["steps"]  # flex speculated
    ticks = iter(range(10**4))
    monkeypatch.setattr(
        decoder_mod, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks))
    )
    paired = decoder_mod.decode_in_turns(list(zip(decs, pres)))
    for one, two in zip(alone, paired):
        assert two.tokens == one.tokens
        assert two.stats["branch_per_step"] == one.stats["branch_per_step"]
        n = two.stats["steps"]  # one host sync per step: one tick between its two readings
        assert two.stats["step_seconds"] == [1] * n
        assert two.stats["seconds"] == two.stats["prefill_seconds"] + n + 1


@pytest.mark.parametrize("mode", ["ar", "flex"])
def test_lookahead_dispatch_is_lossless_and_stops_on_time(tiny_llama, mode):
    """The host queues step t+1 (with the branch chosen after step t-1) before reading step t:
    the same tokens as reading every step; a decode ended by the token budget runs no extra step,
    one ended by EOS at most one, which commits nothing."""
    cfg, target = tiny_llama
    dcfg, draft = random_draft(cfg, target, 4, seed=7)
    prof = {
        len(PROMPTS): CostProfile(
            len(PROMPTS), {"ar1": 1.0, "seq2": 1.2, "seq4": 1.5, "par2": 1.1, "par4": 1.4}, 0.3
        )
    }
    ref = ar.generate(cfg, target, PROMPTS, 20, eos_ids=())
    eos = ref.tokens[0][5]

    def run(lookahead, eos_ids):
        ecfg = engine.EngineConfig(mode=mode, alpha_prior_weight=0.5)
        dec = Decoder(
            cfg, target, draft, dcfg, ecfg, cache_len=128, eos_ids=eos_ids, profiles=prof,
            run=RunConfig(dispatch="host", lookahead=lookahead),
        )  # fmt: skip
        return dec.generate(PROMPTS, 20)

    for eos_ids in ((), (eos,)):
        want = ar.generate(cfg, target, PROMPTS, 20, eos_ids=eos_ids).tokens
        sync, lagged = run(0, eos_ids), run(1, eos_ids)
        assert sync.tokens == lagged.tokens == want
        assert_step_times(lagged.stats)
        per_step = np.asarray(lagged.stats["committed_per_step"]).sum(axis=0)
        assert (per_step[:-1] > 0).all()  # only the last step may be a no-op ...
        assert per_step[-1] > 0 or eos_ids  # ... and only when EOS ended the decode
        if mode == "ar":  # the same steps, plus at most that no-op
            extra = lagged.stats["steps"] - sync.stats["steps"]
            assert extra == (per_step[-1] == 0)
        if mode == "flex":
            names = lagged.stats["branch_per_step"]
            assert names[1] == names[0] and len(set(names)) > 1  # lagged choice, still switching
    with pytest.raises(ValueError, match="lookahead"):
        RunConfig(lookahead=-1)


def test_ar_cache_window_crossing_gives_the_same_tokens(tiny_llama, monkeypatch):
    """AR decode steps read the cache only up to the next multiple of ar.WINDOW: crossing window
    boundaries mid-generation gives the same tokens as reading the whole capacity."""
    cfg, target = tiny_llama
    rng = np.random.default_rng(3)
    prompts = [rng.integers(1, cfg.vocab_size, size=n).tolist() for n in (90, 101, 117)]
    monkeypatch.setattr(ar, "WINDOW", 32)  # windows 128, 160, 192 ... of a 512-slot cache
    windowed = ar.generate(cfg, target, prompts, 40, eos_ids=(), cache_len=512)
    monkeypatch.setattr(ar, "WINDOW", 10**6)  # the whole capacity every step
    whole = ar.generate(cfg, target, prompts, 40, eos_ids=(), cache_len=512)
    assert windowed.tokens == whole.tokens
    assert len(set(windowed.tokens[0])) > 3  # not a degenerate repetition


def test_cost_profiles_merge_to_the_faster_ar_step_and_the_mean_ratio():
    rows = {"seq2": (2, 2)}
    a = CostProfile(4, {"ar1": 2.0, "seq2": 4.0, "seq4": 5.0, "par2": 6.0, "par4": 8.0}, 1.0, rows)
    b = CostProfile(4, {"ar1": 1.0, "seq2": 3.0, "seq4": 2.0, "par2": 2.0}, 2.0)
    m = a.merged(b)
    # relative to AR: a 2, 2.5, 3, 4 (par4 measured in a only); b 3, 2, 2
    want = {"ar1": 1.0, "seq2": 2.5, "seq4": 2.25, "par2": 2.5, "par4": 4.0}
    assert m.branches == pytest.approx(want)
    assert m.draft_pass == pytest.approx(1.25)  # 0.5 and 2 AR steps
    assert m.rows == a.rows and m.batch_size == 4


def test_profile_times_speculative_steps_with_drafts_and_the_refill_apart(tiny_llama, monkeypatch):
    """A speculative step after an AR step first runs a draft pass. The profile times every
    speculative branch with its drafts in hand, and the draft pass as the difference of the
    first one's two runs (without drafts, then with), so no branch carries the refill's cost."""
    cfg, target = tiny_llama
    dcfg, draft = random_draft(cfg, target, 4)
    dec = decoder(cfg, target, draft, dcfg, mode="flex")
    st = dec.static(2)
    assert decoder_mod.profile_plan(st.branches) == [(0, "time"), (1, "refill")] + [
        (i, "time") for i in range(1, len(st.branches))
    ]
    assert decoder_mod.profile_plan((("seq", 2), ("seq", 4))) == [(0, "time"), (1, "time")]
    # A fake clock: each branch run advances it by that branch's cost, plus 5 without drafts,
    # twice that in a slow phase that starts with the first round's AR step, leaves the rest of
    # that round and covers the next two: only there is the AR step timed at its true cost.
    cost = {("ar", 1): 1.0, ("seq", 2): 2.0, ("seq", 4): 4.0, ("par", 2): 2.5, ("par", 4): 4.5}
    seen, force, clock = [], dec._force, [0.0]
    n = len(st.branches) + 1  # runs per round

    def recording(st_, idx, state, window):
        br, has = st_.branches[idx], bool(state.block.has_drafts)
        slow = 2.0 if len(seen) == 0 or len(seen) >= n else 1.0
        seen.append((br, has))
        clock[0] += slow * (cost[br] + (5.0 if br[0] != "ar" and not has else 0.0))
        return force(st_, idx, state, window)

    monkeypatch.setattr(dec, "_force", recording)
    monkeypatch.setattr(decoder_mod.time, "perf_counter", lambda: clock[0])
    prof = dec.measure(2, repeats=3)
    timed = seen  # compiled without a run: every run is timed
    assert len(timed) == 3 * n
    for rnd in (timed[k : k + n] for k in range(0, len(timed), n)):
        assert rnd[0][0] == ("ar", 1) and rnd[1] == (("seq", 2), False)
        assert rnd[2:] == [(br, True) for br in st.branches[1:]]
    # The AR step at its fastest (2, slow in every round); the rest at their median ratio to
    # the AR step of their round (by fastest samples alone they would read half that).
    want = {decoder_mod.branch_name(b): 2.0 * cost[b] for b in st.branches}
    assert prof.branches == pytest.approx(want)
    assert prof.draft_pass == pytest.approx(10.0)


# ----------------------------------------------------------------------------- the device loop


@pytest.mark.parametrize("batch", [pytest.param(1, marks=pytest.mark.slow), 4])
def test_every_mode_equals_ar_through_the_device_loop(tiny_llama, batch):
    """Greedy tokens of every mode, decoded by `engine.run` at 1 and 16 steps per call, equal
    plain AR's (float32)."""
    cfg, target = tiny_llama
    dcfg, draft = random_draft(cfg, target, 4, seed=7)
    prompts = PROMPTS[:batch]
    want = ar.generate(cfg, target, prompts, 20, eos_ids=()).tokens
    for mode in engine.MODES:
        for spc in (1, 16):
            gen = decoder(
                cfg,
                target,
                draft,
                dcfg,
                mode=mode,
                run=RunConfig(steps_per_call=spc, dispatch="device"),
            ).generate(prompts, 20)
            assert gen.tokens == want, (mode, spc)


def test_device_loop_crosses_cache_windows(tiny_llama):
    """Steps read a static window of the cache that covers the filled part; a decode that
    outgrows one window continues in the next (a new call) with the same tokens as AR."""
    cfg, target = tiny_llama
    dcfg, draft = random_draft(cfg, target, 4, seed=7)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(1, cfg.vocab_size, size=n).tolist() for n in (90, 101, 117)]
    assert engine.kv_window(np.array([117]), 8, 512) == 128
    assert engine.kv_window(np.array([117]), 64, 512) == 256
    assert engine.kv_window(np.array([117]), 64, 200) == 200
    want = ar.generate(cfg, target, prompts, 40, eos_ids=(), cache_len=512).tokens
    for mode in ("flex", "sequential"):
        dec = decoder(cfg, target, draft, dcfg, mode=mode, cache_len=512)
        assert dec.generate(prompts, 40).tokens == want, mode


def _hlo_ops_of_shape(hlo: str, shape: tuple, dtype: str = "f32") -> dict:
    """{op kind: count} of the instructions in optimized HLO text that produce `shape`."""
    pattern = re.compile(rf"{dtype}\[{','.join(map(str, shape))}\]")
    ops = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?\S+ = (\S+) ([\w-]+)\(", line)
        if m and pattern.search(m.group(1)):
            ops[m.group(2)] = ops.get(m.group(2), 0) + 1
    return ops


def test_the_compiled_loop_holds_no_copy_of_the_cache(tiny_llama):
    """The flex loop (every branch under lax.switch, in a while loop): no instruction copies a
    cache-sized buffer, the cache is written in place by one scatter per K and V, and the output
    cache aliases the donated input. A switch whose branches write the cache themselves does
    copy it (the check can fail)."""
    cfg, target = tiny_llama
    dcfg, draft = random_draft(cfg, target, 8)
    for batch in (1, 8):
        dec = decoder(cfg, target, draft, dcfg, mode="flex", cache_len=256)
        st = dec.static(batch)
        state, _ = dec._prefill(st, (PROMPTS * 2)[:batch], 16, 0)
        costs = jnp.ones(len(st.branches) + 1, jnp.float32)
        exe = engine.run.lower(st, target, draft, state, costs, 128, 16).compile()
        hlo = exe.as_text()
        shape = state.cache.k.shape
        ops = _hlo_ops_of_shape(hlo, shape)
        assert "copy" not in ops and ops.get("scatter", 0) + ops.get("fusion", 0) <= 4, ops
        n_before = len(jax.tree.leaves((target, draft)))  # the cache's k, v come next
        header = hlo.splitlines()[0]  # HloModule ..., input_output_alias={ {out}: (param, ...
        assert f"{{0}}: ({n_before}, {{}}" in header and f"{{1}}: ({n_before + 1}, {{}}" in header

    def writes_in_branches(cache, idx):
        return jax.lax.switch(
            idx, [lambda c: c.at[:, 0].set(1.0), lambda c: c.at[:, 1].set(2.0)], cache
        )

    cache = jnp.zeros((4, 8, 64, 2, 8))
    bad = jax.jit(writes_in_branches, donate_argnums=0).lower(cache, 0).compile().as_text()
    assert "copy" in _hlo_ops_of_shape(bad, cache.shape)


def test_generate_without_a_profile_measures_nothing(tiny_llama, monkeypatch, tmp_path):
    """Without a profile flex decodes by the estimate from bytes and FLOPs and says so; nothing
    is timed. `setup_profile("auto")` measures once and stores the profile; a later decoder of
    the same shape loads it."""
    cfg, target = tiny_llama
    dcfg, draft = random_draft(cfg, target, 4, seed=7)
    measured = []
    real_measure = Decoder.measure
    monkeypatch.setattr(
        Decoder, "measure", lambda self, *a, **k: measured.append(a) or real_measure(self, *a, **k)
    )
    dec = decoder(cfg, target, draft, dcfg, mode="flex")
    gen = dec.generate(PROMPTS, 12)
    assert measured == [] and gen.stats["cost_profile"] == "estimate"
    assert gen.tokens == ar.generate(cfg, target, PROMPTS, 12, eos_ids=()).tokens
    monkeypatch.setattr(decoder_mod.costs_lib, "DEFAULT_STORE", str(tmp_path))
    prof = dec.setup_profile(len(PROMPTS), "auto", repeats=1)
    assert len(measured) == 1 and prof.source == "measured" and len(os.listdir(tmp_path)) == 1
    again = decoder(cfg, target, draft, dcfg, mode="flex")
    assert again.setup_profile(len(PROMPTS), "auto") == prof and len(measured) == 1
    assert again.generate(PROMPTS, 12).stats["cost_profile"] == "measured"
    assert again.setup_profile(len(PROMPTS), "none").source == "measured"  # kept: in use


def test_cost_estimate_ranks_branches_by_rows_and_device(tmp_path):
    """More rows cost more; on a compute-poor CPU a parallel step over many rows costs several AR
    steps, on an accelerator nearly one; the estimate saves and loads like a measured one."""
    from flexdraft_jax.decoding import costs

    cfg = ModelConfig(
        arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, tie_word_embeddings=True,
    )  # fmt: skip
    dcfg = DraftConfig(depth=6, block_size=8)
    branches = engine.branches_for(engine.EngineConfig(), 8, 1)
    cpu = costs.estimate(cfg, dcfg, 1, branches, backend="cpu").relative()
    tpu = costs.estimate(cfg, dcfg, 1, branches, backend="tpu", itemsize=2).relative()
    assert cpu["seq2"] < cpu["seq4"] < cpu["seq8"] < cpu["par8"]
    assert 1.3 < cpu["seq4"] < 2.2 and cpu["par8"] > 2.0  # measured here: 1.65-1.86, 2.3
    assert tpu["par8"] < 1.6 and tpu["seq8"] < cpu["seq8"]
    big = costs.estimate(cfg, dcfg, 64, branches, backend="cpu").relative()
    assert big["seq4"] > cpu["seq4"]  # compute-bound at batch 64
    est = costs.estimate(cfg, dcfg, 4, branches)
    est.save(str(tmp_path / "p.json"))
    assert costs.CostProfile.load(str(tmp_path / "p.json")) == est and est.source == "estimate"
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a cost profile"):
        costs.CostProfile.load(str(tmp_path / "bad.json"))


SMOLLM2_CASES = [("flex", 3, 16)] + [
    pytest.param(m, b, spc, marks=pytest.mark.slow)
    for m, b, spc in [(m, b, 16) for m in engine.MODES for b in (1, 3)]
    + [("flex", 3, 1), ("flex", 3, "host")]
    if (m, b, spc) != ("flex", 3, 16)
]


_SMOLLM2_AR: dict = {}


@pytest.mark.parametrize("mode,batch,spc", SMOLLM2_CASES)
def test_smollm2_shipped_draft_equals_ar(smollm2, mode, batch, spc):
    """SmolLM2 with the shipped draft, through the device loop (spc steps per call; "host":
    host dispatch, the default on a CPU), 32 greedy tokens: every mode's tokens equal AR's, and
    the drafts are accepted (accepted positions counted, tau well above 1), so the accept paths
    run on the real model."""
    from flexdraft_jax.prompts import humaneval_prompts
    from flexdraft_jax.recipes import loading

    cfg, target, tok = smollm2
    prompts = loading.encode(tok, humaneval_prompts(3)[:batch], chat=True)
    if batch not in _SMOLLM2_AR:  # AR's tokens, once per batch size
        _SMOLLM2_AR[batch] = ar.generate(cfg, target, prompts, 32, eos_ids=())
    ref = _SMOLLM2_AR[batch]
    draft = loading.load_draft(loading.shipped_draft(None), cfg, target)
    assert draft.target is not None  # the shipped draft names its target, and this is it
    dcfg = draft.config
    # Speculation priced cheap, so flex and paper take speculative branches.
    costs = {f"{k}{r}": 1.0 + 0.05 * r for k in ("ar", "seq", "par") for r in (1, 2, 4, 8)}
    dec = Decoder(
        cfg, target, draft, dcfg, engine.EngineConfig(mode=mode), cache_len=256, eos_ids=(),
        profiles={batch: CostProfile(batch, costs, 0.1)},
        run=RunConfig(dispatch="host") if spc == "host" else RunConfig(spc, dispatch="device"),
    )  # fmt: skip
    gen = dec.generate(prompts, 32)
    assert gen.tokens == ref.tokens
    assert [len(t) for t in gen.tokens] == [32] * batch
    if mode != "ar":
        hits = np.asarray(gen.stats["per_position_acceptance"])
        assert hits[0] > 0 and gen.stats["tau"] > 1.3, (hits, gen.stats["tau"])
