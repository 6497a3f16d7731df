"""The flex policy: which branch a decode step runs (DESIGN §2.3, "Flex decoding").

Pure functions of the branches on offer, the engine's settings (`engine.EngineConfig`), the running
statistics a decode state carries and a cost profile (`costs.CostProfile.costs`: seconds per branch
and a trailing draft pass), traced on device inside the compiled step; nothing here reads a clock.

  choose             the branch index for the next step
  first_choice       the branch the first step would take, from the prior (host side)
  drafts_at_prefill  whether a prefill should run the mask block (host side, before it runs)
  expected_tokens    1 + sum_{i<=v} prod_{j<=i} alpha_j
  alpha_prior        the prior acceptance per draft position from `EngineConfig.alpha_init`
  alpha_scale        acceptance per unit of draft confidence before any verify
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def expected_tokens(alpha, v):
    """1 + sum_{i<=v} prod_{j<=i} alpha_j: expected committed tokens when verifying v drafts."""
    cum = jnp.cumprod(alpha)
    return 1.0 + jnp.sum(jnp.where(jnp.arange(1, alpha.shape[0] + 1) <= v, cum, 0.0))


def choose(branches, ecfg, v, has_drafts, alpha, gain_v, ar_streak, probe_every, costs):
    """Branch index int32[] among `branches` ((kind, rows) pairs).

    A fixed mode (no AR branch) takes the smallest row bucket that holds v + 1 rows. Flex decides
    whether to speculate by expected tokens per second from the running acceptance `alpha`
    float32[W-1] against an AR step's (speculation must win by `ecfg.spec_margin`; a missing
    draft block adds the draft pass to its cost), probing speculation again after `probe_every`
    AR steps in a row within `ecfg.probe_budget`. Which speculative branch, with drafts in hand
    under `ecfg.gain` "confidence": the same rate from these drafts' own expected tokens `gain_v`
    float32[W] (None: by the acceptance)."""
    kinds = [k for k, _ in branches]
    rows = jnp.asarray([r for _, r in branches])
    if kinds == ["ar"]:
        return jnp.zeros((), jnp.int32)
    if "ar" not in kinds:
        return jnp.argmax(rows >= v + 1).astype(jnp.int32)
    is_ar = jnp.asarray([k == "ar" for k in kinds])
    verified = jnp.minimum(v, rows - 1)  # drafts each branch verifies
    gain = jnp.stack(
        [jnp.asarray(1.0) if k == "ar" else expected_tokens(alpha, n)
         for k, n in zip(kinds, verified)]
    )  # fmt: skip
    refill = jnp.where(has_drafts, 0.0, costs[-1])
    cost = jnp.maximum(costs[:-1] + jnp.where(is_ar, 0.0, refill), 1e-9)
    score = gain / cost / jnp.where(is_ar, 1.0, 1.0 + ecfg.spec_margin)
    ar_cost = jnp.min(jnp.where(is_ar, cost, jnp.inf))
    probe_extra = jnp.min(jnp.where(is_ar, jnp.inf, cost)) / ar_cost - 1.0  # in AR steps
    probing = (ar_streak >= probe_every) & (ar_streak >= probe_extra / ecfg.probe_budget)
    score = jnp.where(is_ar & probing, -jnp.inf, score)
    idx = jnp.argmax(score).astype(jnp.int32)
    if ecfg.gain == "acceptance" or gain_v is None:
        return idx
    own = jnp.where(is_ar, -jnp.inf, gain_v[verified] / cost)
    return jnp.where(is_ar[idx] | ~has_drafts, idx, jnp.argmax(own)).astype(jnp.int32)


# One small program for the host-side call: op by op, its few dozen operations would each compile.
_choose = jax.jit(choose, static_argnums=(0, 1))


def first_choice(branches, ecfg, width: int, costs) -> int:
    """The branch the policy would take first with drafts in hand at the longest verify length
    and the prior acceptance (the drafts' confidence is not known before the prefill): host side,
    before the prefill runs."""
    return int(
        _choose(
            branches, ecfg, jnp.asarray(width - 1, jnp.int32), jnp.array(True),
            alpha_prior(ecfg.alpha_init, width), None, jnp.zeros((), jnp.int32),
            jnp.asarray(ecfg.probe_interval, jnp.int32), jnp.asarray(costs),
        )
    )  # fmt: skip


def drafts_at_prefill(branches, ecfg, width: int, costs) -> bool:
    """Whether a prefill should run the mask block, before it runs (host side).

    Not when the policy would take an AR step first even with drafts in hand (`first_choice`):
    flex at a batch size where speculation does not pay then prefills like AR mode (the mask
    block adds about a quarter to a small prefill on CPU), and a later probe starts with a draft
    pass, as after any AR step. Needs the prior known before the prefill (`alpha_init` not
    None)."""
    kinds = [k for k, _ in branches]
    if "ar" not in kinds or ecfg.alpha_init is None:
        return any(k != "ar" for k in kinds)
    if ecfg.alpha_scale is not None:  # the prior comes with the drafts: could the most
        # confident drafts (confidence 1) win here?
        best = tuple(float(a) for a in np.asarray(scaled_prior(ecfg, width, 1.0)))
        ecfg = dataclasses.replace(ecfg, alpha_init=best, alpha_scale=None)
    return kinds[first_choice(branches, ecfg, width, costs)] != "ar"


def alpha_prior(alpha_init, w: int) -> jnp.ndarray:
    """float32[W-1] from EngineConfig.alpha_init (None: 0.5 until the prefill's confidences)."""
    if alpha_init is None or alpha_init == "draft":  # "draft" unresolved: no Decoder in between
        alpha_init = 0.5
    a = np.broadcast_to(np.asarray(alpha_init, np.float32), (w - 1,))
    return jnp.asarray(np.clip(a, 0.0, 1.0))


def alpha_scale(ecfg, w: int):
    """float32[W-1] from EngineConfig.alpha_scale (1 when None; one recorded for another block
    size: its mean)."""
    if ecfg.alpha_scale is None:
        return jnp.ones((w - 1,), jnp.float32)
    a = np.asarray(ecfg.alpha_scale, np.float32)
    if a.shape != (w - 1,):
        a = np.full((w - 1,), a.mean(), np.float32)
    return jnp.asarray(a)


def scaled_prior(ecfg, w: int, conf):
    """The prior acceptance float32[W-1] of a prompt batch whose prefill drafts have mean
    confidence `conf` (per position): conf * alpha_scale, at most alpha_lift * the alpha_init
    prior (None: no bound), clipped to [0.05, 0.95]."""
    a = conf * alpha_scale(ecfg, w)
    if ecfg.alpha_init is not None:
        a = jnp.minimum(a, ecfg.alpha_lift * alpha_prior(ecfg.alpha_init, w))
    return jnp.clip(a, 0.05, 0.95).astype(jnp.float32)
