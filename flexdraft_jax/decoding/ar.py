"""Plain autoregressive decoding: the slow twin every speculative mode is tested against.

`generate(cfg, params, prompts, max_new_tokens, ...)` prefills a batch of prompts of different
lengths (padded to a bucket, lengths tracked per sequence), then runs one jitted step per token
that donates the cache. Greedy or temperature / top-k / top-p sampling; per-sequence stop on EOS
or `max_new_tokens`. With a `mesh` it is one SPMD program (`placement`): the batch over the data
axes, the cache over batch and kv heads, the parameters as they are sharded (or placed by the
decoding rules); every process makes the same call and gets every sequence's tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from flexdraft_jax.common import round_up
from flexdraft_jax.decoding import placement, sampling
from flexdraft_jax.models import layouts
from flexdraft_jax.models import transformer as tf
from flexdraft_jax.models.config import ModelConfig


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per prompt (prompt excluded, EOS included if hit)
    stats: dict


def match_rate(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """The share of `reference`'s tokens that `tokens` reproduces before the first position where
    they differ, pooled over sequences (1.0: identical). After a difference the two continue
    from different prefixes, so later agreement would be chance. In bfloat16 a speculative
    decode may part from AR where two logits tie within rounding (`models/precision.py`)."""
    if len(tokens) != len(reference):
        raise ValueError(f"{len(tokens)} sequences against {len(reference)} in the reference")
    same = total = 0
    for t, r in zip(tokens, reference):
        n = next((i for i, (a, b) in enumerate(zip(t, r)) if a != b), min(len(t), len(r)))
        same, total = same + n, total + len(r)
    return same / max(total, 1)


def bucket(n: int, minimum: int = 8) -> int:
    """The prompt width a batch is padded to: the smallest `m * 2**k >= n` with m in 4..7, at
    least `minimum` (8, 10, 12, 14, 16, 20, 24, 28, 32, 40, ...).

    Static shapes: a few compilations cover all prompt lengths (four per octave), and padding
    wastes under a quarter of the prefill (power-of-two widths waste up to half; a batch of
    75-token prompts prefilled at 128 took 1.6x as long as at 80)."""
    b = minimum
    while b < n:
        b *= 2
    quarters = [b // 8 * m for m in (5, 6, 7)] if b % 8 == 0 else []  # between b / 2 and b
    return next((q for q in quarters if q >= max(n, minimum)), b)


def validate_prompts(prompts, vocab_size: int) -> np.ndarray:
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in p if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")
    return np.array([len(p) for p in prompts], np.int32)


def pad_prompts(prompts, width: int) -> np.ndarray:
    out = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        out[i, : len(p)] = p
    return out


WINDOW = 128  # decode steps read the KV cache up to the next multiple of this


def check_cache_len(cfg: ModelConfig, slots: int) -> None:
    """Refuse a KV cache with slots past the model's `max_position_embeddings` (positions it was
    never trained at)."""
    if slots > cfg.max_position_embeddings:
        raise ValueError(
            f"a KV cache of {slots} slots exceeds the model's max_position_embeddings "
            f"({cfg.max_position_embeddings}): positions past it were never trained"
        )


def check_capacity(
    lengths: np.ndarray, max_new_tokens: int, extra: int, capacity: int, extra_name: str = ""
) -> None:
    """Refuse a batch whose longest prompt, `max_new_tokens` and `extra` working slots (named
    `extra_name` in the error) do not fit a KV cache of `capacity` slots."""
    need = int(lengths.max()) + max_new_tokens + extra
    if need > capacity:
        raise ValueError(
            f"longest prompt ({int(lengths.max())} tokens) + max_new_tokens ({max_new_tokens})"
            f" + {extra_name or f'{extra} working slots'} = {need} exceeds the KV cache "
            f"capacity {capacity}"
        )


@functools.partial(jax.jit, static_argnames=("cfg", "sp"))
def _prefill(cfg, params, tokens, lengths, cache, key, sp):
    lay = layouts.causal(jnp.zeros_like(lengths), tokens.shape[1])
    h, _, cache = tf.forward(
        cfg, params, tokens, lay.positions, lay.meta, cache, return_hidden=True,
        kv_window=tokens.shape[1],  # every visible key is a prompt row: not the capacity
    )  # fmt: skip
    last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]
    logits = tf.lm_head(cfg, params, last)
    return sampling.choose(key, logits, sp), _pin(cfg, cache._replace(lengths=lengths))


def _pin(cfg, cache):
    """The cache in its layout on the mesh in context (a no-op without one)."""
    kv = functools.partial(placement.cache, cfg=cfg)
    return tf.KVCache(kv(cache.k), kv(cache.v), placement.batch(cache.lengths))


@functools.partial(jax.jit, static_argnames=("cfg", "sp", "window"), donate_argnums=(3,))
def _step(cfg, params, token, cache, key, sp, window=None):
    lay = layouts.causal(cache.lengths, 1)
    logits, _, cache = tf.forward(
        cfg, params, token[:, None], lay.positions, lay.meta, cache, kv_window=window
    )
    nxt = sampling.choose(key, logits[:, 0], sp)
    return nxt, _pin(cfg, cache._replace(lengths=cache.lengths + 1))


def generate(
    cfg: ModelConfig,
    params,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    sampling_params: sampling.SamplingParams = sampling.SamplingParams(),
    eos_ids=None,
    seed: int = 0,
    cache_len: int | None = None,
    mesh=None,
) -> Generation:
    """Generate up to `max_new_tokens` per prompt, stopping each sequence at its first EOS.
    mesh: decode as one SPMD program on it (see the module docstring); None: one device."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling_params.check_vocab(cfg.vocab_size)
    lengths = validate_prompts(prompts, cfg.vocab_size)
    width = bucket(int(lengths.max()))
    capacity = cache_len or round_up(max(width, int(lengths.max()) + max_new_tokens), 64)
    check_capacity(lengths, max_new_tokens, 0, capacity)
    check_cache_len(cfg, cache_len or int(lengths.max()) + max_new_tokens)
    eos = set(cfg.eos_token_ids if eos_ids is None else eos_ids)
    b = len(prompts)
    key = jax.random.PRNGKey(seed)
    dtype = params["embed"]["embedding"].dtype
    tokens = pad_prompts(prompts, width)
    if mesh is None:
        cache = tf.init_cache(cfg, b, capacity, dtype)
        tokens, lens, rep, ctx = jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray, None
    else:
        if placement.mesh_of(params) is None:
            params = placement.place_params(cfg, params, mesh)
        cache = placement.init_cache(cfg, b, capacity, dtype, mesh)
        tokens, lens = placement.put_batch(tokens, mesh), placement.put_batch(lengths, mesh)
        rep, ctx = functools.partial(placement.put_replicated, mesh=mesh), mesh
    on_mesh = contextlib.nullcontext if ctx is None else functools.partial(jax.set_mesh, ctx)
    t0 = time.perf_counter()
    key, sub = jax.random.split(key)
    with on_mesh():
        tok, cache = _prefill(cfg, params, tokens, lens, cache, rep(sub), sampling_params)
    out = [[] for _ in range(b)]
    done = np.zeros(b, bool)
    steps = 0
    while True:
        host = placement.to_host(tok)
        for i in range(b):
            if not done[i]:
                out[i].append(int(host[i]))
                done[i] = host[i] in eos or len(out[i]) >= max_new_tokens
        if done.all():
            break
        key, sub = jax.random.split(key)
        # Attend only to the filled part of the cache, in steps of WINDOW slots (a few compiles).
        window = min(capacity, round_up(int(lengths.max()) + steps + 1, WINDOW))
        with on_mesh():
            tok, cache = _step(cfg, params, tok, cache, rep(sub), sampling_params, window)
        steps += 1
    elapsed = time.perf_counter() - t0
    n = sum(len(o) for o in out)
    return Generation(out, {"steps": steps, "tokens": n, "seconds": elapsed, "tau": 1.0})
