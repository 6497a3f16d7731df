"""Bad input fails first: before anything compiles, is profiled or timed, with a message that names
the bad value (STYLE: errors say what was wrong and with which values).

Library configuration (`DraftConfig`, `EngineConfig`, `SamplingParams`, `Decoder`, `ar.generate`,
the benchmark harness) validates; the launch scripts rely on it and on absl flag bounds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from flexdraft_jax.bench import harness
from flexdraft_jax.decoding import ar, engine
from flexdraft_jax.decoding.decoder import Decoder
from flexdraft_jax.decoding.sampling import SamplingParams
from flexdraft_jax.models import transformer as tf
from flexdraft_jax.models.config import MAX_BLOCK_SIZE, DraftConfig, ModelConfig
from flexdraft_jax.models.draft import Draft, target_fingerprint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[1, 2, 3], [5, 6, 7, 8]]


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig(arch="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8,
                      max_position_embeddings=256)  # fmt: skip
    target = tf.init_target(cfg, jax.random.PRNGKey(0))
    dcfg = DraftConfig(depth=2, block_size=4, calib_rank=16)
    draft = tf.init_draft(cfg, dcfg, target, jax.random.PRNGKey(1))
    return cfg, target, dcfg, draft


@contextlib.contextmanager
def compiles_nothing():
    """Fails the test if XLA compiles anything inside the block."""
    seen = []

    def listen(name, *a, **k):
        if "backend_compile" in name:
            seen.append(name)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert not seen, f"compiled {len(seen)} programs before refusing the input"


def refused(match, fn, *args, **kwargs):
    with compiles_nothing(), pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)


# ----------------------------------------------------------------------------- block size


@pytest.mark.parametrize("block_size", [0, 1, MAX_BLOCK_SIZE + 1, 1000])
def test_block_size_outside_the_documented_range_is_refused(tiny, block_size):
    cfg, target, dcfg, draft = tiny
    want = rf"block_size must be in \[2, {MAX_BLOCK_SIZE}\], got {block_size}"
    refused(want, DraftConfig, depth=2, block_size=block_size)
    # The launch scripts' override of a draft's block size goes through the same check.
    refused(want, dataclasses.replace, dcfg, block_size=block_size)


def test_block_sizes_at_the_ends_of_the_range_build():
    assert DraftConfig(block_size=2).block_size == 2
    assert DraftConfig(block_size=MAX_BLOCK_SIZE).block_size == MAX_BLOCK_SIZE


@pytest.mark.parametrize("script", ["generate.py", "benchmark.py", "demo.py"])
@pytest.mark.parametrize("value", ["0", "1000"])
def test_launch_scripts_refuse_a_block_size_outside_the_range(script, value):
    """absl bounds on --block_size (generate, benchmark); the demo has no such flag and refuses
    it as unknown. Refused at flag parsing, before a model is loaded."""
    extra = {"generate.py": "--prompt=hi", "benchmark.py": "--output_dir=/nonexistent",
             "demo.py": "--workdir=/nonexistent"}[script]  # fmt: skip
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", script), f"--block_size={value}", extra],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode != 0
    if script == "demo.py":
        assert "Unknown command line flag 'block_size'" in res.stderr, res.stderr
    else:
        want = f"--block_size={value}: {value} is not an integer in the range [2, 64]"
        assert want in res.stderr, res.stderr
    assert "target" not in res.stderr  # nothing was loaded (the scripts log the target first)


# ----------------------------------------------------------------------------- engine settings


@pytest.mark.parametrize("threshold", [float("nan"), -0.1, 1.5, float("inf")])
def test_threshold_outside_zero_one_is_refused(threshold):
    refused(rf"threshold must be in \[0, 1\], got {threshold}", engine.EngineConfig,
            threshold=threshold)  # fmt: skip


@pytest.mark.parametrize(
    "field, value",
    [("alpha_prior_weight", float("nan")), ("spec_margin", float("nan")),
     ("alpha_decay", float("nan")), ("probe_budget", float("nan"))],
)  # fmt: skip
def test_nan_engine_settings_are_refused(field, value):
    refused(f"{field} must be", engine.EngineConfig, **{field: value})


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1.0])
def test_temperature_must_be_finite_and_non_negative(temperature):
    refused(f"temperature must be >= 0 and finite, got {temperature}", SamplingParams,
            temperature=temperature)  # fmt: skip


def test_top_k_above_the_vocabulary_is_refused(tiny):
    cfg, target, dcfg, draft = tiny
    sp = SamplingParams(temperature=1.0, top_k=cfg.vocab_size + 1)
    want = f"top_k {cfg.vocab_size + 1} exceeds the vocabulary of {cfg.vocab_size} tokens"
    refused(want, Decoder, cfg, target, draft, dcfg, engine.EngineConfig(sampling=sp))
    refused(want, ar.generate, cfg, target, PROMPTS, 4, sampling_params=sp)
    # The whole vocabulary is a valid top_k (every token stays).
    full = SamplingParams(temperature=1.0, top_k=cfg.vocab_size)
    assert len(ar.generate(cfg, target, PROMPTS, 3, sampling_params=full).tokens[0]) == 3


# ----------------------------------------------------------------------------- the cache


def test_a_cache_past_max_position_embeddings_is_refused(tiny):
    cfg, target, dcfg, draft = tiny
    want = "a KV cache of 257 slots exceeds the model's max_position_embeddings \\(256\\)"
    refused(want, Decoder, cfg, target, draft, dcfg, cache_len=257)
    refused(want, ar.generate, cfg, target, PROMPTS, 4, cache_len=257)
    # Without an explicit cache AR sizes one for the prompt and the new tokens: past the
    # model's positions it is refused too.
    refused("a KV cache of 258 slots", ar.generate, cfg, target, [[1] * 250], 8)
    assert Decoder(cfg, target, draft, dcfg).cache_len == 256  # the default: at most the model's
    assert Decoder(cfg, target, draft, dcfg, cache_len=256).cache_len == 256


def test_bad_prompts_fail_before_the_benchmark_profiles_or_compiles(tiny, tmp_path, monkeypatch):
    cfg, target, dcfg, draft = tiny

    def no_profile(*a, **k):
        raise AssertionError("profiled before the prompts were validated")

    monkeypatch.setattr(Decoder, "measure", no_profile)
    for prompts, match in (
        ([[1, 2], [3, 999]], "prompt 1 has token ids outside \\[0, 64\\): \\[999\\]"),
        ([[1, 2], []], "prompt 1 is empty"),
        ([[1] * 40], "exceeds the KV cache capacity 48"),
    ):
        refused(match, harness.run_benchmark, cfg, target, None, draft, dcfg, prompts,
                batch_sizes=(1,), modes=("flex",), max_new_tokens=4, cache_len=48,
                output_dir=str(tmp_path))  # fmt: skip
    dec = Decoder(cfg, target, draft, dcfg, cache_len=48)
    refused("max_new_tokens must be >= 1, got 0", dec.start, PROMPTS, 0)
    refused("prompt 0 has token ids outside", dec.start, [[-1]], 4)


# ----------------------------------------------------------------------------- the draft's target


def test_a_draft_for_another_target_of_the_same_shape_is_refused(tiny):
    """`Draft.target` (the fingerprint of the target it was trained for): another checkpoint of
    the same architecture is refused, and so is a fine-tune that moved the embedding table by 1%;
    the same target cast to bfloat16 is accepted."""
    cfg, target, dcfg, draft = tiny
    mine = Draft(draft, dcfg, target=target_fingerprint(cfg, target))
    other = tf.init_target(cfg, jax.random.PRNGKey(7))
    noise = lambda x: 0.01 * jnp.std(x) * jax.random.normal(jax.random.PRNGKey(5), x.shape)
    tuned = jax.tree.map(lambda x: x + noise(x), target)
    for wrong in (other, tuned):
        refused(f"the draft was trained for a different target \\(fingerprint {mine.target}",
                Decoder, cfg, wrong, mine)  # fmt: skip
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), target)
    assert Decoder(cfg, bf16, mine).ecfg.mode == "flex"  # accepted (no error)
