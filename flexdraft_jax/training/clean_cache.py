"""The clean pass, computed once: deep-layer K/V of every training sequence (DESIGN §2.5).

The frozen target's clean rows do not depend on the draft, and mask rows only read the clean keys
and values of the deep layers s..L-1. So instead of a causal forward of the whole target in every
step, `precompute` runs it once per sequence and keeps K/V [N, D, T, K, Dh] (bfloat16 by default,
on disk in the workdir, memory-mapped), and each step runs only the mask rows against it. With
SmolLM2-135M on 2 CPU cores the clean pass was about half of a step (more with long sequences).

With `topk > 0` the same pass also keeps the target's top-k next-token distribution at every row
(token ids and log-probabilities at temperature 1, [N, T, k]): the soft labels of a KL loss
(`train.kl_topk`), so distillation to the target's distribution needs no clean pass per step
either. Without it the cache serves CE only; `train.bonus` must be "data" (the bonus is the
token at the anchor, which the batch carries).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from flexdraft_jax.common import atomic_path, round_up
from flexdraft_jax.models import layouts
from flexdraft_jax.models import transformer as tf

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


def kv_cache(clean_k, clean_v, lengths, dtype) -> tf.KVCache:
    """Precomputed K/V [B, D, T, K, Dh] as the deep layers' cache (layer axis first), in `dtype`."""
    k, v = (jnp.moveaxis(x, 1, 0).astype(dtype) for x in (clean_k, clean_v))
    return tf.KVCache(k, v, lengths)


def cache_key(model_id: str, tokens: np.ndarray, depth: int, dtype: str) -> str:
    h = hashlib.sha1()
    h.update(f"{model_id}|{depth}|{dtype}|{tokens.shape}".encode())
    h.update(np.ascontiguousarray(tokens).tobytes())
    return h.hexdigest()[:20]


def _parts(topk: int) -> tuple[str, ...]:
    """File suffixes of one cache entry: K, V and, with top-k, ids and log-probs."""
    return ("k", "v") + ((f"top{topk}_ids", f"top{topk}_logp") if topk else ())


def _load(path: str, dtype: str, topk: int = 0):
    # .npy has no bfloat16: such files read back as 2-byte voids; view them as bfloat16.
    kv = tuple(np.load(f"{path}.{n}.npy", mmap_mode="r").view(DTYPES[dtype]) for n in ("k", "v"))
    return kv + tuple(np.load(f"{path}.{n}.npy", mmap_mode="r") for n in _parts(topk)[2:])


def _exists(path: str, topk: int = 0) -> bool:
    return all(os.path.exists(f"{path}.{n}.npy") for n in _parts(topk))


def _longest_cached_prefix(
    cache_dir, name, ident, tokens, depth, dtype, topk=0
) -> tuple[int, str | None]:
    """(m, path) of the cache of the longest proper prefix tokens[:m] already in `cache_dir`."""
    best, best_path = 0, None
    if not os.path.isdir(cache_dir):
        return best, best_path
    for f in os.listdir(cache_dir):
        if not (f.startswith(name) and f.endswith(".k.npy")):
            continue
        m = np.load(os.path.join(cache_dir, f), mmap_mode="r").shape[0]
        if not best < m < len(tokens):
            continue
        path = os.path.join(cache_dir, name + cache_key(ident, tokens[:m], depth, dtype))
        if f == os.path.basename(path) + ".k.npy" and _exists(path, topk):
            best, best_path = m, path
    return best, best_path


def precompute(
    cfg,
    depth: int,
    target,
    tokens,
    lengths,
    *,
    batch_size=8,
    bucket=64,
    dtype="bfloat16",
    cache_dir=None,
    ident=None,
    name="",
    topk=0,
    topk_from=None,
):
    """(k, v): numpy [N, depth, T, K, Dh] of layers L-depth..L-1 for every sequence; with
    `topk > 0`, (k, v, ids, logp): also the target's top-k next-token ids (int32 [N, T, topk]) and
    log-probabilities (float32, temperature 1) at every row from `topk_from[i]` on (int [N],
    e.g. the row before the response: the loss reads no earlier row; default 0). Earlier rows
    hold id 0 and log-probability -inf.

    Sequences are processed longest-first in batches cropped to their longest length (rounded up
    to `bucket`); positions past a sequence's length hold zeros and are never visible. With
    `cache_dir`, the arrays are written there atomically as `{name}{key}.k.npy` / `.v.npy`, the
    key a hash of `ident` (the model), the tokens, depth and dtype, and reused. When the data has
    grown (more distilled prompts appended), the rows of the longest cached prefix are reused and
    only the new sequences run.
    """
    if dtype not in DTYPES:
        raise ValueError(f"clean cache dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if cache_dir is not None and ident is None:
        raise ValueError("a clean cache on disk needs `ident` (the model's identity) for its key")
    if topk < 0 or topk > cfg.vocab_size:
        raise ValueError(f"clean cache topk must be in [0, {cfg.vocab_size}], got {topk}")
    n, t = tokens.shape
    path = None
    if cache_dir is not None:
        path = os.path.join(cache_dir, name + cache_key(ident, tokens, depth, dtype))
        if _exists(path, topk):
            log.info("clean pass: reusing %s", path)
            return _load(path, dtype, topk)
    # The main process fills memory-mapped temporary files, renamed into place when complete:
    # the arrays (12 GB at depth 10 for 4096 sequences) need not fit in memory. Every other
    # process computes the same arrays in memory.
    write = path is not None and jax.process_index() == 0
    with contextlib.ExitStack() as files:
        tmps = [files.enter_context(atomic_path(f"{path}.{p}.npy")) for p in _parts(topk) if write]
        out = _arrays(n, t, depth, cfg, dtype, topk, tmps or None)
        _fill(cfg, depth, target, tokens, lengths, out, batch_size, bucket, topk, topk_from,
              path and (cache_dir, name, ident, dtype))  # fmt: skip
        if not write:
            return tuple(out)
        for arr in out:
            arr.flush()
        del out
    log.info("clean pass: %s K/V of %d sequences written to %s", dtype, n, path)
    return _load(path, dtype, topk)


def _arrays(n, t, depth, cfg, dtype, topk, files=None) -> list:
    """The output arrays, zero (log-probabilities -inf): in memory, or with `files` (one path
    per `_parts`) as new .npy files memory-mapped (bfloat16 stored as 2-byte voids, as np.save
    writes it)."""
    kv = (n, depth, t, cfg.num_kv_heads, cfg.head_dim)
    specs = [(kv, DTYPES[dtype])] * 2
    if topk:
        specs += [((n, t, topk), np.int32), ((n, t, topk), np.float32)]
    if files is None:
        out = [np.zeros(shape, dt) for shape, dt in specs]
    else:
        out = []
        for f, (shape, dt) in zip(files, specs):
            stored = np.dtype("V2") if dt is ml_dtypes.bfloat16 else np.dtype(dt)
            out.append(np.lib.format.open_memmap(f, "w+", stored, shape).view(dt))
    if topk:
        out[3][...] = -np.inf
    return out


def _fill(cfg, depth, target, tokens, lengths, out, batch_size, bucket, topk, topk_from, reuse):
    """Run the clean pass into `out` (`_arrays`); `reuse`: (cache_dir, name, ident, dtype) to
    copy the rows of the longest cached prefix from, or None."""
    n, t = tokens.shape
    first = 0
    if reuse:
        cache_dir, name, ident, dtype = reuse
        first, prefix = _longest_cached_prefix(cache_dir, name, ident, tokens, depth, dtype, topk)
        if prefix is not None:
            log.info("clean pass: reusing the first %d of %d sequences from %s", first, n, prefix)
            for arr, old in zip(out, _load(prefix, dtype, topk)):
                arr[:first] = old

    starts = np.zeros(n, np.int64) if topk_from is None else np.asarray(topk_from, np.int64)

    @functools.partial(jax.jit, static_argnums=3)
    def run(target, toks, start, rows):
        b, w = toks.shape
        zeros = jnp.zeros((b,), jnp.int32)
        lay = layouts.causal(zeros, w)
        cache = tf.init_cache(cfg, b, w, dtype=target["embed"]["embedding"].dtype)
        h, _, cache = tf.forward(
            cfg, target, toks, lay.positions, lay.meta, cache, zeros, return_hidden=bool(topk)
        )
        kv = (cache.k[-depth:], cache.v[-depth:])  # [D, b, w, K, Dh]
        if not topk:
            return kv
        # the lm_head (and top-k) only on `rows` rows from each sequence's start
        at = jnp.minimum(start[:, None] + jnp.arange(rows), w - 1)
        h = jnp.take_along_axis(h, at[..., None], axis=1)
        logp = jax.nn.log_softmax(tf.lm_head(cfg, target, h).astype(jnp.float32), axis=-1)
        top, ids = jax.lax.top_k(logp, topk)
        return kv + (ids.astype(jnp.int32), top)

    from flexdraft_jax.decoding import placement

    put = placement.inputs_for(target)  # global arrays when the target spans processes
    order = first + np.argsort(-lengths[first:], kind="stable")
    for i in tqdm(range(0, n - first, batch_size), desc="clean pass", unit="batch"):
        idx = order[i : i + batch_size]
        w = min(t, round_up(int(lengths[idx].max()), bucket))
        start = np.minimum(starts[idx], lengths[idx])
        rows = min(w, round_up(int((lengths[idx] - start).max()), bucket)) if topk else 0
        got = run(target, put(tokens[idx, :w]), put(start.astype(np.int32)), rows)
        got = [placement.to_host(x) for x in got]
        for arr, x in zip(out[:2], got[:2]):
            arr[idx, :, :w] = x.transpose(1, 0, 2, 3, 4).astype(arr.dtype)
        for arr, x in zip(out[2:], got[2:]):
            for r, (j, s0, n_i) in enumerate(zip(idx, start, lengths[idx])):
                arr[j, s0:n_i] = x[r, : n_i - s0]
