"""Verification rules: how many drafts a target pass accepts, and the bonus token (DESIGN §2.4).

All rules take the target's logits at candidate rows [B, R, V], the candidate block
`cand = [x0, d1 .. d(W-1)]` [B, W], the verify length `v` (drafts d1..dv are checked; v <= R - 1)
and, for sampling, the draft distributions q [B, W-1, V] the drafts were drawn from. They return
`acc` int32[B] (leading accepted drafts, 0..v) and `bonus` int32[B].

  greedy       accept d(i+1) iff it equals the target's argmax at row i (exact in float32)
  speculative  accept with probability min(1, p(d)/q(d)); on the first rejection draw the bonus from
               norm(max(p - q, 0)); if all v are accepted draw it from p at row v (lossless)
  match        the public release's rule: draw t_i ~ p_i and accept while t_i == d(i+1) (lossless,
               accepts less)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flexdraft_jax.decoding import sampling

RULES = ("speculative", "match")


def leading_run(ok):
    """ok bool[B, R] -> int32[B]: length of the leading run of True."""
    return jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)


def _drafts_vs_rows(cand, num_rows, v):
    """Drafts aligned with rows 0..R-2 ([B, R-1]) and the mask of rows that are verified."""
    drafts = cand[:, 1:num_rows]
    valid = jnp.arange(num_rows - 1)[None, :] < v
    return drafts, valid


def greedy(logits, cand, v):
    t = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, R]
    drafts, valid = _drafts_vs_rows(cand, logits.shape[1], v)
    acc = leading_run((t[:, :-1] == drafts) & valid)
    return acc, jnp.take_along_axis(t, acc[:, None], axis=1)[:, 0]


def match(key, logits, cand, v, sp: sampling.SamplingParams):
    t = sampling.choose(key, logits, sp)  # [B, R]
    drafts, valid = _drafts_vs_rows(cand, logits.shape[1], v)
    acc = leading_run((t[:, :-1] == drafts) & valid)
    return acc, jnp.take_along_axis(t, acc[:, None], axis=1)[:, 0]


def speculative(key, logits, cand, q, v, sp: sampling.SamplingParams):
    r = logits.shape[1]
    p = sampling.probs(logits, sp)  # [B, R, V]
    drafts, valid = _drafts_vs_rows(cand, r, v)
    qr = q[:, : r - 1]
    p_d = jnp.take_along_axis(p[:, :-1], drafts[..., None], axis=-1)[..., 0]
    q_d = jnp.take_along_axis(qr, drafts[..., None], axis=-1)[..., 0]
    k_u, k_res = jax.random.split(key)
    u = jax.random.uniform(k_u, p_d.shape)
    accept = u * q_d < p_d  # u < p/q without dividing by a zero q
    acc = leading_run(accept & valid)
    p_acc = jnp.take_along_axis(p, acc[:, None, None], axis=1)[:, 0]  # [B, V]
    q_pad = jnp.concatenate([qr, jnp.zeros_like(p[:, :1])], axis=1)  # row R-1 has no draft
    q_acc = jnp.take_along_axis(q_pad, acc[:, None, None], axis=1)[:, 0]
    rejected = acc < v
    residual = jnp.maximum(p_acc - q_acc, 0.0)
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p_acc)
    dist = jnp.where(rejected[:, None], residual, p_acc)
    return acc, sampling.sample(k_res, dist)


def verify(key, logits, cand, q, v, sp: sampling.SamplingParams, rule: str = "speculative"):
    """Dispatch on the (static) sampling params and rule."""
    if sp.greedy:
        return greedy(logits, cand, v)
    if rule == "match":
        return match(key, logits, cand, v, sp)
    if rule != "speculative":
        raise ValueError(f"unknown verification rule {rule!r}; choose from {RULES}")
    return speculative(key, logits, cand, q, v, sp)
