"""Sampling: temperature / top-k / top-p, applied identically to target and draft distributions.

`SamplingParams` is static (hashable) configuration. `probs(logits, sp)` returns the processed
distribution [..., V]; with temperature 0 it is the one-hot argmax (greedy), which makes every
verification rule reduce to exact greedy matching.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def __post_init__(self):
        if not 0 <= self.temperature < float("inf"):  # (NaN fails every comparison)
            raise ValueError(f"temperature must be >= 0 and finite, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def check_vocab(self, vocab_size: int) -> None:
        """Refuse a top_k the model's vocabulary cannot fill."""
        if self.top_k > vocab_size:
            raise ValueError(f"top_k {self.top_k} exceeds the vocabulary of {vocab_size} tokens")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def probs(logits, sp: SamplingParams):
    """Processed distribution float32[..., V]."""
    logits = logits.astype(jnp.float32)
    if sp.greedy:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    logits = logits / sp.temperature
    if sp.top_k:  # (a restricted draft vocabulary may hold fewer than top_k ids: all stay)
        kth = jax.lax.top_k(logits, min(sp.top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sp.top_p < 1.0:
        srt = jnp.sort(logits, axis=-1)[..., ::-1]
        cum = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        keep = (cum - jax.nn.softmax(srt, axis=-1)) < sp.top_p
        cutoff = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.nn.softmax(logits, axis=-1)


def sample(key, p):
    """Draw from distributions p [..., V] (rows of zeros never occur: p comes from `probs`)."""
    return jax.random.categorical(key, jnp.log(jnp.maximum(p, 1e-38)), axis=-1).astype(jnp.int32)


def choose(key, logits, sp: SamplingParams):
    """Token from logits: argmax when greedy, else a draw from the processed distribution."""
    if sp.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return sample(key, probs(logits, sp))
