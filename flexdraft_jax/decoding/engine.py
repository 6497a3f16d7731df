"""The flex decoding engine: AR, sequential, parallel and flex steps in one jitted function.

State per sequence (DESIGN §2.3): the clean-row KV cache, the candidate block
`cand = [x0, d1 .. d(W-1)]` (x0 = last bonus, committed but not cached), the draft distributions q
(sampling only), and a batch-level verify length `v`. A step is one `lax.switch` among branches:

  ("ar", 1)    plain AR: x0 through all layers, bonus = target's choice; no drafts afterwards
  ("seq", R)   verify pass over C[0..R-1], then a draft pass (one mask block, deep layers only)
  ("par", R)   one forward: C[0..R-1] plus R mask groups; group `acc` gives the next drafts

R is a static row bucket >= v + 1 (rows that are never verified are not computed). The branch
index is chosen on device by `choose_branch`: fixed for `ar`, by bucket for `sequential` /
`parallel` / `paper`, by the cost model for `flex`. A speculative branch entered without drafts
(after an AR step) first runs a draft pass. All branches produce the same tokens (tested); they
differ in cost.

Branches never write the KV cache: they attend to it read-only plus the step's own new rows
(`tf.step_forward`) and return those rows (`tf.Pending`); the cache is written once, after the
branch, in place. (XLA copies a buffer that several `lax.switch` branches update.) `run` loops
steps in a `lax.while_loop` on device; every step reads only a static window of the cache that
covers the filled part (`kv_window`), so attention follows the filled length, not the capacity.
`branch_step` runs one branch as its own executable instead (host dispatch, `RunConfig`).

On a mesh (traced under `jax.set_mesh`: `Decoder(mesh=...)`) the same functions run as one SPMD
program: every state they return is pinned to the layout it came in with (`_on_mesh`), so the
donated cache is aliased across calls.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flexdraft_jax.decoding import placement, policy, sampling, verify
from flexdraft_jax.models import layouts
from flexdraft_jax.models import transformer as tf
from flexdraft_jax.models.config import DraftConfig, ModelConfig

MODES = ("ar", "sequential", "parallel", "flex", "paper")


# The draft vocabulary of a release that stores one but not the size it was trained over.
DEFAULT_DRAFT_VOCAB = 8192


def draft_vocab_in_use(requested: int | None, recorded: int | None, vocab_len: int | None) -> int:
    """How many leading ids of a draft's vocabulary (`vocab_len` ids; None: it stores none) the
    draft pass uses: `requested` (EngineConfig.draft_vocab_size), else the size the release
    records, else DEFAULT_DRAFT_VOCAB; 0 (the whole vocabulary) when that covers every id."""
    n = requested
    if n is None:
        n = DEFAULT_DRAFT_VOCAB if recorded is None else int(recorded)
    return 0 if vocab_len is None or n >= vocab_len else n


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """What the compiled prefill and steps specialise on (host-side settings: decoder.RunConfig)."""

    mode: str = "flex"
    threshold: float = 0.01  # confidence threshold for the verify length (0 = whole block)
    sampling: sampling.SamplingParams = sampling.SamplingParams()
    rule: str = "speculative"  # or "match" (the public release's sample-and-match)
    buckets: tuple[int, ...] | None = None  # candidate-row buckets; default 2, 4, .., W
    use_calibration: bool = True
    # The cost model's prior acceptance per draft position. "draft": the held-out acceptance the
    # draft release records (`Decoder` resolves it; 0.5 for a draft without one); a float, or one
    # per position; None: the prefill drafts' confidence (mean max-probability of each slot),
    # which is not calibrated and can overstate acceptance, so flex speculates where it loses.
    alpha_init: float | tuple[float, ...] | str | None = "draft"
    # Per prompt batch instead: the prefill drafts' confidence (mean max-probability of each slot)
    # times this, clipped to [0.05, 0.95]; `Decoder` sets it to a release's held-out acceptance
    # over its prefill confidence. One prior cannot serve both a code prompt (confident drafts,
    # often accepted) and a chat prompt (doubtful drafts, rarely accepted); their prefill
    # confidence tells them apart (docs/design.md, "The flex policy"). None: `alpha_init`.
    alpha_scale: tuple[float, ...] | None = None
    # ... but never above this multiple of `alpha_init`: prefill confidence separates kinds of
    # prompt better than prompts of one kind, and an overstated prior makes flex speculate at
    # batch sizes where one wrong step costs several AR steps.
    alpha_lift: float = 1.25
    # The running estimate of each position's acceptance: (hits + w * prior) / (tries + w), hits
    # and tries discounted by `alpha_decay` every step, AR steps included. Evidence outweighs the
    # prior after w verified positions (a few steps at batch 1, one step at batch 64), and when
    # flex stops speculating its estimate returns to the prior rather than staying at the last,
    # noisy value: AR steps verify nothing, so a few early rejections would hold flex in AR.
    alpha_decay: float = 0.95
    alpha_prior_weight: float = 8.0
    # How flex picks among speculative branches once it speculates (whether to speculate rests
    # on the running acceptance either way). "confidence": by the drafts in hand, their expected
    # tokens per sequence from each draft's confidence (its max probability, as for the verify
    # length) times the running ratio of accepted draft positions to the confidence they had
    # (discounted and weighted like the acceptance; 1 until verified positions say otherwise): a
    # confident block is verified further, a doubtful one less far, since a trained draft's
    # confidence tracks its acceptance (docs/design.md, "The flex policy").
    # "acceptance": by the running per-position acceptance, the same for every block.
    gain: str = "confidence"
    # flex: after this many AR steps in a row, try speculating again; each probe that does not
    # win doubles the interval (up to 1024 steps), so a losing drafter costs little.
    probe_interval: int = 16
    # ... and never more often than keeps the cost of failed probes under this fraction of the
    # time: a probe that costs c AR steps waits at least (c - 1) / probe_budget AR steps (a probe
    # of 5 AR steps, as on compute-bound hardware at large batches, at most one per 133 steps).
    probe_budget: float = 0.03
    # flex speculates only when its predicted tokens per second beat AR's by this fraction. The
    # prediction rests on measured step costs and running acceptance rates, both noisy, and a
    # predicted tie gains nothing when right and loses when wrong.
    spec_margin: float = 0.05
    paper_max_parallel_batch: int = 2  # paper rule: parallel at batch <= this, else sequential
    # Drafts are picked among the first this-many ids of the draft's vocabulary (token ids by
    # training frequency, stored with a release): the draft pass's lm_head and calibration output
    # layer shrink by V / N. Verification uses the whole vocabulary, so it stays lossless. None:
    # the size the release records (the one it was trained over), else DEFAULT_DRAFT_VOCAB. 0, or
    # a draft without a stored vocabulary: the whole vocabulary.
    draft_vocab_size: int | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose from {', '.join(MODES)}")
        if not 0 <= self.threshold <= 1:  # (NaN fails every comparison)
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if not 0 < self.probe_budget <= 1:
            raise ValueError(f"probe_budget must be in (0, 1], got {self.probe_budget}")
        if isinstance(self.alpha_init, str) and self.alpha_init != "draft":
            raise ValueError(f"alpha_init: 'draft', numbers or None, not {self.alpha_init!r}")
        if not self.alpha_lift >= 1:
            raise ValueError(f"alpha_lift must be >= 1, got {self.alpha_lift}")
        if self.alpha_scale is not None and not all(a > 0 for a in self.alpha_scale):
            raise ValueError(f"alpha_scale must be positive, got {self.alpha_scale}")
        if not 0 < self.alpha_decay <= 1:
            raise ValueError(f"alpha_decay must be in (0, 1], got {self.alpha_decay}")
        if not self.alpha_prior_weight > 0:
            raise ValueError(f"alpha_prior_weight must be > 0, got {self.alpha_prior_weight}")
        if self.gain not in GAINS:
            raise ValueError(f"gain must be one of {GAINS}, got {self.gain!r}")
        if not self.spec_margin >= 0:
            raise ValueError(f"spec_margin must be >= 0, got {self.spec_margin}")
        if self.draft_vocab_size is not None and self.draft_vocab_size < 0:
            raise ValueError(f"draft_vocab_size must be >= 0, got {self.draft_vocab_size}")
        if self.rule not in verify.RULES:
            raise ValueError(f"unknown verification rule {self.rule!r}; choose from {verify.RULES}")

    def row_buckets(self, block_size: int) -> tuple[int, ...]:
        if self.buckets is not None:
            bad = [r for r in self.buckets if not 2 <= r <= block_size]
            if bad or not self.buckets:
                raise ValueError(f"row buckets must lie in [2, {block_size}], got {self.buckets}")
            out = sorted(set(self.buckets))
            return tuple(out if out[-1] == block_size else out + [block_size])
        out, r = [], 2
        while r < block_size:
            out.append(r)
            r *= 2
        return tuple(out + [block_size])


GAINS = ("confidence", "acceptance")


class Block(NamedTuple):
    """The candidate block [x0, d1 .. d(W-1)] and what is known of its drafts."""

    cand: jnp.ndarray  # int32[B, W]
    q: jnp.ndarray  # float32[B, W-1, V] draft distributions (sampling) or [B, 1, 1] (greedy)
    conf: jnp.ndarray  # float32[B, W-1] each draft's confidence (max probability)
    gain: jnp.ndarray  # float32[W] expected committed tokens verifying 0..W-1 of the drafts
    v: jnp.ndarray  # int32[] verify length for the next step
    has_drafts: jnp.ndarray  # bool[]


class Stats(NamedTuple):
    """Running statistics: the flex policy's inputs and the decode's counters."""

    alpha: jnp.ndarray  # float32[W-1] running conditional acceptance per draft position
    alpha_prior: jnp.ndarray  # float32[W-1] its prior
    seen: jnp.ndarray  # float32[3, W-1] discounted hits, tries and tried confidence
    ar_streak: jnp.ndarray  # int32[] consecutive AR steps (flex probing)
    probe_every: jnp.ndarray  # int32[] current probing interval (backs off after failed probes)
    tried: jnp.ndarray  # int32[W-1] draft positions verified
    hits: jnp.ndarray  # int32[W-1] draft positions accepted
    branches: jnp.ndarray  # int32[n_branches] steps each branch ran


class Output(NamedTuple):
    """Committed tokens and stop state per sequence."""

    out: jnp.ndarray  # int32[B, O] committed tokens (prefill bonus first)
    n_out: jnp.ndarray  # int32[B]
    done: jnp.ndarray  # bool[B]
    steps: jnp.ndarray  # int32[B] steps taken while active
    max_new: jnp.ndarray  # int32[] token budget per sequence (traced: no recompile per length)


class DecodeState(NamedTuple):
    """Everything a decode carries between steps, grouped by concern."""

    cache: tf.KVCache
    block: Block
    stats: Stats
    output: Output
    key: jnp.ndarray


@dataclasses.dataclass(frozen=True)
class Static:
    """Everything the jitted functions specialise on (hashable)."""

    cfg: ModelConfig
    dcfg: DraftConfig
    ecfg: EngineConfig
    branches: tuple[tuple[str, int], ...]
    eos_ids: tuple[int, ...]

    @property
    def width(self) -> int:
        return self.dcfg.block_size


def branches_for(ecfg: EngineConfig, block_size: int, batch: int) -> tuple[tuple[str, int], ...]:
    rows = ecfg.row_buckets(block_size)
    mode = ecfg.mode
    if mode == "paper":
        mode = "parallel" if batch <= ecfg.paper_max_parallel_batch else "sequential"
    if mode == "ar":
        return (("ar", 1),)
    if mode == "sequential":
        return tuple(("seq", r) for r in rows)
    if mode == "parallel":
        return tuple(("par", r) for r in rows)
    return (("ar", 1),) + tuple(("seq", r) for r in rows) + tuple(("par", r) for r in rows)


def state_layout(state: DecodeState, cache_fn, batch_fn, replicated_fn) -> DecodeState:
    """`state` with each leaf mapped by what it is: the cache's k and v (`cache_fn`), per-sequence
    arrays (`batch_fn`: leading dimension B) and everything else (`replicated_fn`)."""
    c, b, o = state.cache, state.block, state.output
    bat, rep = batch_fn, replicated_fn
    return DecodeState(
        cache=tf.KVCache(cache_fn(c.k), cache_fn(c.v), bat(c.lengths)),
        block=Block(bat(b.cand), bat(b.q), bat(b.conf), rep(b.gain), rep(b.v), rep(b.has_drafts)),
        stats=jax.tree.map(rep, state.stats),
        output=Output(bat(o.out), bat(o.n_out), bat(o.done), bat(o.steps), rep(o.max_new)),
        key=rep(state.key),
    )


def _on_mesh(st: Static, state: DecodeState) -> DecodeState:
    """The state pinned to its decoding layout when a mesh is in context (`placement`): the
    cache over batch and kv heads, per-sequence arrays over batch, the rest replicated."""
    if placement.current() is None:
        return state
    kv = functools.partial(placement.cache, cfg=st.cfg)
    return state_layout(state, kv, placement.batch, placement.replicated)


# ----------------------------------------------------------------------------- drafting


def _draft_block(st: Static, target, draft, state: DecodeState, hidden, bonus, key):
    """Calibrated drafts from a mask block's hidden states [B, W, H] and the bonus.

    Returns (Block, conf_mean [W-1]): greedy drafts or draws from q, the confidence verify
    length, each draft's max-probability, the expected tokens per verify length
    (`EngineConfig.gain`); and the mean confidence over active sequences.
    """
    # Slot 0 sits on the bonus's own position: its prediction is never used, so skip its lm_head.
    logits = tf.draft_logits(st.cfg, target, draft, hidden[:, 1:], bonus, st.ecfg.use_calibration)
    ids = draft["head"]["ids"] if "head" in draft else None  # a restricted draft vocabulary
    sp = st.ecfg.sampling
    if sp.greedy:
        drafts, q = jnp.argmax(logits, axis=-1).astype(jnp.int32), state.block.q
    else:
        q = sampling.probs(logits, sp)
        drafts = sampling.sample(key, q)
        if ids is not None:  # q over the whole vocabulary (0 outside the draft's), for verify
            q = jnp.zeros(q.shape[:-1] + (st.cfg.vocab_size,), q.dtype).at[..., ids].set(q)
    if ids is not None:
        drafts = ids[drafts]
    conf = jnp.max(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=-1)  # [B, W-1]
    active = ~state.output.done
    v = verify_length(conf, st.ecfg.threshold, active, st.width)
    n_active = jnp.maximum(active.sum(), 1)
    conf_mean = jnp.sum(jnp.where(active[:, None], conf, 0.0), axis=0) / n_active
    # Per sequence: acceptance of draft j given the ones before = its confidence times the
    # running accepted / confidence ratio of position j; expected tokens 1 + sum of the products.
    # (before any verify: the calibration the release records, `alpha_scale`, else 1)
    w0 = st.ecfg.alpha_prior_weight * state.stats.alpha_prior
    scale = policy.alpha_scale(st.ecfg, st.width)
    ratio = (state.stats.seen[0] + w0) / jnp.maximum(state.stats.seen[2] + w0 / scale, 1e-9)
    a = jnp.clip(conf * ratio, 0.0, 1.0)
    per_seq = 1.0 + jnp.cumsum(jnp.cumprod(a, axis=1), axis=1)  # [B, W-1]: verify 1..W-1
    gain = jnp.sum(jnp.where(active[:, None], per_seq, 0.0), axis=0) / n_active
    gain = jnp.concatenate([jnp.ones((1,), jnp.float32), gain.astype(jnp.float32)])
    cand = jnp.concatenate([bonus[:, None], drafts], axis=1)
    block = Block(cand, q, conf.astype(jnp.float32), gain, v, jnp.array(True))
    return block, conf_mean


def verify_length(conf, threshold: float, active, width: int):
    """The next step's verify length (DESIGN §2.3): per sequence, how many leading drafts keep
    the running product of their confidences >= `threshold`; the maximum over active sequences
    (finished ones do not count), clamped to [1, W-1]. conf float32[B, W-1], active bool[B]
    -> int32[]."""
    v_seq = jnp.sum(jnp.cumprod(conf, axis=1) >= threshold, axis=1)
    v = jnp.max(jnp.where(active, v_seq, 1))
    return jnp.clip(v, 1, width - 1).astype(jnp.int32)


def _view(kv, lengths) -> tf.KVCache:
    """The read-only cache a branch attends to: slots below `lengths` are committed."""
    return tf.KVCache(kv[0], kv[1], lengths)


def _draft_pass(st: Static, target, draft, view, anchor, window: int, pending=None):
    """Mask block anchored at `anchor` [B], deep layers only, against the cache `view` and the
    step's `pending` rows: hidden [B, W, H]."""
    lay = layouts.draft_pass(anchor, st.width)
    empty = jnp.zeros((anchor.shape[0], 0), jnp.int32)
    _, hidden, _ = tf.step_forward(
        st.cfg, target, empty, empty, lay.meta, view, window=window, pending=pending,
        draft=draft, dcfg=st.dcfg, mask_positions=lay.mask_positions,
    )  # fmt: skip
    return hidden


def _refill(st: Static, target, draft, kv, window: int, state: DecodeState):
    """Draft pass anchored at x0 (used when a speculative step follows an AR step)."""
    key, sub = jax.random.split(state.key)
    lengths = state.cache.lengths
    hm = _draft_pass(st, target, draft, _view(kv, lengths), lengths, window)
    block, _ = _draft_block(st, target, draft, state, hm, state.block.cand[:, 0], sub)
    return state._replace(block=block, key=key)


# ----------------------------------------------------------------------------- commit


def _commit(st: Static, state: DecodeState, start, acc, bonus, v_used):
    """Append d1..d(acc) and the bonus per active sequence; update lengths, stop flags, stats."""
    o, stats = state.output, state.stats
    b, w = state.block.cand.shape
    active = ~o.done
    acc = jnp.where(active, acc, 0)
    j = jnp.arange(w)[None, :]
    toks = jnp.where(j < acc[:, None], jnp.roll(state.block.cand, -1, axis=1), bonus[:, None])
    count = acc + 1
    if st.eos_ids:
        is_eos = jnp.isin(toks, jnp.asarray(st.eos_ids)) & (j < count[:, None])
        first = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, count)
        hit_eos = is_eos.any(axis=1)
        count = jnp.minimum(count, first)
    else:
        hit_eos = jnp.zeros((b,), bool)
    count = jnp.where(active, count, 0)
    slots = o.n_out[:, None] + j
    slots = jnp.where(j < count[:, None], slots, o.out.shape[1])  # dropped
    out = o.out.at[jnp.arange(b)[:, None], slots].set(toks, mode="drop")
    n_out = o.n_out + count
    done = o.done | (active & (hit_eos | (n_out >= o.max_new)))
    lengths = jnp.where(active, start + acc + 1, state.cache.lengths)
    # Per-position acceptance: position i (1-based) is tried iff i <= v and all before it passed.
    pos = jnp.arange(1, w)[None, :]
    tried_m = active[:, None] & (pos <= v_used) & (pos <= acc[:, None] + 1)
    hit_m = active[:, None] & (pos <= acc[:, None])
    tried_n, hit_n = tried_m.sum(0), hit_m.sum(0)
    conf_n = jnp.sum(jnp.where(tried_m, state.block.conf, 0.0), axis=0)
    new = jnp.stack([hit_n.astype(jnp.float32), tried_n.astype(jnp.float32), conf_n])
    seen = st.ecfg.alpha_decay * stats.seen + new
    w0 = st.ecfg.alpha_prior_weight
    alpha = (seen[0] + w0 * stats.alpha_prior) / (seen[1] + w0)
    return state._replace(
        cache=state.cache._replace(lengths=lengths),
        output=o._replace(
            out=out, n_out=n_out, done=done, steps=o.steps + active.astype(jnp.int32)
        ),
        stats=stats._replace(
            tried=stats.tried + tried_n.astype(jnp.int32),
            hits=stats.hits + hit_n.astype(jnp.int32),
            alpha=alpha.astype(jnp.float32),
            seen=seen,
        ),
    )


# ----------------------------------------------------------------------------- branches


def _ar_branch(st: Static, target, draft, kv, window: int, state: DecodeState):
    key, sub = jax.random.split(state.key)
    start = state.cache.lengths
    lay = layouts.causal(start, 1)
    logits, _, pend = tf.step_forward(
        st.cfg, target, state.block.cand[:, :1], lay.positions, lay.meta, _view(kv, start),
        window=window,
    )  # fmt: skip
    bonus = sampling.choose(sub, logits[:, 0], st.ecfg.sampling)
    state = _commit(st, state._replace(key=key), start, jnp.zeros_like(start), bonus, 0)
    block = state.block._replace(
        cand=state.block.cand.at[:, 0].set(bonus), has_drafts=jnp.array(False)
    )
    stats = state.stats._replace(ar_streak=state.stats.ar_streak + 1)
    return state._replace(block=block, stats=stats), pend


def _spec_branch(st: Static, kind: str, rows: int, target, draft, kv, window: int, state):
    stats = state.stats
    probe = stats.ar_streak >= stats.probe_every  # entered as a flex probe after an AR streak
    refill = functools.partial(_refill, st, target, draft, kv, window)
    state = jax.lax.cond(state.block.has_drafts, lambda s: s, refill, state)
    key, k_ver, k_draft = jax.random.split(state.key, 3)
    start = state.cache.lengths
    view = _view(kv, start)
    v_used = jnp.minimum(state.block.v, rows - 1)
    cand = state.block.cand
    w = st.width
    if kind == "seq":
        lay = layouts.causal(start, rows)
        logits, _, pend = tf.step_forward(
            st.cfg, target, cand[:, :rows], lay.positions, lay.meta, view, window=window
        )
    else:
        lay = layouts.parallel(start, rows, rows, w)
        logits, hm, pend = tf.step_forward(
            st.cfg, target, cand[:, :rows], lay.positions, lay.meta, view, window=window,
            draft=draft, dcfg=st.dcfg, mask_positions=lay.mask_positions,
        )  # fmt: skip
    acc, bonus = verify.verify(
        k_ver, logits, cand, state.block.q, v_used, st.ecfg.sampling, st.ecfg.rule
    )
    state = _commit(st, state._replace(key=key), start, acc, bonus, v_used)
    if kind == "seq":  # the new bonus sits at the committed length: anchor the block there
        anchor = state.cache.lengths
        hidden = _draft_pass(st, target, draft, view, anchor, window, pending=pend)
    else:
        b, h = hm.shape[0], hm.shape[-1]
        groups = hm.reshape(b, rows, w, h)
        hidden = jnp.take_along_axis(groups, acc[:, None, None, None], axis=1)[:, 0]
    block, _ = _draft_block(st, target, draft, state, hidden, bonus, k_draft)
    base = jnp.asarray(st.ecfg.probe_interval, jnp.int32)
    probe_every = jnp.where(probe, jnp.minimum(stats.probe_every * 2, 1024), base)
    stats = state.stats._replace(ar_streak=jnp.zeros((), jnp.int32), probe_every=probe_every)
    return state._replace(block=block, stats=stats), pend


def _branch_fns(st: Static, window: int, capacity: int):
    """One function per branch: (target, draft, kv, state without k/v) -> (state, Pending padded
    to W rows), so `lax.switch` sees one signature and the cache arrays only as operands."""

    def wrap(fn):
        def branch(target, draft, kv, state):
            state, pend = fn(target, draft, kv, window, state)
            return state, pend.padded(st.width, capacity)

        return branch

    fns = []
    for kind, rows in st.branches:
        if kind == "ar":
            fns.append(wrap(functools.partial(_ar_branch, st)))
        else:
            fns.append(wrap(functools.partial(_spec_branch, st, kind, rows)))
    return fns


def _run_branch(st: Static, window: int, target, draft, state: DecodeState, idx):
    """Branch `idx` (traced: `lax.switch` among the branches; an int: that branch alone), then the
    cache written
    once with the rows it returns. The branches only read the cache (their outputs hold no
    cache-sized buffer), so the write is in place on the donated cache."""
    cache = state.cache
    kv = (cache.k, cache.v)
    light = state._replace(cache=cache._replace(k=None, v=None))
    fns = _branch_fns(st, window, cache.capacity)
    if isinstance(idx, int):  # host dispatch: this branch alone
        new, pend = fns[idx](target, draft, kv, light)
    elif len(fns) == 1:
        new, pend = fns[0](target, draft, kv, light)
    else:
        new, pend = jax.lax.switch(idx, fns, target, draft, kv, light)
    stats = new.stats._replace(branches=new.stats.branches.at[idx].add(1))
    return new._replace(cache=tf.write_pending(cache, pend, new.cache.lengths), stats=stats)


# ----------------------------------------------------------------------------- policy


def choose_branch(st: Static, state: DecodeState, costs):
    """Branch index on device (`policy.choose` over the state's statistics). costs:
    float32[n_branches + 1] seconds (last: a draft pass)."""
    blk, stats = state.block, state.stats
    return policy.choose(
        st.branches, st.ecfg, blk.v, blk.has_drafts, stats.alpha, blk.gain, stats.ar_streak,
        stats.probe_every, costs,
    )  # fmt: skip


# ----------------------------------------------------------------------------- prefill and step


def needs_drafts(st: Static) -> bool:
    return any(k != "ar" for k, _ in st.branches)


def prefill_drafts(st: Static, costs) -> bool:
    """Whether the prefill runs the mask block (host side, before prefilling): see
    `policy.drafts_at_prefill`."""
    if not needs_drafts(st):
        return False
    return policy.drafts_at_prefill(st.branches, st.ecfg, st.width, costs)


@functools.partial(jax.jit, static_argnames=("st", "drafts"))
def prefill(st: Static, target, draft, tokens, lengths, cache, key, max_new, drafts=True):
    """Prompt rows (padded, ragged lengths) + one mask block anchored at each prompt's end
    (unless `drafts` is False: see `prefill_drafts`)."""
    b, t = tokens.shape
    w = st.width
    key, k_bonus, k_draft = jax.random.split(key, 3)
    # AR-only modes prefill without the mask block (a causal layout has no mask rows).
    spec = needs_drafts(st) and drafts
    zeros = jnp.zeros_like(lengths)
    lay = layouts.prefill_block(lengths, t, w) if spec else layouts.causal(zeros, t)
    h, hm, cache = tf.forward(
        st.cfg, target, tokens, lay.positions, lay.meta, cache, zeros,
        draft=draft if spec else None, dcfg=st.dcfg, mask_positions=lay.mask_positions,
        return_hidden=True, kv_window=t,  # every visible key is a prompt row: not the capacity
    )  # fmt: skip
    last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]
    bonus = sampling.choose(k_bonus, tf.lm_head(st.cfg, target, last), st.ecfg.sampling)
    vocab = st.cfg.vocab_size
    greedy = st.ecfg.sampling.greedy
    q0 = jnp.zeros((b, 1, 1) if greedy else (b, w - 1, vocab), jnp.float32)
    out = jnp.zeros((b, cache.capacity), jnp.int32).at[:, 0].set(bonus)
    done = (max_new <= 1) | (jnp.isin(bonus, jnp.asarray(st.eos_ids)) if st.eos_ids else False)
    prior = policy.alpha_prior(st.ecfg.alpha_init, w)
    state = DecodeState(
        cache=cache._replace(lengths=lengths),
        block=Block(
            cand=jnp.zeros((b, w), jnp.int32).at[:, 0].set(bonus),
            q=q0,
            conf=jnp.zeros((b, w - 1), jnp.float32),
            gain=jnp.ones((w,), jnp.float32),
            v=jnp.asarray(w - 1, jnp.int32),
            has_drafts=jnp.array(False),
        ),
        stats=Stats(
            alpha=prior,
            alpha_prior=prior,
            seen=jnp.zeros((3, w - 1), jnp.float32),
            ar_streak=jnp.zeros((), jnp.int32),
            probe_every=jnp.asarray(st.ecfg.probe_interval, jnp.int32),
            tried=jnp.zeros((w - 1,), jnp.int32),
            hits=jnp.zeros((w - 1,), jnp.int32),
            branches=jnp.zeros((len(st.branches),), jnp.int32),
        ),
        output=Output(
            out=out,
            n_out=jnp.ones((b,), jnp.int32),
            done=jnp.broadcast_to(done, (b,)),
            steps=jnp.zeros((b,), jnp.int32),
            max_new=jnp.asarray(max_new, jnp.int32),
        ),
        key=key,
    )
    if spec:
        block, conf_mean = _draft_block(st, target, draft, state, hm, bonus, k_draft)
        state = state._replace(block=block)
        if st.ecfg.alpha_init is None or st.ecfg.alpha_scale is not None:
            # (the block's gain does not depend on the prior before any verify)
            prior = policy.scaled_prior(st.ecfg, w, conf_mean)
            state = state._replace(stats=state.stats._replace(alpha=prior, alpha_prior=prior))
    return _on_mesh(st, state)


def kv_window(lengths, rows: int, capacity: int) -> int:
    """The cache window (static) for decoding from committed `lengths` [B] (host values) with room
    for `rows` more cache slots: 128 * 2**k slots, at most the capacity. A step's attention reads
    only the window, so its cost follows the filled length, not the capacity; a few sizes cover a
    whole decode (one compilation each)."""
    need = int(np.max(lengths)) + rows
    w = 128
    while w < need:
        w *= 2
    return min(w, capacity)


def _has_room(st: Static, state: DecodeState, window: int):
    """Whether one more step fits the window: every active sequence can add W cache rows."""
    longest = jnp.max(jnp.where(state.output.done, 0, state.cache.lengths))
    return longest + st.width <= window


@functools.partial(jax.jit, static_argnames=("st", "window"), donate_argnames=("state",))
def step(st: Static, target, draft, state: DecodeState, costs, force, window: int):
    """One decoding step -> (state, branch index, tokens committed per sequence int32[B]).

    force >= 0 runs that branch (profiling, tests); otherwise the mode's policy chooses."""
    idx = jnp.where(force >= 0, force, choose_branch(st, state, costs)).astype(jnp.int32)
    new = _on_mesh(st, _run_branch(st, window, target, draft, state, idx))
    return new, idx, new.output.n_out - state.output.n_out


def switches_to_ar(st: Static) -> bool:
    """Whether the mode can choose between AR and speculative steps (flex): its AR steps then run
    in a loop of their own (`run`, ar_only) instead of under the switch over every branch."""
    kinds = [k for k, _ in st.branches]
    return "ar" in kinds and len(kinds) > 1


@functools.partial(
    jax.jit, static_argnames=("st", "window", "steps", "ar_only"), donate_argnames=("state",)
)
def run(st: Static, target, draft, state: DecodeState, costs, window: int, steps: int,
        ar_only: bool = False):  # fmt: skip
    """Up to `steps` decoding steps in one `lax.while_loop` on device: each chooses its branch
    (the policy, probing and the running acceptance are state), runs it under `lax.switch` and
    writes the cache once. Ends early when every sequence is done or the next step might not fit
    the cache window (`_has_room`; the host then calls again with a larger one).

    A mode that switches to AR (`switches_to_ar`) runs its AR steps apart: with `ar_only` the
    loop runs the AR branch alone (no switch: the program of AR mode's own loop) while the policy
    chooses AR, and without it runs the switch while the policy chooses a speculative branch;
    the host alternates on `next_ar`. (An AR step under the switch over every branch can run
    slower than AR mode's own, docs/decoding_loop.md.) The policy decides every step either way,
    so the tokens and branches are the same.

    Returns (state, branch of each step int32[steps] (-1: not run), tokens each step committed
    per sequence int32[steps, B], next_ar bool[]: whether the policy's next choice is AR)."""
    b = state.output.done.shape[0]
    split = switches_to_ar(st)
    ar = [k for k, _ in st.branches].index("ar") if split else -1

    def cond(carry):
        state, i, _, _ = carry
        go = (i < steps) & ~jnp.all(state.output.done) & _has_room(st, state, window)
        if split:
            go &= (choose_branch(st, state, costs) == ar) == ar_only
        return go

    def body(carry):
        state, i, branches, counts = carry
        if ar_only:
            idx = jnp.asarray(ar, jnp.int32)
            new = _run_branch(st, window, target, draft, state, ar)
        else:
            idx = choose_branch(st, state, costs)
            new = _run_branch(st, window, target, draft, state, idx)
        branches = branches.at[i].set(idx)
        counts = counts.at[i].set(new.output.n_out - state.output.n_out)
        return new, i + 1, branches, counts

    init = (
        state,
        jnp.zeros((), jnp.int32),
        jnp.full((steps,), -1, jnp.int32),
        jnp.zeros((steps, b), jnp.int32),
    )
    state, _, branches, counts = jax.lax.while_loop(cond, body, init)
    return _on_mesh(st, state), branches, counts, choose_branch(st, state, costs) == ar


# ----------------------------------------------------------------------------- host dispatch


def _status(st: Static, state: DecodeState, costs):
    """int32[1 + 2B]: the policy's next branch, stop flags, committed counts (one host read; its
    own buffer, so it outlives the state donated to the next step)."""
    nxt = choose_branch(st, state, costs)[None]
    o = state.output
    return jnp.concatenate([nxt, o.done.astype(jnp.int32), o.n_out]).astype(jnp.int32)


def read_status(status) -> tuple:
    """(next branch, done bool[B], n_out int32[B]) from a host copy of `_status`."""
    b = (len(status) - 1) // 2
    return int(status[0]), status[1 : 1 + b].astype(bool), status[1 + b :]


@functools.partial(jax.jit, static_argnames=("st",))
def first_branch(st: Static, state: DecodeState, costs):
    """The policy's choice for the first step and the stop state after prefill (host dispatch)."""
    return _status(st, state, costs)


@functools.partial(jax.jit, static_argnames=("st", "branch", "window"), donate_argnames=("state",))
def branch_step(st: Static, branch: int, target, draft, state: DecodeState, costs, window: int):
    """Host dispatch: run branch `branch` as its own executable (no while loop, no lax.switch) and
    choose the next one on device. Returns (state, status for `read_status`, tokens committed per
    sequence int32[B])."""
    new = _on_mesh(st, _run_branch(st, window, target, draft, state, branch))
    return new, _status(st, new, costs), new.output.n_out - state.output.n_out
