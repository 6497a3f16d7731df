"""One training step of the drafter, and its optimizer (DESIGN §2.5).

`make_train_step(...)(state, target, batch) -> (state, metrics)`: the clean K/V (computed in the
step, or precomputed by `clean_cache`), then the A*W mask rows of every sequence through the deep
layers against it, the draft loss on slots 1..W-1, and an optax update of the stage's trainable
subset of the draft tree (`STAGES`). The target is an argument, never written.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flexdraft_jax.models import layouts
from flexdraft_jax.models import transformer as tf
from flexdraft_jax.models.config import DraftConfig, ModelConfig
from flexdraft_jax.training import clean_cache, losses

STAGES = {
    "attention": ("mask_embedding", "layers"),
    "calibration": ("calibration",),
    "joint": ("mask_embedding", "layers", "calibration"),
}


def trainable_keys(stage: str) -> tuple[str, ...]:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    return STAGES[stage]


def make_optimizer(tc):
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=tc.lr,
        warmup_steps=tc.warmup_steps,
        decay_steps=max(tc.steps, tc.warmup_steps + 1),
        end_value=tc.lr * tc.end_lr_ratio,
    )
    tx = optax.chain(
        optax.clip_by_global_norm(tc.clip_norm),
        optax.adamw(schedule, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay),
    )
    return tx, schedule


def kl_topk(tc) -> int:
    """K of the KL to the target's top-K (`train.kl_topk`), 0 when there is no such KL."""
    return tc.get("kl_topk", 0) if tc.kl_weight > 0 else 0


def make_train_step(cfg: ModelConfig, dcfg: DraftConfig, tc, optimizer, schedule, vocab=None):
    """step(state, target, batch) -> (state, metrics). state = {step, draft, opt_state}.

    vocab: token ids of a restricted draft vocabulary (`tf.restrict_draft_vocab`): the draft
    logits, the CE and the argmax run over them only; labels outside it are left out of the
    loss and count as misses in the accuracies (decoding with that vocabulary cannot draft them).
    """
    keys = trainable_keys(tc.stage)
    topk = kl_topk(tc)
    lookup = None
    if vocab is not None:
        if tc.kl_weight > 0 and not topk:
            raise ValueError(
                "train.draft_vocab_size > 0 with train.kl_weight > 0 needs train.kl_topk > 0"
            )
        vocab = np.asarray(vocab, np.int32)
        lookup = np.full(cfg.vocab_size, -1, np.int32)
        lookup[vocab] = np.arange(len(vocab), dtype=np.int32)
    w = dcfg.block_size
    weights = losses.position_weights(w, tc.gamma)
    use_calibration = "calibration" in keys
    if tc.bonus not in ("data", "target"):
        raise ValueError(f"train.bonus must be 'data' or 'target', got {tc.bonus!r}")
    need_target_rows = (tc.kl_weight > 0 and not topk) or (use_calibration and tc.bonus == "target")
    if tc.get("cache_clean") and need_target_rows:
        raise ValueError(
            "train.cache_clean keeps deep-layer K/V (and the target's top-k with train.kl_topk): "
            "it needs train.kl_topk > 0 when train.kl_weight > 0, and train.bonus == 'data' "
            f"(got kl_weight={tc.kl_weight}, kl_topk={topk}, bonus={tc.bonus!r})"
        )

    def step(state, target, batch):
        tokens, anchors = batch["tokens"], batch["anchors"]
        b, t = tokens.shape
        a = anchors.shape[1]
        zeros = jnp.zeros((b,), jnp.int32)
        rows = jnp.clip(anchors[:, :, None] + jnp.arange(w) - 1, 0, t - 1).reshape(b, a * w)
        if "clean_k" in batch:  # precomputed deep-layer K/V (training.clean_cache)
            dt = target["embed"]["embedding"].dtype
            cache = clean_cache.kv_cache(batch["clean_k"], batch["clean_v"], batch["lengths"], dt)
            h_clean = None
        else:
            # Clean pass: frozen target, causal, K/V of every layer into a cache of capacity T.
            lay = layouts.causal(zeros, t)
            cache = tf.init_cache(cfg, b, t, dtype=target["embed"]["embedding"].dtype)
            h_clean, _, cache = tf.forward(
                cfg, target, tokens, lay.positions, lay.meta, cache, zeros, return_hidden=True
            )
        labels, valid = losses.slot_targets(
            tokens, batch["lengths"], batch["loss_mask"], anchors, batch["anchor_valid"], w
        )
        scored = valid
        if lookup is not None:  # labels as indices into the draft vocabulary
            sub = jnp.asarray(lookup)[labels]
            scored = valid & (sub >= 0)
            labels = jnp.maximum(sub, 0)
        target_logits = target_topk = None
        if need_target_rows or (topk and "topk_ids" not in batch):
            # the target at clean rows p + j - 1 (j = 0: the row choosing token p)
            h_rows = jnp.take_along_axis(h_clean, rows[..., None], axis=1)
            target_logits = tf.lm_head(cfg, target, h_rows).reshape(b, a, w, -1)
        if topk:  # the target's top-k at rows p + j - 1: cached, or from the live clean pass
            if "topk_ids" in batch:
                take = lambda x: jnp.take_along_axis(x, rows[..., None], axis=1)
                ids = take(batch["topk_ids"]).reshape(b, a, w, topk)
                tlogp = take(batch["topk_logp"]).reshape(b, a, w, topk)
            else:
                logq = jax.nn.log_softmax(target_logits.astype(jnp.float32), axis=-1)
                tlogp, ids = jax.lax.top_k(logq, topk)
            ok = jnp.ones(ids.shape, bool)
            if lookup is not None:
                sub = jnp.asarray(lookup)[ids]
                ok, ids = sub >= 0, jnp.maximum(sub, 0)
            target_topk = (ids, tlogp, ok)
        if use_calibration and tc.bonus == "target":
            bonus = jnp.argmax(target_logits[:, :, 0], axis=-1).astype(jnp.int32)
        else:
            bonus = jnp.take_along_axis(tokens, anchors, axis=1)  # the committed token at p
        # Mask rows only, against the clean cache: group a sees slots < anchors[a].
        mlay = layouts.training(0, anchors, w)
        frozen = {k: v for k, v in state["draft"].items() if k not in keys}

        def loss_fn(trainable):
            draft = {**frozen, **trainable}
            _, hm, _ = tf.forward(
                cfg,
                target,
                tokens[:, :0],
                mlay.positions,
                mlay.meta,
                cache,
                zeros,
                draft=draft,
                dcfg=dcfg,
                mask_positions=mlay.mask_positions,
            )
            hm = hm.reshape(b * a, w, cfg.hidden_size)
            head = draft if vocab is None else tf.restrict_draft_vocab(cfg, target, draft, vocab)
            logits = tf.draft_logits(
                cfg, target, head, hm, bonus.reshape(b * a), use_calibration
            ).reshape(b, a, w, -1)
            loss, metrics = losses.draft_loss(
                logits,
                labels,
                scored,
                weights,
                None if topk else target_logits,
                ce_weight=tc.ce_weight,
                kl_weight=tc.kl_weight,
                target_topk=target_topk,
            )
            if lookup is not None:  # accuracies over every valid slot (out-of-vocabulary: miss)
                hit = ((jnp.argmax(logits, axis=-1) == labels) & scored).astype(jnp.float32)
                mask = valid.astype(jnp.float32)
                count = jnp.maximum(mask.sum(axis=(0, 1)), 1.0)
                metrics["acc_per_slot"] = hit.sum(axis=(0, 1)) / count
                metrics["acc"] = hit.sum() / jnp.maximum(mask.sum(), 1.0)
                metrics["in_vocab"] = (scored.sum() / jnp.maximum(valid.sum(), 1)).astype(
                    jnp.float32
                )
            return loss, metrics

        trainable = {k: state["draft"][k] for k in keys}
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = optimizer.update(grads, state["opt_state"], trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["lr"] = schedule(state["step"])
        new_state = {
            "step": state["step"] + 1,
            "draft": {**state["draft"], **trainable},
            "opt_state": opt_state,
        }
        return new_state, metrics

    return step
