"""Speculative sampling reproduces the target's distribution exactly (DESIGN §2.4).

On a 5-token vocabulary the target's joint distribution of the first n sampled tokens is computed
exactly, by running every continuation (5**n paths), and thousands of decodes are checked against
it with a chi-square test (p > 1e-3). Every mode and setting the engine has: parallel, sequential,
the paper's rule, flex switching between AR and speculative steps (so both device loops, the
switch and the draft pass after an AR step run), a threshold above 0, top-k, top-p, a restricted
draft vocabulary, the release's sample-and-match rule; through the device loop (`engine.run`),
and host dispatch for flex. No sample may fall on a
path of probability 0 (top-k and top-p zero some).

The test has power: the same statistic rejects (p < 1e-6) subtly wrong rules planted in the engine:
resampling from p after a rejection instead of norm(max(p - q, 0)), an unnormalised residual drawn
by inverse CDF, acceptance against the uncalibrated q (not the q the drafts were drawn from), and
accepting every draft.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexdraft_jax.decoding import engine, sampling, verify
from flexdraft_jax.decoding.decoder import CostProfile, Decoder, RunConfig
from flexdraft_jax.decoding.sampling import SamplingParams
from flexdraft_jax.models import layouts
from flexdraft_jax.models import transformer as tf
from flexdraft_jax.models.config import DraftConfig, ModelConfig
from flexdraft_jax.models.draft import Draft

PROMPT = [1, 3, 2]
SAMPLES = 6000  # decodes per check (one batch)
DEVICE = RunConfig(dispatch="device")  # the device loop, `engine.run` ("auto": host on a CPU)
P_OK, P_WRONG = 1e-3, 1e-6  # a correct rule passes above P_OK; a wrong one fails below P_WRONG
T1 = SamplingParams(temperature=1.0)


@pytest.fixture(scope="module")
def setup():
    cfg = ModelConfig(arch="llama", vocab_size=5, hidden_size=32, intermediate_size=64,
                      num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8)  # fmt: skip
    target = tf.init_target(cfg, jax.random.PRNGKey(11))
    # Peaky embeddings: the target's distributions are far from uniform, drafts often accepted.
    target["embed"]["embedding"] = target["embed"]["embedding"] * 20.0
    dcfg = DraftConfig(depth=2, block_size=4, calib_rank=16)
    draft = tf.init_draft(cfg, dcfg, target, jax.random.PRNGKey(12))
    # Noisy draft weights (the calibration MLP's output layer included, which starts at zero):
    # q differs from p, and calibration changes q.
    leaves, tree = jax.tree.flatten(draft)
    keys = jax.random.split(jax.random.PRNGKey(13), len(leaves))
    leaves = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return cfg, target, dcfg, jax.tree.unflatten(tree, leaves)


_EXACT: dict = {}


def exact_joint(cfg, target, n: int, sp: SamplingParams) -> np.ndarray:
    """p(t1..tn | PROMPT) over [V] * n, by running every continuation path (cached per target)."""
    key = (id(target), n, sp)
    if key not in _EXACT:
        paths = np.array(list(itertools.product(range(cfg.vocab_size), repeat=n)), np.int32)
        toks = np.concatenate([np.tile(PROMPT, (len(paths), 1)), paths], axis=1)
        lay = layouts.causal(jnp.zeros(len(toks), jnp.int32), toks.shape[1])
        logits, _ = tf.apply(cfg, target, jnp.asarray(toks), lay.positions, None, lay.meta)
        start = len(PROMPT) - 1
        p = np.asarray(sampling.probs(logits[:, start : start + n], sp), np.float64)  # [M, n, V]
        pr = np.prod(p[np.arange(len(paths))[:, None], np.arange(n)[None], paths], axis=1)
        _EXACT[key] = pr.reshape([cfg.vocab_size] * n) / pr.sum()
    return _EXACT[key]


def chi2_pvalue(counts, expected_p):
    """Pearson's chi-square p-value of `counts` against `expected_p`; cells expected below 5
    samples are pooled into one."""
    n = counts.sum()
    exp = expected_p.ravel() * n
    keep = exp >= 5
    stat = np.sum((counts.ravel()[keep] - exp[keep]) ** 2 / exp[keep])
    df = keep.sum() - 1
    rest_obs, rest_exp = counts.ravel()[~keep].sum(), exp[~keep].sum()
    if rest_exp > 0:
        stat += (rest_obs - rest_exp) ** 2 / rest_exp
        df += 1
    return float(jax.scipy.special.gammaincc(df / 2.0, stat / 2.0)), stat, df


def check(setup, *, n=3, seed=1, sp=T1, draft=None, run=DEVICE, profile=None, **ecfg):
    """(p-value, Generation) of SAMPLES decodes of PROMPT against the exact joint of n tokens."""
    cfg, target, dcfg, default_draft = setup
    exact = exact_joint(cfg, target, n, sp)
    ecfg = engine.EngineConfig(sampling=sp, **{"threshold": 0.0, **ecfg})
    draft = default_draft if draft is None else draft
    dec = Decoder(
        cfg, target, draft, dcfg if not isinstance(draft, Draft) else None, ecfg, cache_len=64,
        eos_ids=(), run=run, profiles={SAMPLES: profile} if profile else None,
    )  # fmt: skip
    gen = dec.generate([PROMPT] * SAMPLES, n, seed=seed)
    counts = np.zeros([cfg.vocab_size] * n)
    for t in gen.tokens:
        counts[tuple(t[:n])] += 1
    assert counts[exact == 0].sum() == 0, "a sample took a path of probability 0"
    p, stat, df = chi2_pvalue(counts, exact)
    print(f"p={p:.3g} chi2={stat:.1f} df={df} tau={gen.stats['tau']:.2f}")
    return p, gen


def assert_speculated(gen, min_tau=1.2):
    assert gen.stats["tau"] > min_tau, gen.stats["tau"]  # the accept and reject paths both ran


# ----------------------------------------------------------------------------- lossless


@pytest.mark.parametrize(
    "ecfg",
    [
        dict(mode="parallel"),
        dict(mode="parallel", rule="match"),  # the release's rule
        dict(mode="sequential", threshold=0.3),  # the verify length varies step by step
        dict(mode="paper"),  # batch 6000: the paper's rule takes sequential steps
        dict(mode="paper", paper_max_parallel_batch=SAMPLES),  # ... or parallel ones
    ],
    ids=["parallel", "match", "threshold", "paper-seq", "paper-par"],
)
def test_sampling_is_lossless(setup, ecfg):
    p, gen = check(setup, **ecfg)
    assert p > P_OK, p
    assert_speculated(gen)


def test_ar_sampling_is_exact(setup):
    """The reference the speculative modes are held to (AR mode, no draft)."""
    cfg, target, dcfg, _ = setup
    p, gen = check((cfg, target, dcfg, None), mode="ar", seed=2)
    assert p > P_OK and gen.stats["tau"] == 1.0, p


@pytest.mark.parametrize("run", [DEVICE, RunConfig(dispatch="host")], ids=["device", "host"])
def test_flex_switching_between_ar_and_speculative_steps_is_lossless(setup, run):
    """Flex with speculation priced just above its worth (a low acceptance prior) prefills
    without drafts and takes AR steps, probing a speculative step after each; the probe drafts
    first, wins, and speculation continues. The first 4 tokens come from AR steps and
    speculative ones: the AR-only loop and the switch loop of `engine.run` (or one executable
    per step with host dispatch) with the draft pass after an AR step."""
    costs = {"ar1": 1.0, "seq2": 1.3, "seq4": 1.5, "par2": 1.3, "par4": 1.5}
    p, gen = check(
        setup, n=4, run=run, profile=CostProfile(SAMPLES, costs, 0.3), mode="flex",
        alpha_init=0.1, gain="acceptance", probe_interval=1, probe_budget=1.0,
    )  # fmt: skip
    assert p > P_OK, p
    steps = gen.stats["branch_per_step"]
    assert steps[0] == "ar1" and steps[1] != "ar1", steps  # AR, then a probe that drafts first
    assert_speculated(gen, 1.1)


@pytest.mark.parametrize(
    "sp, ecfg",
    [
        (SamplingParams(temperature=1.0, top_k=3), dict(mode="parallel")),
        (SamplingParams(temperature=0.8, top_p=0.8), dict(mode="sequential", threshold=0.1)),
        (SamplingParams(temperature=1.3, top_k=4, top_p=0.9), dict(mode="parallel")),
    ],
    ids=["top-k", "top-p", "both"],
)
def test_top_k_and_top_p_sampling_is_lossless(setup, sp, ecfg):
    """top-k / top-p applied to p and q alike: the processed target distribution comes out (no
    sample on a token they removed)."""
    p, gen = check(setup, sp=sp, **ecfg)
    assert p > P_OK, p
    assert_speculated(gen, 1.1)


@pytest.mark.parametrize("rule", ["speculative", "match"])
def test_sampling_with_a_restricted_draft_vocabulary_is_lossless(setup, rule):
    """Drafts only from ids {4, 0, 2}: q is 0 on the others, and the target's distribution of the
    first 3 tokens (which use all 5 ids) must still come out exactly, with a top_k larger than
    the draft vocabulary (it keeps all three)."""
    cfg, target, dcfg, draft = setup
    record = Draft(draft, dcfg, vocab=np.array([4, 0, 2, 1, 3], np.int32))
    sp = SamplingParams(temperature=1.0, top_k=4)
    p, gen = check(
        setup, draft=record, sp=sp, mode="sequential", rule=rule, draft_vocab_size=3, seed=3
    )
    assert p > P_OK, p
    assert_speculated(gen, 1.1)


# ----------------------------------------------------------------------------- power


def _wrong_speculative(residual):
    """verify.speculative with the bonus after a rejection drawn by `residual(key, p, q)`."""

    def rule(key, logits, cand, q, v, sp):
        r = logits.shape[1]
        p = sampling.probs(logits, sp)
        drafts, valid = verify._drafts_vs_rows(cand, r, v)
        qr = q[:, : r - 1]
        p_d = jnp.take_along_axis(p[:, :-1], drafts[..., None], axis=-1)[..., 0]
        q_d = jnp.take_along_axis(qr, drafts[..., None], axis=-1)[..., 0]
        k_u, k_res = jax.random.split(key)
        u = jax.random.uniform(k_u, p_d.shape)
        acc = verify.leading_run((u * q_d < p_d) & valid)
        p_acc = jnp.take_along_axis(p, acc[:, None, None], axis=1)[:, 0]
        q_pad = jnp.concatenate([qr, jnp.zeros_like(p[:, :1])], axis=1)
        q_acc = jnp.take_along_axis(q_pad, acc[:, None, None], axis=1)[:, 0]
        bonus = jnp.where(acc < v, residual(k_res, p_acc, q_acc), sampling.sample(k_res, p_acc))
        return acc, bonus

    return rule


def _resample_from_p(key, p, q):
    return sampling.sample(key, p)


def _unnormalised_residual(key, p, q):
    """max(p - q, 0) drawn by inverse CDF without dividing by its mass: a draw past the mass
    lands on the last token."""
    res = jnp.maximum(p - q, 0.0)
    u = jax.random.uniform(key, res.shape[:-1] + (1,))
    return jnp.minimum(jnp.sum(jnp.cumsum(res, -1) <= u, -1), res.shape[-1] - 1).astype(jnp.int32)


def _accept_all(key, logits, cand, q, v, sp):
    acc = jnp.full((logits.shape[0],), v, jnp.int32)
    p_acc = jnp.take_along_axis(sampling.probs(logits, sp), acc[:, None, None], axis=1)[:, 0]
    return acc, sampling.sample(key, p_acc)


def _uncalibrated_q(real):
    """engine._draft_block whose drafts come from the calibrated q while the block records the
    uncalibrated one, which verification then accepts against."""

    def draft_block(st, target, draft, state, hidden, bonus, key):
        block, conf = real(st, target, draft, state, hidden, bonus, key)
        plain = dataclasses.replace(st, ecfg=dataclasses.replace(st.ecfg, use_calibration=False))
        other, _ = real(plain, target, draft, state, hidden, bonus, key)
        return block._replace(q=other.q), conf

    return draft_block


@pytest.mark.parametrize(
    "wrong", ["resample from p", "unnormalised residual", "uncalibrated q", "accept all"]
)
def test_a_wrong_rule_fails_the_same_check(setup, wrong, monkeypatch):
    if wrong == "uncalibrated q":
        monkeypatch.setattr(engine, "_draft_block", _uncalibrated_q(engine._draft_block))
    else:
        rule = {
            "resample from p": _wrong_speculative(_resample_from_p),
            "unnormalised residual": _wrong_speculative(_unnormalised_residual),
            "accept all": _accept_all,
        }[wrong]
        monkeypatch.setattr(verify, "speculative", rule)
    jax.clear_caches()  # the jitted steps must be traced again with the wrong rule
    try:
        p, gen = check(setup, mode="parallel")
    finally:
        jax.clear_caches()
    assert p < P_WRONG, (wrong, p)
    assert_speculated(gen)
