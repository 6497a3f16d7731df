"""Training: data pieces, losses, the tiny model learns with the target untouched, exact resume.

Single device, in this process, except the resume test, which runs `launch/train.py` in fresh
processes (restore must work from disk alone). Sharded runs live in tests/test_sharding.py.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from flexdraft_jax.checkpoints import release
from flexdraft_jax.decoding import ar
from flexdraft_jax.models import transformer as T
from flexdraft_jax.models.config import ModelConfig
from flexdraft_jax.training import data, losses, trainer
from flexdraft_jax.training import step as train_step
from flexdraft_jax.training.defaults import base_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESUME_TOL = 1e-6


def tiny_config(tmp_path, **train):
    sys.path.insert(0, ROOT)
    from configs import tiny

    c = tiny.get_config()
    c.data.cache_dir = str(tmp_path / "distill")
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


def sharp_target(cfg: ModelConfig, seed: int = 0) -> dict:
    """A random target with O(1) logits, so greedy continuations are structured and learnable."""
    params = T.init_target(cfg, jax.random.PRNGKey(seed))
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 60.0
    params["embed"]["embedding"] = params["embed"]["embedding"] * 30.0
    return jax.tree.map(np.asarray, params)


# ----------------------------------------------------------------------------- data, losses


def test_slot_targets_masks_slot0_end_and_prompt():
    tokens = jnp.tile(jnp.arange(10, dtype=jnp.int32)[None] + 100, (2, 1))
    # Sequence 0: response 3..7, length 8. Sequence 1: response 3..6, then rows 7..9 that are
    # inside its length but outside the loss region (a prompt packed after the response).
    loss_mask = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1, 0, 0, 0]], bool)
    anchors = jnp.array([[3, 6, 0], [1, 5, 0]], jnp.int32)
    valid_anchor = jnp.array([[True, True, False], [True, True, False]])
    labels, valid = losses.slot_targets(
        tokens, jnp.array([8, 10]), loss_mask, anchors, valid_anchor, 4
    )
    np.testing.assert_array_equal(labels[0, 0], [103, 104, 105, 106])
    np.testing.assert_array_equal(valid[0, 0], [False, True, True, True])
    np.testing.assert_array_equal(valid[0, 1], [False, True, False, False])  # 8, 9 past the end
    assert not valid[0, 2].any() and not valid[1, 2].any()  # padding anchors
    np.testing.assert_array_equal(labels[1, 0], [101, 102, 103, 104])
    np.testing.assert_array_equal(valid[1, 0], [False, False, True, True])  # 2: prompt
    np.testing.assert_array_equal(valid[1, 1], [False, True, False, False])  # 7, 8: not response
    w = losses.position_weights(4, 2.0)
    np.testing.assert_allclose(w, [0.0, 1.0, np.exp(-0.5), np.exp(-1.0)], rtol=1e-6)


def test_draft_loss_perfect_prediction_and_kl():
    labels = jnp.array([[[5, 1, 2, 3]]], jnp.int32)
    logits = jax.nn.one_hot(labels, 8) * 50.0
    valid = jnp.array([[[False, True, True, True]]])
    loss, m = losses.draft_loss(
        logits, labels, valid, losses.position_weights(4, 0.0), logits, kl_weight=1.0
    )
    assert float(loss) < 1e-6 and float(m["kl"]) < 1e-6
    np.testing.assert_allclose(m["acc_per_slot"], [0.0, 1.0, 1.0, 1.0])


def test_topk_kl_is_the_kl_to_the_renormalised_top_k():
    """k = V gives the full KL of `draft_loss`; a smaller k (and ids the draft cannot produce)
    gives the KL to the target's distribution renormalised over the usable ids (numpy)."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((2, 3, 4, 16)) * 2, jnp.float32)
    target = jnp.asarray(rng.standard_normal((2, 3, 4, 16)) * 2, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 16, (2, 3, 4)), jnp.int32)
    valid = jnp.asarray(rng.random((2, 3, 4)) < 0.8)
    w = losses.position_weights(4, 2.0)
    tlogp = jax.nn.log_softmax(target, axis=-1)
    top, ids = jax.lax.top_k(tlogp, 16)
    full = losses.draft_loss(logits, labels, valid, w, target, kl_weight=0.5)
    ok = jnp.ones(ids.shape, bool)
    viatop = losses.draft_loss(logits, labels, valid, w, kl_weight=0.5, target_topk=(ids, top, ok))
    np.testing.assert_allclose(full[0], viatop[0], rtol=1e-5)
    np.testing.assert_allclose(full[1]["kl"], viatop[1]["kl"], rtol=1e-5)

    top, ids = jax.lax.top_k(tlogp, 5)
    ok = jnp.asarray(rng.random(ids.shape) < 0.7).at[0, 0, 0].set(False)  # one row: no usable id
    top = top.at[0, 1, 0].set(-jnp.inf)  # a row the cache left empty: no usable id either
    got = np.asarray(losses.topk_kl(jax.nn.log_softmax(logits, -1), ids, top, ok))
    p = np.where(np.asarray(ok), np.exp(np.asarray(top, np.float64)), 0.0)  # exp(-inf) = 0
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    logq = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits, -1)), np.asarray(ids), -1)
    want = np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - logq), 0.0), -1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got[0, 0, 0] == 0.0 and got[0, 1, 0] == 0.0 and (got >= -1e-6).all()


def test_pack_and_anchors_stay_in_the_response():
    examples = [([1, 2, 3], [4, 5, 6, 7]), ([1] * 9, [2, 3]), ([1, 2], list(range(3, 20)))]
    packed = data.pack(examples, seq_len=10)
    assert packed.tokens.shape == (2, 10)  # the second example leaves no room: dropped
    np.testing.assert_array_equal(packed.lengths, [7, 10])  # the third is cropped
    np.testing.assert_array_equal(packed.loss_mask[0], [0, 0, 0, 1, 1, 1, 1, 0, 0, 0])
    rng = np.random.default_rng(0)
    anchors, valid = data.sample_anchors(packed.loss_mask, packed.lengths, 5, rng)
    assert valid[0].sum() == 3 and valid[1].sum() == 5  # row 0 has candidates 3, 4, 5 only
    for i in range(2):
        a = anchors[i][valid[i]]
        assert len(set(a)) == len(a)
        assert packed.loss_mask[i, a].all() and (a + 1 < packed.lengths[i]).all()


def test_dataset_batches_are_a_function_of_step_and_split_by_process():
    rng = np.random.default_rng(1)
    ex = [(rng.integers(1, 50, 4).tolist(), rng.integers(1, 50, 20).tolist()) for _ in range(12)]
    ds = data.Dataset(data.pack(ex, 32), batch_size=4, num_anchors=3, seed=7)
    a, b = ds.batch(5), ds.batch(5)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    halves = [ds.batch(5, p, 2) for p in range(2)]
    for k in a:
        np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), a[k])
    epoch0 = np.concatenate([ds.global_indices(s) for s in range(3)])
    assert sorted(epoch0) == list(range(12))


def test_length_buckets_crop_batches_and_cover_the_epoch():
    rng = np.random.default_rng(2)
    ex = [([1, 2], rng.integers(1, 50, int(n)).tolist()) for n in rng.integers(5, 60, 40)]
    ds = data.Dataset(data.pack(ex, 64), 4, 3, seed=1, length_bucket=16, sort_window=3)
    seen = []
    for step in range(ds.steps_per_epoch):
        b = ds.batch(step)
        width = b["tokens"].shape[1]
        assert width % 16 == 0 and b["lengths"].max() <= width < b["lengths"].max() + 16
        seen += list(ds.global_indices(step))
    assert sorted(seen) == list(range(40))


def test_python_docs_prompts_are_offline_and_deterministic():
    p = data.python_docs_prompts(50, seed=3)
    assert len(p) == 50 and p == data.python_docs_prompts(50, seed=3)
    assert all("HumanEval" not in x for x in p)


def test_read_jsonl_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi"}\n{"prompt": "q", "response": "a"}\n')
    assert data.read_jsonl(str(path)) == [{"prompt": "hi"}, {"prompt": "q", "response": "a"}]
    path.write_text('{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="string 'prompt'"):
        data.read_jsonl(str(path))
    with pytest.raises(FileNotFoundError):
        data.read_jsonl(str(tmp_path / "missing.jsonl"))


def test_distill_matches_generate_and_is_cached(tmp_path):
    cfg = ModelConfig(**dict(tiny_config(tmp_path).model.tiny))
    params = sharp_target(cfg)
    prompts = data.synthetic_prompts(5, cfg.vocab_size, 3, 8, seed=2)  # one length bucket
    out = data.distill(cfg, params, prompts, 6, batch_size=5, cache_dir=str(tmp_path))
    assert out == ar.generate(cfg, params, prompts, 6).tokens  # same shapes: one compilation
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].startswith("distill-")
    # A cache hit never touches the model (params=None would fail to generate).
    key_id = data.params_fingerprint(cfg, params)
    assert data.distill(cfg, None, prompts, 6, cache_dir=str(tmp_path), model_id=key_id) == out


def test_distill_cache_is_per_chunk(tmp_path, monkeypatch):
    """An interrupted or extended distillation reuses every finished chunk."""
    cfg = ModelConfig(**dict(tiny_config(tmp_path).model.tiny))
    params = sharp_target(cfg)
    prompts = data.synthetic_prompts(5, cfg.vocab_size, 3, 8, seed=2)
    kw = dict(batch_size=2, cache_dir=str(tmp_path / "c"), chunk_size=2)
    key_id = data.params_fingerprint(cfg, params)
    head = data.distill(cfg, params, prompts[:4], 6, model_id=key_id, **kw)
    assert len(os.listdir(tmp_path / "c")) == 2
    generated = []
    real = ar.generate
    monkeypatch.setattr(ar, "generate", lambda c, p, ps, *a, **k: generated.append(ps) or real(
        c, p, ps, *a, **k))  # fmt: skip
    out = data.distill(cfg, params, prompts, 6, model_id=key_id, **kw)
    assert generated == [prompts[4:]]  # only the fifth prompt's chunk was missing
    assert out[:4] == head and len(os.listdir(tmp_path / "c")) == 3
    assert out == [real(cfg, params, [p], 6).tokens[0] for p in prompts]
    assert data.distill(cfg, None, prompts[:4], 6, model_id=key_id, **kw) == head


def test_stub_prompts_are_function_stubs():
    stubs = data.python_stub_prompts(20, seed=0)
    assert len(stubs) == 20 and len(set(stubs)) == 20
    for s in stubs:
        fn = ast.parse(s).body[0]  # a function whose whole body is its docstring
        assert isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef), s[:40]
        assert len(fn.body) == 1 and len(ast.get_docstring(fn)) >= 40
    assert stubs == data.python_stub_prompts(20, seed=0)  # deterministic
    assert stubs != data.python_stub_prompts(20, seed=1)


def test_vocab_by_frequency():
    packed = data.pack([([9, 9, 9], [3, 3, 5, 3, 5, 7])], seq_len=16)
    order = data.vocab_by_frequency(packed, 12)
    # Response tokens by count (prompt tokens do not count), then unseen ids in id order.
    assert order.tolist() == [3, 5, 7, 0, 1, 2, 4, 6, 8, 9, 10, 11]


# ----------------------------------------------------------------------------- training


def test_tiny_model_learns_and_target_is_untouched(tmp_path):
    config = tiny_config(tmp_path, steps=300, log_every=50, ckpt_every=1000)
    cfg = ModelConfig(**dict(config.model.tiny))
    params = sharp_target(cfg)
    before = jax.tree.map(np.copy, params)
    out = trainer.train(config, str(tmp_path / "wd"), target=(cfg, params, None))
    hist = out["history"]
    first, last = hist[0], hist[-1]
    assert last["loss"] < first["loss"] - 0.3, (first["loss"], last["loss"])
    for j in range(1, config.draft.block_size):
        assert last["acc_per_slot"][j] > first["acc_per_slot"][j] + 0.1, (first, last)
    # Bit-identical target: the arrays we passed and the ones the trainer used.
    used = jax.tree.map(np.asarray, out["target"])
    for a, b, c in zip(jax.tree.leaves(before), jax.tree.leaves(params), jax.tree.leaves(used)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    # Attention stage: the calibration MLP is not trained.
    init = trainer.draft_init(cfg, out["dcfg"], out["target"], jax.random.PRNGKey(config.seed))
    for a, b in zip(
        jax.tree.leaves(init["calibration"]), jax.tree.leaves(out["state"]["draft"]["calibration"])
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(init["mask_embedding"], out["state"]["draft"]["mask_embedding"])

    # Calibration stage from the exported attention draft: only the MLP moves.
    config2 = tiny_config(
        tmp_path, stage="calibration", steps=30, log_every=10, init_from=str(tmp_path / "wd")
    )
    out2 = trainer.train(config2, str(tmp_path / "wd2"), target=(cfg, params, None))
    d1, d2 = out["state"]["draft"], out2["state"]["draft"]
    for k in ("mask_embedding", "layers"):
        for a, b in zip(jax.tree.leaves(d1[k]), jax.tree.leaves(d2[k])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(
        d1["calibration"]["fc2"]["kernel"], d2["calibration"]["fc2"]["kernel"]
    )
    assert out2["history"][-1]["loss"] < out2["history"][0]["loss"]

    # A higher calibration rank widens the trained MLP (same output to start with); a stage
    # that keeps the MLP frozen refuses it.
    config3 = tiny_config(
        tmp_path, stage="calibration", steps=3, log_every=1, init_from=str(tmp_path / "wd")
    )
    config3.draft.calib_rank = 2 * config.draft.calib_rank
    out3 = trainer.train(config3, str(tmp_path / "wd3"), target=(cfg, params, None))
    d3 = out3["state"]["draft"]
    assert d3["calibration"]["fc1"]["kernel"].shape[1] == config3.draft.calib_rank
    wide = dataclasses.replace(out["dcfg"], calib_rank=config3.draft.calib_rank)
    fresh = lambda: trainer.draft_init(cfg, wide, out["target"], jax.random.PRNGKey(1))
    grown = trainer.load_init_draft(
        str(tmp_path / "wd2"), cfg, wide, lambda: fresh()["calibration"]
    )["calibration"]
    x = jax.random.normal(jax.random.PRNGKey(2), (5, 2 * cfg.hidden_size))
    calib = lambda p, r: np.asarray(T.Calibration(r, cfg.vocab_size).apply({"params": p}, x))
    trained = calib(d2["calibration"], out["dcfg"].calib_rank)
    assert np.abs(trained).max() > 1e-3  # the calibration stage's MLP, not a zero one
    np.testing.assert_allclose(calib(grown, wide.calib_rank), trained, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(d1["layers"]), jax.tree.leaves(d3["layers"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    config3.train.stage = "attention"
    with pytest.raises(ValueError, match="calib_rank"):
        trainer.train(config3, str(tmp_path / "wd4"), target=(cfg, params, None))

    # A deeper draft grows from it: its layers stay the deepest, the one added is the target's.
    deeper = dataclasses.replace(out["dcfg"], depth=out["dcfg"].depth + 1)
    init = lambda: trainer.draft_init(cfg, deeper, out["target"], jax.random.PRNGKey(0))["layers"]
    grown = trainer.load_init_draft(str(tmp_path / "wd"), cfg, deeper, None, init)
    for g, old, new in zip(*(jax.tree.leaves(t) for t in (grown["layers"], d1["layers"], init()))):
        np.testing.assert_array_equal(g[1:], np.asarray(old))
        np.testing.assert_array_equal(g[0], np.asarray(new[0]))
    with pytest.raises(ValueError, match="depth"):
        trainer.load_init_draft(str(tmp_path / "wd"), cfg, deeper)


def test_cached_clean_pass_equals_the_full_step(tmp_path):
    """train.cache_clean (deep-layer K/V computed once) trains exactly like the per-step clean
    pass: same losses and the same draft after a few steps (float32 cache)."""
    cfg = None
    outs = []
    for cached in (False, True):
        config = tiny_config(
            tmp_path,
            steps=6,
            log_every=1,
            ckpt_every=1000,
            cache_clean=cached,
            cache_clean_dtype="float32",
        )
        cfg = cfg or ModelConfig(**dict(config.model.tiny))
        outs.append(
            trainer.train(
                config, str(tmp_path / f"wd{cached}"), target=(cfg, sharp_target(cfg), None)
            )
        )
    plain, cached = outs
    np.testing.assert_allclose(
        [h["loss"] for h in plain["history"]], [h["loss"] for h in cached["history"]], atol=1e-5
    )
    for a, b in zip(
        jax.tree.leaves(plain["state"]["draft"]), jax.tree.leaves(cached["state"]["draft"])
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    assert os.listdir(tmp_path / "wdTrue" / "clean_cache")  # written for the next run to reuse
    with pytest.raises(ValueError, match="needs train.kl_topk > 0"):
        train_step.make_train_step(
            cfg,
            plain["dcfg"],
            tiny_config(tmp_path, cache_clean=True, kl_weight=1.0).train,
            None,
            None,
        )


def test_kl_to_the_cached_top_k_equals_the_live_kl(tmp_path):
    """KL to the target's top-k kept by the clean cache trains exactly like the top-k of a live
    clean pass; with k = V both equal the KL to the whole distribution (tiny vocabulary: 64)."""
    outs = {}
    for name, kw in (
        ("full", dict(kl_topk=0)),
        ("live", dict(kl_topk=64)),
        ("cached", dict(kl_topk=64, cache_clean=True, cache_clean_dtype="float32")),
        ("cached8", dict(kl_topk=8, cache_clean=True, cache_clean_dtype="float32")),
    ):
        config = tiny_config(
            tmp_path, stage="joint", steps=5, log_every=1, ckpt_every=1000, kl_weight=1.0, **kw
        )
        cfg = ModelConfig(**dict(config.model.tiny))
        outs[name] = trainer.train(
            config, str(tmp_path / name), target=(cfg, sharp_target(cfg), None)
        )
    for name in ("live", "cached"):
        for k in ("loss", "kl", "ce"):
            np.testing.assert_allclose(
                [h[k] for h in outs["full"]["history"]],
                [h[k] for h in outs[name]["history"]],
                rtol=1e-4,
                err_msg=f"{name} {k}",
            )
        for a, b in zip(
            jax.tree.leaves(outs["full"]["state"]["draft"]),
            jax.tree.leaves(outs[name]["state"]["draft"]),
        ):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
    files = os.listdir(tmp_path / "cached8" / "clean_cache")
    assert any(f.endswith(".top8_ids.npy") for f in files), files
    # Renormalised over 8 ids the KL differs (same first step, same draft): k reaches the loss.
    assert abs(outs["cached8"]["history"][0]["kl"] - outs["full"]["history"][0]["kl"]) > 1e-3


def test_restricted_draft_vocabulary_training(tmp_path):
    """Every id in the draft vocabulary (in frequency order, not id order) trains exactly like no
    restriction; half of it trains over those ids only, and the release stores the order."""
    from flexdraft_jax.checkpoints import release

    outs = {}
    for n in (0, 64, 32):
        config = tiny_config(
            tmp_path, stage="joint", steps=6, log_every=1, ckpt_every=1000, draft_vocab_size=n
        )
        cfg = ModelConfig(**dict(config.model.tiny))
        assert cfg.vocab_size == 64
        outs[n] = trainer.train(
            config, str(tmp_path / f"v{n}"), target=(cfg, sharp_target(cfg), None)
        )
    full, same, half = outs[0], outs[64], outs[32]
    for k in ("loss", "acc", "ce"):
        np.testing.assert_allclose(
            [h[k] for h in full["history"]], [h[k] for h in same["history"]], atol=1e-5
        )
    for a, b in zip(
        jax.tree.leaves(full["state"]["draft"]), jax.tree.leaves(same["state"]["draft"])
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    assert all(h["in_vocab"] == 1.0 for h in same["history"])
    assert all(0.5 < h["in_vocab"] < 1.0 for h in half["history"])  # frequent tokens first
    order = release.load_draft_vocab(str(tmp_path / "v32" / "draft_release"), cfg)
    assert sorted(order.tolist()) == list(range(64))
    # The size trained over is recorded: decoding's default draft vocabulary (0: all).
    for n in (0, 32):
        assert release.load_draft_vocab_size(str(tmp_path / f"v{n}" / "draft_release"), cfg) == n
    # The out-of-vocabulary slots are misses: accuracy cannot beat the in-vocabulary share.
    assert all(h["acc"] <= h["in_vocab"] + 1e-6 for h in half["history"])


def test_trainer_release_records_the_prior_and_its_calibration(tmp_path):
    """The trainer's own release carries what launch/export_draft.py records for flex's prior:
    the held-out acceptance and the prefill-draft confidence on the same held-out prompts, as
    decoding computes it from the release (restricted to its draft vocabulary)."""
    from flexdraft_jax.recipes import loading
    from flexdraft_jax.training import evaluate

    config = tiny_config(tmp_path, stage="joint", steps=3, log_every=1, ckpt_every=1000,
                         draft_vocab_size=32)  # fmt: skip
    config.eval.every, config.eval.num_prompts, config.eval.sets = 3, 3, ("humaneval",)
    config.eval.max_new_tokens, config.eval.seq_len = 12, 64
    cfg = ModelConfig(**dict(config.model.tiny))
    target = sharp_target(cfg)
    trainer.train(config, str(tmp_path / "wd"), target=(cfg, target, None))
    record = loading.load_draft(str(tmp_path / "wd" / "draft_release"), cfg, target)
    assert record.acceptance is not None and record.vocab_size == 32
    prompts = evaluate.heldout_prompts(cfg, None, "humaneval", 3, 64, config.seed)
    want = evaluate.prefill_confidence(cfg, jax.tree.map(jnp.asarray, target), record, prompts)
    np.testing.assert_allclose(record.prefill_confidence, want, atol=1e-4)


def test_stage_names_are_checked():
    with pytest.raises(ValueError, match="unknown stage"):
        train_step.trainable_keys("everything")
    assert base_config().train.stage == "attention"


def run_train(args, env_extra=None, timeout=600):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), *args]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if res.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}")
    return res


def read_release(workdir) -> dict:
    return load_file(os.path.join(workdir, "draft_release", "model.safetensors"))


def read_metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resume_in_a_new_process_is_exact(tmp_path):
    n, k = 12, 5
    common = [
        "--config=configs/tiny.py",
        f"--config.train.steps={n}",
        "--config.train.log_every=1",
        "--config.train.ckpt_every=100",
        f"--config.data.cache_dir={tmp_path / 'distill'}",
    ]
    run_train([*common, f"--workdir={tmp_path / 'straight'}"])
    run_train([*common, f"--workdir={tmp_path / 'resumed'}", f"--config.train.stop_at={k}"])
    # A run stopped early exports its draft as of that step (a later stage can start from it).
    assert os.path.exists(tmp_path / "resumed" / "draft_release" / "config.json")
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints"))[-1] == str(k)
    run_train([*common, f"--workdir={tmp_path / 'resumed'}"])
    a, b = read_release(tmp_path / "straight"), read_release(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=RESUME_TOL, rtol=0, err_msg=name)
    ma, mb = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [m["step"] for m in mb] == list(range(1, n + 1))
    for x, y in zip(ma, mb):
        assert abs(x["loss"] - y["loss"]) <= RESUME_TOL, (x, y)


def test_sigterm_checkpoints_exports_and_resumes(tmp_path):
    """A preempted run (SIGTERM) saves the step it finished and its draft, exits cleanly, and a
    rerun carries on from that step."""
    import signal
    import time

    wd = tmp_path / "wd"
    common = [
        "--config=configs/tiny.py",
        f"--workdir={wd}",
        "--config.train.steps=100000",
        "--config.train.log_every=1",
        "--config.train.ckpt_every=100000",
        f"--config.data.cache_dir={tmp_path / 'distill'}",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), *common]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not (wd / "metrics.jsonl").exists() or len(read_metrics(wd)) < 3:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert b"stopped by SIGTERM" in err
    last = read_metrics(wd)[-1]["step"]
    assert 3 <= last < 100000
    assert sorted(os.listdir(wd / "checkpoints"), key=int)[-1] == str(last)
    assert os.path.exists(wd / "draft_release" / "config.json")
    run_train([*common, f"--config.train.stop_at={last + 2}"])
    assert [m["step"] for m in read_metrics(wd)] == list(range(1, last + 3))


def test_teacher_forced_tau_with_a_restricted_draft_vocabulary(tmp_path):
    """The held-out tau maps restricted-vocabulary predictions back to token ids: every id in a
    permuted order gives exactly the unrestricted tau; dropping the emitted tokens gives 1."""
    from flexdraft_jax.models.config import DraftConfig
    from flexdraft_jax.training import clean_cache, evaluate

    cfg = ModelConfig(**dict(tiny_config(tmp_path).model.tiny))
    target = sharp_target(cfg)
    dcfg = DraftConfig(depth=2, block_size=4, calib_rank=16)
    draft = T.init_draft(cfg, dcfg, target, jax.random.PRNGKey(0))
    prompts = data.synthetic_prompts(4, cfg.vocab_size, 3, 8, seed=4)
    responses = ar.generate(cfg, target, prompts, 24).tokens
    packed = data.pack(list(zip(prompts, responses)), 40)
    k, v = clean_cache.precompute(cfg, 2, target, packed.tokens, packed.lengths, dtype="float32")
    held = {"tokens": packed.tokens, "lengths": packed.lengths, "loss_mask": packed.loss_mask}
    held.update(clean_k=k, clean_v=v)
    tau = lambda d: evaluate.teacher_forced_tau(cfg, dcfg, target, d, held, use_calibration=True)
    full = tau(draft)
    assert full["tau"] > 1.05  # the untrained copy of a sharp target drafts some tokens right
    perm = np.random.default_rng(0).permutation(cfg.vocab_size)
    assert tau(T.restrict_draft_vocab(cfg, target, draft, perm)) == full
    emitted = np.unique(packed.tokens[packed.loss_mask])
    others = np.setdiff1d(np.arange(cfg.vocab_size), emitted)
    assert tau(T.restrict_draft_vocab(cfg, target, draft, others))["tau"] == 1.0


def test_decoded_tau_walks_the_runs_as_greedy_decoding_does(tmp_path):
    """Teacher-forced runs walked as decoding walks them (from bonus p to p + run + 1) give the
    step count of the engine's greedy decode with threshold 0 on the same prompts, and a tau that
    differs from the position mean."""
    from flexdraft_jax.decoding.decoder import Decoder
    from flexdraft_jax.decoding.engine import EngineConfig
    from flexdraft_jax.models.config import DraftConfig
    from flexdraft_jax.training import clean_cache, evaluate

    cfg = ModelConfig(**dict(tiny_config(tmp_path).model.tiny))
    target = sharp_target(cfg)
    dcfg = DraftConfig(depth=2, block_size=4, calib_rank=16)
    draft = T.init_draft(cfg, dcfg, target, jax.random.PRNGKey(0))
    prompts = data.synthetic_prompts(4, cfg.vocab_size, 3, 8, seed=4)
    new = 24
    responses = ar.generate(cfg, target, prompts, new).tokens
    packed = data.pack(list(zip(prompts, responses)), 40)
    k, v = clean_cache.precompute(cfg, 2, target, packed.tokens, packed.lengths, dtype="float32")
    held = {"tokens": packed.tokens, "lengths": packed.lengths, "loss_mask": packed.loss_mask}
    held.update(clean_k=k, clean_v=v)
    res = evaluate.teacher_forced_tau(cfg, dcfg, target, draft, held, use_calibration=True)
    ecfg = EngineConfig(mode="sequential", threshold=0.0)
    dec = Decoder(cfg, target, draft, dcfg, ecfg, cache_len=64, eos_ids=())
    gens = [dec.generate([p], new) for p in prompts]
    assert [g.tokens[0] for g in gens] == [list(r) for r in responses]  # lossless, so same data
    assert res["decoded_steps"] == sum(g.stats["steps"] for g in gens)
    assert 1.0 < res["decoded_tau"] and res["decoded_tau"] != res["tau"]
    # The walk itself: at 5 (run 2) it jumps to 8 (run 0), then past a gap to 20 (run 1), which
    # jumps over 21.
    assert evaluate._walk(np.array([5, 6, 7, 8, 20, 21]), np.array([2, 0, 1, 0, 1, 3])) == [
        2,
        0,
        1,
    ]
    # The walk's slot-1 acceptance counts the engine's hits: every step tries slot 1.
    hits = sum(g.stats["per_position_acceptance"][0] * g.stats["steps"] for g in gens)
    assert hits > 0
    np.testing.assert_allclose(res["decoded_acceptance"][0] * res["decoded_steps"], hits)


@pytest.mark.slow  # 76 s: the real target and the shipped draft
def test_export_draft_records_the_heldout_tau_of_what_ships(tmp_path):
    """launch/export_draft.py on the shipped release (the embedded target, 2 held-out prompts):
    the same bytes come out, with the held-out tau of that draft in the provenance; the release it
    read is left as it was. A missing workdir is an error that writes nothing."""
    import shutil

    src = tmp_path / "release"
    shutil.copytree(os.path.join(ROOT, "drafts", "smollm2_135m"), src)
    before = sorted(os.listdir(src))
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "launch", "export_draft.py"), f"--output={out}"]
    cmd += ["--heldout_prompts=2", "--heldout_new_tokens=24", f"--distill_cache={tmp_path / 'd'}"]
    proc = subprocess.run(cmd + [f"--workdirs={src}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "model.safetensors", "rb") as a, open(src / "model.safetensors", "rb") as b:
        assert a.read() == b.read()
    with open(out / "provenance.json") as f:
        held = json.load(f)["heldout"]
    chat = json.loads((out / "provenance.json").read_text())["heldout_chat"]
    assert held["prompt_set"] == "humaneval" and chat["prompt_set"] == "sharegpt"
    assert chat["decoded_steps"] > 0 and chat["tau"] > 1.0
    assert held["prompts"] == 2 and held["draft_vocab_size"] == 8192
    assert held["decoded_steps"] > 0 and held["tau"] > 1.0 and held["decoded_tau"] > 1.0
    assert len(held["decoded_acceptance"]) == len(held["per_position_acceptance"]) == 7
    # flex's calibration: the mean over the sets of each one's prefill-draft confidence
    conf = release.load_prefill_confidence(str(out), 8)
    np.testing.assert_allclose(
        conf, np.mean([held["prefill_confidence"], chat["prefill_confidence"]], 0), atol=1e-4
    )
    assert conf[0] > 0.05 and release.load_acceptance(str(out), 8) is not None
    assert f"decoded tau {held['decoded_tau']}" in proc.stdout
    assert sorted(os.listdir(src)) == before  # no clean cache left in a release directory
    # From a training workdir: its metrics become the stage's curves.
    wd = tmp_path / "wd"
    shutil.copytree(src, wd / "draft_release")
    recs = [
        {"step": 5, "loss": 3.0, "train_minutes": 0.5},
        {"step": 5, "train_minutes": 0.5, "heldout_tau": 1.5, "heldout_decoded_tau": 1.25},
    ]
    (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    init = json.loads((src / "provenance.json").read_text())
    before = init["stages"]
    extra = [f"--workdirs={wd}", "--heldout_prompts=0", f"--init_provenance={src}/provenance.json"]
    extra += ["--note=this run"]
    proc = subprocess.run(cmd + extra, capture_output=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "provenance.json") as f:
        prov = json.load(f)
    assert prov["heldout"] is None and prov["heldout_chat"] is None
    assert prov["stages"][: len(before)] == before  # the run it started from comes first
    assert prov["notes"] == init["notes"] + ["this run"] and init["notes"]
    prov["stages"] = prov["stages"][len(before) :]
    assert prov["stages"][0]["steps"] == 5
    assert prov["stages"][0]["heldout_tau_curve"] == [[5, 0.5, 1.5]]
    assert prov["stages"][0]["heldout_decoded_tau_curve"] == [[5, 0.5, 1.25]]
    bad = subprocess.run(
        cmd[:2] + [f"--output={tmp_path / 'bad'}", f"--workdirs={tmp_path / 'none'}"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "does not exist" in bad.stderr
    assert not os.path.exists(tmp_path / "bad")


def test_clean_cache_top_k_from_the_response_rows(tmp_path):
    """The cache's top-k equals the top-k of the target's own log-probabilities (a plain forward)
    at every row from `topk_from` up to the sequence's end, and is empty before it; its K/V are
    the plain cache's."""
    from flexdraft_jax.training import clean_cache

    cfg, target, packed = _tiny_packed(tmp_path, 5, 9, 12, seed=6)
    toks, lens = packed.tokens, packed.lengths
    start = packed.loss_mask.argmax(1) - 1
    kw = dict(batch_size=2, dtype="float32", bucket=8)
    k, v, ids, logp = clean_cache.precompute(
        cfg, 2, target, toks, lens, topk=4, topk_from=start, **kw
    )
    k0, v0 = clean_cache.precompute(cfg, 2, target, toks, lens, **kw)
    np.testing.assert_array_equal(k, k0)
    np.testing.assert_array_equal(v, v0)
    for i in range(len(toks)):
        n = int(lens[i])
        logits = T.forward(cfg, target, jnp.asarray(toks[i : i + 1, :n]), *_causal(n))[0][0]
        want_lp, want_ids = jax.lax.top_k(jax.nn.log_softmax(logits, -1), 4)
        s0 = int(start[i])
        np.testing.assert_array_equal(ids[i, s0:n], np.asarray(want_ids)[s0:])
        np.testing.assert_allclose(logp[i, s0:n], np.asarray(want_lp)[s0:], atol=1e-4)
        assert np.isneginf(logp[i, :s0]).all() and np.isneginf(logp[i, n:]).all()


def test_clean_cache_on_disk_is_the_pass_in_memory(tmp_path):
    """Written to a cache folder (bfloat16 and top-k, filled as memory-mapped files), the clean
    pass returns those files memory-mapped, equal to the pass kept in memory, with no temporary
    file left; a second call reads them back."""
    from flexdraft_jax.training import clean_cache

    cfg, target, packed = _tiny_packed(tmp_path, 5, 9, 12, seed=7)
    toks, lens = packed.tokens, packed.lengths
    kw = dict(batch_size=2, bucket=8, topk=3, topk_from=packed.loss_mask.argmax(1) - 1)
    mem = clean_cache.precompute(cfg, 2, target, toks, lens, **kw)
    d = tmp_path / "cc"
    for _ in range(2):
        disk = clean_cache.precompute(cfg, 2, target, toks, lens, cache_dir=str(d), ident="m", **kw)
        assert all(isinstance(x, np.memmap) for x in disk)
        assert disk[0].dtype == mem[0].dtype == ml_dtypes.bfloat16
        for a, b in zip(disk, mem):
            np.testing.assert_array_equal(np.asarray(a), b)
        assert np.abs(mem[0].astype(np.float32)).max() > 0 and np.isneginf(mem[3]).any()
        assert sorted(os.listdir(d)) == sorted(
            f"{clean_cache.cache_key('m', toks, 2, 'bfloat16')}.{p}.npy"
            for p in ("k", "v", "top3_ids", "top3_logp")
        )


def _tiny_packed(tmp_path, n, max_prompt, new, seed):
    """(cfg, target, packed): the tiny target's greedy responses to `n` synthetic prompts of 3 to
    `max_prompt` tokens, packed into sequences of 32."""
    cfg = ModelConfig(**dict(tiny_config(tmp_path).model.tiny))
    target = sharp_target(cfg)
    prompts = data.synthetic_prompts(n, cfg.vocab_size, 3, max_prompt, seed=seed)
    responses = ar.generate(cfg, target, prompts, new).tokens
    return cfg, target, data.pack(list(zip(prompts, responses)), 32)


def _causal(n):
    from flexdraft_jax.models import layouts

    lay = layouts.causal(jnp.zeros((1,), jnp.int32), n)
    return lay.positions, lay.meta


def test_clean_cache_reuses_the_rows_of_a_cached_prefix(tmp_path):
    """Grown data (sequences appended) reuses the cached prefix's K/V rows and computes the rest:
    the result equals a fresh clean pass, and a marker planted in the prefix file is carried over
    (so those rows really were read, not recomputed). A different prefix is not reused."""
    from flexdraft_jax.training import clean_cache

    cfg, target, packed = _tiny_packed(tmp_path, 6, 8, 16, seed=5)
    toks, lens = packed.tokens, packed.lengths
    run = lambda t, n, **kw: clean_cache.precompute(
        cfg, 2, target, t, n, batch_size=2, dtype="float32", **kw
    )
    fresh = run(toks, lens)
    d = str(tmp_path / "cc")
    pk, _ = run(toks[:4], lens[:4], cache_dir=d, ident="m")
    np.testing.assert_allclose(pk, fresh[0][:4], atol=1e-6)
    grown = run(toks, lens, cache_dir=d, ident="m")
    for a, b in zip(grown, fresh):
        np.testing.assert_allclose(a, b, atol=1e-6)

    prefix = os.path.join(d, clean_cache.cache_key("m", toks[:4], 2, "float32"))
    marked = np.load(prefix + ".k.npy")
    marked[1, 0, 0, 0, 0] = 1234.0
    np.save(prefix + ".k.npy", marked)
    for f in os.listdir(d):  # drop the grown cache; keep the (marked) prefix
        if not f.startswith(os.path.basename(prefix)):
            os.remove(os.path.join(d, f))
    assert run(toks, lens, cache_dir=d, ident="m")[0][1, 0, 0, 0, 0] == 1234.0
    other = toks.copy()
    other[0, 0] = (other[0, 0] + 1) % cfg.vocab_size  # prefix no longer matches: full pass
    assert run(other, lens, cache_dir=d, ident="m")[0][1, 0, 0, 0, 0] != 1234.0
    with pytest.raises(ValueError, match="ident"):
        run(toks, lens, cache_dir=d)


def test_prior_acceptance_is_the_mean_over_heldout_sets():
    """The release's acceptance prior: the mean of the held-out sets' per-position acceptance."""
    from flexdraft_jax.training import evaluate

    code, chat = [0.6, 0.4, 0.2], [0.2, 0.2, 0.0]
    rec = {"step": 5, "heldout_acceptance": code, "heldout_chat_acceptance": chat}
    np.testing.assert_allclose(evaluate.prior_acceptance(rec), [0.4, 0.3, 0.1])
    assert evaluate.prior_acceptance({"heldout_acceptance": code}) == code
    assert evaluate.prior_acceptance({"step": 5, "loss": 1.0}) is None
