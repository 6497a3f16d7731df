"""Held-out acceptance while training: teacher-forced tau on the target's own greedy outputs.

For greedy decoding with threshold 0, a decoding step whose bonus sits at position p drafts the
block anchored at p against exactly the clean context [0, p) and accepts the leading run of slots
j = 1..W-1 whose argmax equals the target's greedy token at p + j. On a sequence the target itself
generated greedily, every response position p can be such a bonus position, so

    tau_p = 1 + (leading run of correct slots at anchor p)

computed for all p at once (one mask-only forward against precomputed clean K/V). Its mean over
positions is the teacher-forced tau. Decoding visits only some positions: from bonus position p
the next step's bonus sits at p + tau_p, so it takes short steps where drafts fail and jumps over
the stretches where they succeed. Walking the same runs that way gives `decoded_tau`, exactly the
tau of greedy decoding with threshold 0 on these responses (tested against the engine), and lower
than the position mean. `heldout_set` builds the sequences from a prompt set of `EVAL_SETS`:
HumanEval (code; evaluation only, never a training source) or the held-out split of ShareGPT
(chat; training reads only the other split); a tokenizer-less test model gets random token
prompts of another seed than its training prompts. `tau_curve_plot` draws every set's tau
against training minutes. With the target sharded over a mesh, every
process builds the same held-out set (one SPMD self-distillation) and runs the same sharded
evaluation; the trainer logs process 0's numbers.
"""

from __future__ import annotations

import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from flexdraft_jax.common import atomic_path
from flexdraft_jax.decoding import placement
from flexdraft_jax.models import layouts
from flexdraft_jax.models import transformer as tf
from flexdraft_jax.training import clean_cache

log = logging.getLogger(__name__)


@functools.partial(jax.jit, static_argnames=("cfg", "dcfg", "use_calibration"))
def _block_hits(
    cfg, dcfg, target, draft, tokens, lengths, anchors, valid, clean_k, clean_v, use_calibration
):
    """bool[B, A, W-1]: slot j of the block at each anchor predicts token[p + j]."""
    b, t = tokens.shape
    a = anchors.shape[1]
    w = dcfg.block_size
    cache = clean_cache.kv_cache(clean_k, clean_v, lengths, target["embed"]["embedding"].dtype)
    lay = layouts.training(0, anchors, w)
    _, hm, _ = tf.forward(
        cfg,
        target,
        tokens[:, :0],
        lay.positions,
        lay.meta,
        cache,
        jnp.zeros((b,), jnp.int32),
        draft=draft,
        dcfg=dcfg,
        mask_positions=lay.mask_positions,
    )
    hm = hm.reshape(b * a, w, -1)[:, 1:]
    bonus = jnp.take_along_axis(tokens, anchors, axis=1).reshape(b * a)
    pred = jnp.argmax(tf.draft_logits(cfg, target, draft, hm, bonus, use_calibration), -1)
    if "head" in draft:  # a restricted draft vocabulary (`tf.restrict_draft_vocab`)
        pred = draft["head"]["ids"][pred]
    pos = anchors[:, :, None] + jnp.arange(1, w)
    label = jnp.take_along_axis(tokens, jnp.minimum(pos, t - 1).reshape(b, -1), 1)
    ok = pred.reshape(b, a, w - 1) == label.reshape(b, a, w - 1)
    return ok & (pos < lengths[:, None, None]) & valid[:, :, None]


def _walk(positions: np.ndarray, runs: np.ndarray) -> list[int]:
    """The runs greedy decoding meets walking through consecutive anchor positions with these
    runs: a step at bonus position p commits its run of drafts and the next bonus, so the next
    step sits at p + run + 1 (tokens = sum(run + 1), steps = len). A gap in the positions starts
    the next response."""
    met = []
    nxt = None
    for p, r in zip(positions.tolist(), runs.tolist()):
        if nxt is not None and p < nxt:
            continue  # jumped over by the step before
        met.append(r)
        nxt = p + r + 1
    return met


def teacher_forced_tau(
    cfg, dcfg, target, draft, heldout, *, use_calibration: bool, batch_size: int = 4
) -> dict:
    """Mean tau over every response position of the held-out sequences (`tau`), the tau of the
    greedy decoding walk through them (`decoded_tau`, `decoded_steps`), and the conditional
    acceptance of each draft slot over every position (`per_position_acceptance`) and over the
    walk's steps only (`decoded_acceptance`).

    heldout: tokens [N, T], lengths [N], loss_mask [N, T], clean_k/clean_v [N, D, T, K, Dh].
    """
    tokens, lengths, mask = heldout["tokens"], heldout["lengths"], heldout["loss_mask"]
    n, t = tokens.shape
    w = dcfg.block_size
    # Anchors: response positions p with p + 1 < length (a next token exists to draft).
    cand = mask & (np.arange(t)[None, :] + 1 < lengths[:, None])
    a = int(cand.sum(1).max())
    anchors = np.zeros((n, a), np.int32)
    valid = np.zeros((n, a), bool)
    for i in range(n):
        p = np.nonzero(cand[i])[0]
        anchors[i, : len(p)], valid[i, : len(p)] = p, True
    runs = []
    met = []  # runs the decoding walk meets, one per step
    put = placement.inputs_for(target)  # global arrays when the target spans processes
    for s in range(0, n, batch_size):
        sl = slice(s, s + batch_size)
        host = (tokens, lengths, anchors, valid, heldout["clean_k"], heldout["clean_v"])
        ok = placement.to_host(
            _block_hits(cfg, dcfg, target, draft, *(put(x[sl]) for x in host), use_calibration)
        )
        lead = np.cumprod(ok, axis=-1)  # [b, A, W-1]
        v = valid[sl]
        run = lead.sum(-1)  # [b, A]
        runs.append(run[v])
        for pos, r, ok_a in zip(anchors[sl], run, v):
            met += _walk(pos[ok_a], r[ok_a])
    runs = np.concatenate(runs)
    met = np.asarray(met, np.int64)
    return {
        "tau": float(1.0 + runs.mean()),
        "decoded_tau": float((met + 1).sum() / max(met.size, 1)),
        "decoded_steps": int(met.size),
        "per_position_acceptance": _acceptance(runs, w),
        "decoded_acceptance": _acceptance(met, w),
        "anchors": int(runs.size),
    }


def _acceptance(runs: np.ndarray, w: int) -> list[float]:
    """Conditional acceptance of draft slots 1..w-1 over steps with these runs of accepted
    drafts: slot j is tried when the run reaches j - 1 and accepted when it reaches j."""
    j = np.arange(1, w)
    tried = (runs[:, None] >= j - 1).sum(0)
    hit = (runs[:, None] >= j).sum(0)
    return (hit / np.maximum(tried, 1)).tolist()


# held-out prompt set -> the prefix of its metrics in metrics.jsonl ("heldout_tau", ...)
EVAL_SETS = {"humaneval": "heldout_", "sharegpt": "heldout_chat_"}


def prior_acceptance(record: dict) -> list[float] | None:
    """Flex decoding's prior acceptance per draft position from an evaluation record of
    metrics.jsonl: the mean over the held-out sets it holds (a drafter for code and chat starts
    from neither set's rate), or None without one."""
    per_set = [record[p + "acceptance"] for p in EVAL_SETS.values() if p + "acceptance" in record]
    return np.mean(per_set, axis=0).tolist() if per_set else None


def heldout_prompts(cfg, tokenizer, prompt_set: str, num_prompts: int, seq_len: int, seed: int = 0):
    """The token ids of a held-out set's first `num_prompts` prompts (chat template) that leave
    room for a response in `seq_len`. Without a tokenizer (test models): random token prompts
    (seed `seed` + 1, so never the training prompts of `seed`)."""
    from flexdraft_jax import prompts as prompts_lib
    from flexdraft_jax.training import data as data_lib

    if prompt_set not in EVAL_SETS:
        raise ValueError(f"unknown held-out set {prompt_set!r} (one of {tuple(EVAL_SETS)})")
    if tokenizer is None:
        top = max(4, min(32, seq_len // 4))
        prompts = data_lib.synthetic_prompts(num_prompts, cfg.vocab_size, 4, top, seed + 1)
    else:
        texts = prompts_lib.benchmark_prompts(prompt_set, num_prompts)
        prompts = [data_lib.encode_prompt(tokenizer, p, True) for p in texts]
    return [list(p) for p in prompts if len(p) + 8 < seq_len]


def prefill_confidence(cfg, target, draft, prompts) -> list[float]:
    """Mean confidence (max probability) of each draft position in the block the prefill drafts
    at the end of each prompt, as decoding computes it (`draft`: a `models.draft.Draft`, its
    draft vocabulary in force): with the held-out acceptance, flex's calibration from a prompt's
    prefill confidence to its prior (`engine.EngineConfig.alpha_scale`)."""
    from flexdraft_jax.common import round_up
    from flexdraft_jax.decoding import engine
    from flexdraft_jax.decoding.decoder import Decoder

    cache_len = round_up(max(len(p) for p in prompts) + 2 * draft.config.block_size + 2, 64)
    dec = Decoder(cfg, target, draft, ecfg=engine.EngineConfig(mode="sequential"),
                  cache_len=cache_len)  # fmt: skip
    conf = placement.to_host(dec.start(prompts, 2).state.block.conf)
    return np.mean(conf, axis=0).tolist()


def heldout_set(
    cfg,
    dcfg,
    target,
    tokenizer,
    *,
    prompt_set: str = "humaneval",
    num_prompts: int,
    max_new_tokens: int,
    seq_len: int,
    cache_dir: str,
    workdir: str,
    model_id=None,
    mesh=None,
    seed: int = 0,
) -> dict:
    """Greedy target responses to `heldout_prompts` (returned as "prompts"), packed, with clean
    K/V. mesh: the target's (self-distillation as one SPMD program)."""
    from flexdraft_jax.training import data as data_lib

    prompts = heldout_prompts(cfg, tokenizer, prompt_set, num_prompts, seq_len, seed)
    responses = data_lib.distill(
        cfg,
        target,
        prompts,
        max_new_tokens,
        batch_size=len(prompts),
        cache_dir=cache_dir,
        model_id=model_id,
        mesh=mesh,
    )
    packed = data_lib.pack(list(zip(prompts, responses)), seq_len)
    ident = model_id or data_lib.params_fingerprint(cfg, target)
    k, v = clean_cache.precompute(
        cfg,
        dcfg.depth,
        target,
        packed.tokens,
        packed.lengths,
        dtype="float32",
        cache_dir=os.path.join(workdir, "clean_cache"),
        ident=ident,
        name="heldout-" if prompt_set == "humaneval" else f"heldout-{prompt_set}-",
    )
    return {
        "prompts": prompts,
        "tokens": packed.tokens,
        "lengths": packed.lengths,
        "loss_mask": packed.loss_mask,
        "clean_k": k,
        "clean_v": v,
    }


def tau_curve_plot(metrics_path: str, out_png: str) -> None:
    """Held-out tau against cumulative training minutes, from the workdir's metrics.jsonl: each
    held-out set in its own colour; teacher-forced with calibration (solid), without (dashed),
    and along the decoding walk (dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = (("tau", "o", "-", ""), ("tau_nocalib", ".", "--", ", without calibration"),
              ("decoded_tau", "x", ":", ", decoded"))  # fmt: skip
    curves = {}  # (set, key) -> [(minutes, tau)]
    with open(metrics_path) as f:
        for line in f:
            rec = json.loads(line)
            for name, prefix in EVAL_SETS.items():
                for key, *_ in styles:
                    if prefix + key in rec:
                        curves.setdefault((name, key), []).append(
                            (rec["train_minutes"], rec[prefix + key])
                        )
    if not curves:
        return
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for colour, name in zip(("C0", "C1"), EVAL_SETS):
        for key, marker, line, label in styles:
            if (name, key) in curves:
                ax.plot(*zip(*curves[name, key]), marker=marker, linestyle=line, color=colour,
                        label=name + label)  # fmt: skip
    ax.legend(fontsize=7)
    ax.set_xlabel("training minutes")
    ax.set_ylabel("held-out tau (greedy)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
