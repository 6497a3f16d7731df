"""The accelerator check: kernels, step costs, decoding (and optionally training) on a GPU or TPU.

  python launch/accelerator_check.py --output_dir=/tmp/check                 about 8 minutes
  python launch/accelerator_check.py --output_dir=/tmp/check --sections=train --train_minutes=8
  python launch/accelerator_check.py --output_dir=/tmp/check --dry_run       CPU sizes, ~1 minute

Writes accelerator_check.json, accelerator_check.md and accelerator_check.png (with training,
draft_release/ in files of at most 16 MiB) to --output_dir; scratch to --work_dir.
docs/accelerator.md says how to bring the wheels and the SmolLM2 weights to an offline host.
"""

from __future__ import annotations

import dataclasses
import os

# The 8B shapes at batch 256 need most of the card; JAX takes 75% of it by default.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

from absl import app, flags, logging

from flexdraft_jax import compilation
from flexdraft_jax.bench.step_costs import FULL_SHAPES
from flexdraft_jax.recipes import accelerator

F = flags.FLAGS
flags.DEFINE_string("output_dir", None, "Record, tables, plots (and the trained draft).")
flags.DEFINE_string(
    "work_dir", None, "Scratch: benchmark files, checkpoints (default OUTPUT/work)."
)
flags.DEFINE_list(
    "sections", list(accelerator.CheckConfig.sections),
    f"Sections to run, of {', '.join(accelerator.SECTIONS)} (train also with --train_minutes).",
)  # fmt: skip
flags.DEFINE_float("budget_seconds", None, "Time for every section but training (default 420).")
flags.DEFINE_float("kernel_seconds", None, "At most this much of it for the kernels (default 60).")
flags.DEFINE_float("decoding_seconds", None, "... and for decoding (default 150).")
flags.DEFINE_float("train_minutes", 0.0, "> 0: self-distil and train the SmolLM2 drafter.")
flags.DEFINE_float("train_data_scale", 10.0, "Training prompts: this many times the CPU recipe's.")
flags.DEFINE_bool("dry_run", False, "Every section at CPU sizes (what the test suite runs).")
flags.DEFINE_list(
    "shapes", [s.name for s in FULL_SHAPES], "Step-cost target shapes (random weights)."
)
flags.DEFINE_list("batch_sizes", None, "Step-cost batch sizes (default 1,4,16,64,256).")
flags.DEFINE_list("attention", None, "Step-cost attention implementations (default pallas,xla).")
flags.DEFINE_list("decode_batch_sizes", None, "Decoding batch sizes, in order (default 1,16,4,64).")
flags.DEFINE_string(
    "compilation_cache", compilation.DEFAULT,
    "JAX's persistent compilation cache: a directory, 'none' (off), or 'default' "
    f"(${compilation.ENV} if set, else {compilation.DEFAULT_DIR}): a rerun on a warm machine "
    "compiles nothing.",
)  # fmt: skip


def _ints(values):
    return tuple(int(v) for v in values)


def main(_):
    compilation.enable_cache(F.compilation_cache)
    sections = list(F.sections)
    if F.train_minutes > 0 and "train" not in sections:
        sections.append("train")
    if F.dry_run:
        config = accelerator.CheckConfig.dry_run(sections, F.train_minutes or 0.1)
    else:
        shapes = tuple(s for s in FULL_SHAPES if s.name in F.shapes)
        unknown = sorted(set(F.shapes) - {s.name for s in FULL_SHAPES})
        if unknown:
            raise app.UsageError(f"unknown shapes {unknown}; choose from the defaults")
        base = accelerator.CheckConfig()
        steps = dataclasses.replace(
            base.steps, shapes=shapes,
            batch_sizes=_ints(F.batch_sizes) if F.batch_sizes else base.steps.batch_sizes,
            impls=tuple(F.attention) if F.attention else base.steps.impls,
        )  # fmt: skip
        decoding = base.decoding
        if F.decode_batch_sizes:
            decoding = dataclasses.replace(decoding, batch_sizes=_ints(F.decode_batch_sizes))
        train = dataclasses.replace(base.train, data_scale=F.train_data_scale)
        config = dataclasses.replace(
            base, sections=tuple(sections), steps=steps, decoding=decoding, train=train,
            train_minutes=F.train_minutes,
        )  # fmt: skip
    times = {"budget_seconds": F.budget_seconds, "kernel_seconds": F.kernel_seconds,
             "decoding_seconds": F.decoding_seconds}  # fmt: skip
    config = dataclasses.replace(config, **{k: v for k, v in times.items() if v})
    record = accelerator.run_check(config, F.output_dir, F.work_dir)
    for name, sec in record["sections"].items():
        logging.info("%-10s %-8s %5.0fs %s", name, sec["status"], sec["seconds"], sec["reason"])
    logging.info("wrote %s", os.path.join(F.output_dir, accelerator.RECORD_FILE))


if __name__ == "__main__":
    flags.mark_flags_as_required(["output_dir"])
    app.run(main)
