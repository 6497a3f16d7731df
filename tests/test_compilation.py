"""The persistent compilation cache: a second process decoding the same shapes compiles nothing.

Each run is a fresh Python process (the cache is per process in memory, on disk across them). The
child counts JAX's own cache events (`jax.monitoring`): a compilation that found no entry on disk
records a miss.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(
    """
    import json, sys
    import jax
    from flexdraft_jax.decoding import engine
    from flexdraft_jax.decoding.decoder import Decoder, RunConfig
    from flexdraft_jax.models import transformer as tf
    from flexdraft_jax.models.config import DraftConfig, ModelConfig

    events = {}
    jax.monitoring.register_event_listener(
        lambda name, **_: events.__setitem__(name, events.get(name, 0) + 1)
    )
    cfg = ModelConfig(arch="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    target = tf.init_target(cfg, jax.random.PRNGKey(0))
    dcfg = DraftConfig(depth=1, block_size=4, calib_rank=8)
    draft = tf.init_draft(cfg, dcfg, target, jax.random.PRNGKey(1))
    dec = Decoder(cfg, target, draft, dcfg, engine.EngineConfig(mode=sys.argv[1]), cache_len=64,
                  eos_ids=(), run=RunConfig(dispatch=sys.argv[2]))
    gen = dec.generate([[1, 2, 3], [4, 5]], 8)
    keys = ("wall_seconds", "time_to_first_token", "compile_seconds")
    print(json.dumps({
        "cache": dec.compilation_cache, "tokens": gen.tokens,
        "hits": events.get("/jax/compilation_cache/cache_hits", 0),
        "misses": events.get("/jax/compilation_cache/cache_misses", 0),
        **{k: gen.stats[k] for k in keys},
    }))
    """
)


def _run(cache_dir, mode, dispatch):
    env = dict(os.environ, FLEXDRAFT_JAX_COMPILATION_CACHE=str(cache_dir))
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode, dispatch],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _entries(cache_dir):
    return sorted(os.listdir(cache_dir))


@pytest.mark.parametrize("mode,dispatch", [("flex", "device"), ("flex", "host")])
def test_a_second_process_compiles_nothing(tmp_path, mode, dispatch):
    first = _run(tmp_path, mode, dispatch)
    assert first["cache"] == str(tmp_path) and first["misses"] > 0 and first["hits"] == 0
    stored = _entries(tmp_path)
    assert len(stored) >= first["misses"]  # every executable compiled went to disk
    second = _run(tmp_path, mode, dispatch)
    assert second["misses"] == 0 and second["hits"] == first["misses"], (first, second)
    assert _entries(tmp_path) == stored
    assert second["tokens"] == first["tokens"]
    for run in (first, second):
        assert 0 < run["time_to_first_token"] <= run["wall_seconds"]
        assert 0 < run["compile_seconds"] <= run["wall_seconds"]


def test_the_cache_stays_off_when_declined(tmp_path):
    """'none' turns it off; the suite itself runs without one (conftest)."""
    off = _run("none", "ar", "host")
    assert off["cache"] is None and off["hits"] == off["misses"] == 0
