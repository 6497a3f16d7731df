"""The one-command demo: SmolLM2-135M-Instruct, its FlexDraft drafter, the benchmark.

  python launch/demo.py --workdir=/tmp/demo            shipped draft (else an untrained one),
                                                       HumanEval and chat benchmark, 8-12 minutes
  python launch/demo.py --workdir=/tmp/demo --retrain  build training prompts, self-distil,
                                                       attention-tune, calibrate, benchmark,
                                                       within --budget_minutes

Finished stages are recorded in WORKDIR/stages/ and skipped on a rerun. Results: WORKDIR/benchmark/
(HumanEval) and WORKDIR/benchmark_sharegpt/ (chat): results.json, speedup.png, acceptance.png,
step_cost.png.
"""

from __future__ import annotations

import os

from absl import app, flags, logging

from flexdraft_jax import compilation
from flexdraft_jax.bench import report
from flexdraft_jax.recipes import demo, loading

F = flags.FLAGS
flags.DEFINE_string("workdir", None, "Stage markers, trained drafts, benchmark results.")
flags.DEFINE_bool(
    "retrain", False, "Train a new drafter first (whole story) instead of the shipped one."
)
flags.DEFINE_float("budget_minutes", 40.0, "Time budget of --retrain, benchmark included.")
flags.DEFINE_string(
    "config",
    "configs/smollm2_135m.py",
    "Training config for --retrain "
    "(path[:arg], e.g. configs/smollm2_135m.py:runlocal for a smoke run).",
)
flags.DEFINE_integer("num_prompts", None, "Override the demo's number of prompts per set.")
flags.DEFINE_integer("max_new_tokens", None, "Override the demo's tokens per prompt.")
flags.DEFINE_list("batch_sizes", None, "Override the demo's batch sizes (default 1,4,16,64).")
flags.DEFINE_bool(
    "hf_baseline", None,
    "The transformers generate peer row at batch 1 and 4 on HumanEval (default: when torch is "
    "installed).",
)  # fmt: skip
loading.define_decoding_flags()
flags.adopt_module_key_flags(loading)  # list them in --help
flags.mark_flag_as_required("workdir")


def main(_):
    compilation.enable_cache(F.compilation_cache)
    logging.set_verbosity(logging.INFO)
    over = {}
    if F.num_prompts:
        over["num_prompts"] = F.num_prompts
    if F.max_new_tokens:
        over["max_new_tokens"] = F.max_new_tokens
    if F.batch_sizes:
        over["batch_sizes"] = tuple(int(b) for b in F.batch_sizes)
    results = demo.run_demo(
        F.workdir,
        retrain_draft=F.retrain,
        budget_minutes=F.budget_minutes,
        config_path=F.config,
        bench_overrides=over,
        hf_baseline=F.hf_baseline,
        dtype=F.dtype,
        attention_impl=F.attention_impl,
        mesh=F.mesh,
    )
    for name, res in results.items():
        if name != "demo_seconds":
            print(f"\n== {name} ({res['config']['prompts']})")
            print(report.format_table(res))
            print(report.format_step_costs(res))
    print(f"results and plots: {os.path.join(F.workdir, 'benchmark')}, benchmark_sharegpt")
    print(f"demo wall time: {results['demo_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    app.run(main)
