"""A smoke set compiled at XLA's default optimisation level, as users' programs are.

The suite compiles at backend optimisation level 0 without the CPU fusion emitters
(tests/conftest.py); a bug of the default compilation path would pass it. This runs a few tests
that hold the main paths against their references in a pytest subprocess without those flags:
the model against `transformers` (logits, and cached decoding against a full forward), greedy
decoding in every mode against AR through the device loop, and training steps (the clean pass
computed per step against the cached one).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_XLA_ENV = "FLEXDRAFT_DEFAULT_XLA"  # tests/conftest.py leaves XLA_FLAGS alone under it
FAST_FLAGS = ("--xla_backend_optimization_level", "--xla_cpu_use_fusion_emitters")

SMOKE = [
    "tests/test_model_hf.py::test_logits_match_transformers[llama_tied]",
    "tests/test_model_hf.py::test_cached_decoding_equals_full_forward[qwen3_untied]",
    "tests/test_decoding.py::test_every_mode_equals_ar_through_the_device_loop[4]",
    "tests/test_training.py::test_cached_clean_pass_equals_the_full_step",
    "tests/test_default_xla.py::test_the_xla_flags_of_this_run",
]


def test_the_xla_flags_of_this_run():
    """The suite's fast flags, or none of them in the smoke set's subprocess."""
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get(DEFAULT_XLA_ENV):
        assert not any(f in flags for f in FAST_FLAGS), flags
    else:
        assert all(f in flags for f in FAST_FLAGS), flags


@pytest.mark.slow
def test_smoke_set_at_the_default_xla_level():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env[DEFAULT_XLA_ENV] = "1"
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "", *SMOKE],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    tail = res.stdout[-3000:] + res.stderr[-2000:]
    assert res.returncode == 0, tail
    assert f"{len(SMOKE)} passed" in res.stdout, tail
