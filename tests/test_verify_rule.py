"""The verify-length rule (DESIGN §2.3) on hand-computed confidences, and in a decode.

Every verify length is lossless, so a wrong rule passes every losslessness test and only costs
speed: these tests pin the rule itself. Per sequence, v = how many leading drafts keep the running
product of their confidences >= theta; the batch verifies the maximum over active sequences,
clamped to [1, W-1].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexdraft_jax.decoding import engine
from flexdraft_jax.decoding.decoder import CostProfile, Decoder
from flexdraft_jax.models import transformer as tf
from flexdraft_jax.models.config import DraftConfig, ModelConfig

# Confidences that are exact in float32 (powers of two and sums of them), so every product below
# is exact and the comparisons with theta are decided by the rule, not by rounding.
CONF = [
    [1.0, 0.5, 0.5, 0.5, 0.5],  # products 1, .5, .25, .125, .0625
    [0.25, 1.0, 1.0, 1.0, 1.0],  # .25 .25 .25 .25 .25
    [0.75, 0.5, 0.25, 1.0, 1.0],  # .75 .375 .09375 .09375 .09375
]
W = 6  # block size: 5 drafts


def v_of(conf, threshold, active=None, width=W) -> int:
    conf = jnp.asarray(conf, jnp.float32)
    active = jnp.ones(conf.shape[0], bool) if active is None else jnp.asarray(active)
    return int(engine.verify_length(conf, threshold, active, width))


@pytest.mark.parametrize(
    "rows, threshold, want",
    [
        ([0], 0.25, 3),  # 1, .5, .25 reach .25 (>=, not >); .125 does not
        ([0], 0.26, 2),
        ([1], 0.25, 5),  # equal products all count
        ([1], 0.3, 1),  # none reaches: clamped up to 1
        ([2], 0.09375, 5),
        ([2], 0.1, 2),
        ([0, 1, 2], 0.26, 2),  # max over the batch: 2 (seq 0 and seq 2), not seq 1's 0
        ([0, 1, 2], 0.25, 5),  # seq 1 verifies the whole block, so the batch does
        ([1, 2], 0.1, 5),
        ([0, 2], 0.3, 2),
    ],
)
def test_verify_length_of_hand_computed_confidences(rows, threshold, want):
    assert v_of([CONF[r] for r in rows], threshold) == want


def test_threshold_zero_verifies_the_whole_block_and_one_only_certain_drafts():
    assert v_of(CONF, 0.0) == W - 1
    assert v_of([[1e-30] * 5], 0.0) == W - 1  # a product that underflows still counts
    assert v_of([CONF[2]], 1.0) == 1  # no draft is certain: clamped to 1
    assert v_of([[1.0, 1.0, 0.5, 1.0, 1.0]], 1.0) == 2  # two certain drafts
    assert v_of([[1.0] * 5], 1.0) == W - 1


def test_the_clamp_to_one_and_to_the_block():
    assert v_of([[0.0] * 5], 0.01) == 1  # nothing to verify still verifies one draft
    # Confidences for more drafts than the block holds never verify past W - 1.
    assert v_of([[1.0] * 5], 0.5, width=4) == 3


def test_finished_sequences_are_ignored():
    conf = [CONF[1], CONF[0]]  # at theta .25: 5 and 3
    assert v_of(conf, 0.25, active=[True, True]) == 5
    assert v_of(conf, 0.25, active=[False, True]) == 3  # the finished sequence's 5 is ignored
    assert v_of(conf, 0.25, active=[True, False]) == 5
    assert v_of(conf, 0.25, active=[False, False]) == 1  # every sequence done: 1


# ----------------------------------------------------------------------------- in a decode


def tiny():
    cfg = ModelConfig(arch="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8)  # fmt: skip
    target = tf.init_target(cfg, jax.random.PRNGKey(0))
    target["embed"]["embedding"] = target["embed"]["embedding"] * 50.0
    dcfg = DraftConfig(depth=2, block_size=8, calib_rank=16)
    draft = tf.init_draft(cfg, dcfg, target, jax.random.PRNGKey(1))
    return cfg, target, dcfg, draft


def hand_rule(conf: np.ndarray, threshold: float, active: np.ndarray, width: int) -> int:
    """The rule written out loop by loop (the reference for the compiled one in a decode)."""
    best = 1
    for c, a in zip(conf, active):
        if not a:
            continue
        prod, n = 1.0, 0
        for x in c.astype(np.float64):
            prod *= x
            if prod < threshold:
                break
            n += 1
        best = max(best, n)
    return min(best, width - 1)


@pytest.mark.parametrize("kind", ["seq", "par"])
def test_a_step_verifies_exactly_the_chosen_length(kind):
    """After the prefill, the block's v is the rule applied to its drafts' confidences; the next
    step verifies draft positions 1..v and no further (per-position tries), for a threshold that
    cuts the block short and for theta = 0 (the whole block)."""
    cfg, target, dcfg, draft = tiny()
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9], [4]]
    b, w = len(prompts), dcfg.block_size
    lengths = []
    for threshold in (0.0, 0.05, 0.3):
        dec = Decoder(
            cfg, target, draft, dcfg, engine.EngineConfig(mode="flex", threshold=threshold),
            cache_len=128, eos_ids=(), profiles={b: CostProfile(b, {}, 0.0)},
        )  # fmt: skip
        st = dec.static(b)
        state, _ = dec._prefill(st, prompts, 20, 0)
        conf = np.asarray(state.block.conf)
        v = int(state.block.v)
        assert v == hand_rule(conf, threshold, np.ones(b, bool), w), (threshold, conf)
        lengths.append(v)
        idx = st.branches.index((kind, w))  # the full bucket: v alone limits the verification
        costs = jnp.zeros(len(st.branches) + 1, jnp.float32)
        window = engine.kv_window(np.asarray(state.cache.lengths), w, dec.cache_len)
        new = engine.step(st, target, dec.draft, state, costs, jnp.int32(idx), window)[0]
        tried = np.asarray(new.stats.tried)
        assert tried[0] == b and (tried[v:] == 0).all(), (threshold, v, tried)
        committed = np.asarray(new.output.n_out) - 1
        assert (committed <= v + 1).all()
    assert lengths[0] == w - 1 and lengths[-1] < w - 1, lengths  # the threshold did cut
