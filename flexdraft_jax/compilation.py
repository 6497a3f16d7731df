"""Compilation: JAX's persistent compilation cache, and a clock of the seconds spent compiling.

A decode compiles its prefill and its steps before the first token; on a short prompt that is most
of a run's wall time. With the persistent cache, a second process over the same shapes (same
model, batch size, cache capacity, XLA flags) loads those executables from disk instead.

  enable_cache(path)  turn the cache on (DEFAULT_DIR unless told otherwise; "none": leave it off)
  seconds()           seconds this thread has spent tracing, lowering and compiling so far
  waited(seconds)     count time this thread spent waiting for another thread's compilation

The cache directory is `$FLEXDRAFT_JAX_COMPILATION_CACHE` if set (a path, or "none" to disable),
else ~/.cache/flexdraft_jax/xla. A directory the user set through `jax_compilation_cache_dir` wins
over ours. As JAX warns, a compilation cache is trusted code: keep it private to its user.
"""

from __future__ import annotations

import os
import threading

import jax
from jax.experimental.compilation_cache import compilation_cache

ENV = "FLEXDRAFT_JAX_COMPILATION_CACHE"
DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "flexdraft_jax", "xla")
DEFAULT = "default"  # `enable_cache` argument: $FLEXDRAFT_JAX_COMPILATION_CACHE, else DEFAULT_DIR

# The compile phases JAX reports through jax.monitoring (a persistent-cache hit skips the last).
_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_lock = threading.Lock()
_totals: dict[int, float] = {}  # thread id -> seconds
_listening = [False]
_declined = [False]


def resolve(path: str | None = DEFAULT) -> str | None:
    """The cache directory `path` stands for (None: no cache)."""
    if path == DEFAULT:
        path = os.environ.get(ENV) or DEFAULT_DIR
    if not path or path.lower() == "none":
        return None
    return os.path.abspath(os.path.expanduser(path))


def enable_cache(path: str | None = DEFAULT) -> str | None:
    """Turn on JAX's persistent compilation cache in `path` (`resolve`); returns the directory in
    use, None when off. Every executable is kept, however fast it compiled: the step programs
    compile in about a second each on a CPU, under JAX's default threshold for caching."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current  # the user's own setting, or ours from an earlier call
    if path == DEFAULT and _declined[0]:
        return None  # turned off explicitly earlier (a launch script's --compilation_cache=none)
    path = resolve(path)
    if path is None:
        _declined[0] = True
        return None
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    # JAX decides once per process whether the cache is in use, at the first compilation (the
    # weights' conversion has usually compiled something already): let it decide again.
    compilation_cache.reset_cache()
    return path


def _listen(event: str, duration: float, **_) -> None:
    if event in _EVENTS:  # reported on the thread that compiled
        waited(duration)


def waited(duration: float) -> None:
    """Count `duration` seconds as compilation on this thread (waiting for a compilation on a
    background thread blocks this one as much as compiling)."""
    with _lock:
        me = threading.get_ident()
        _totals[me] = _totals.get(me, 0.0) + duration


def seconds() -> float:
    """Seconds this thread has spent tracing, lowering and compiling (or waiting for another
    thread's compilation) since the first call: compilations in the background run beside it
    and are not counted."""
    with _lock:
        if not _listening[0]:
            jax.monitoring.register_event_duration_secs_listener(_listen)
            _listening[0] = True
        return _totals.get(threading.get_ident(), 0.0)
