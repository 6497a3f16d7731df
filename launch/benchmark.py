"""Benchmark AR, sequential, parallel and flex decoding side by side across batch sizes.

  python launch/benchmark.py --output_dir=/tmp/bench
  python launch/benchmark.py --prompts_file=mt_bench.jsonl --chat --batch_sizes=1,8 \
      --modes=ar,flex,flex:nocalib,paper --hf_baseline --output_dir=/tmp/bench

Default target: the embedded SmolLM2-135M-Instruct; default draft: the one shipped in drafts/
(embedded target only), else untrained copies of the target's projectors. Prompts: HumanEval
(`--dataset=humaneval`, the default) or held-out ShareGPT chat (`--dataset=sharegpt`), rendered as
chat turns when the tokenizer has a chat template, as the shipped draft was trained (`--nochat`
for raw completions). Mode specs take ablation options: `flex:nocalib`, `flex:t=0`.
Writes results.json, speedup.png, acceptance.png and step_cost.png to --output_dir.

  python launch/benchmark.py --tau_only --dataset=sharegpt --modes=sequential --batch_sizes=1 \
      --num_prompts=48    # tau only: each mode decodes once, untimed, no AR -> tau.json
"""

from __future__ import annotations

import dataclasses
import os

from absl import app, flags, logging

from flexdraft_jax import compilation, prompts
from flexdraft_jax.bench import harness, report
from flexdraft_jax.common import write_json_atomic
from flexdraft_jax.models.config import MAX_BLOCK_SIZE
from flexdraft_jax.recipes import loading

F = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Target: HF directory or .gguf file (default: embedded).")
flags.DEFINE_string("draft_checkpoint", None, "Release-format dir/.safetensors or orbax workdir.")
flags.DEFINE_enum(
    "dataset", "humaneval", prompts.BENCHMARK_SETS,
    "Prompt set when no --prompts_file: HumanEval problems (code) or held-out ShareGPT first "
    "turns (chat; never seen in training).",
)  # fmt: skip
flags.DEFINE_string("prompts_file", None, 'JSONL of {"prompt": ...} or {"turns": [...]} lines.')
flags.DEFINE_bool(
    "chat",
    None,
    "Apply the chat template (default: on when the tokenizer has one; drafts are trained on "
    "chat turns).",
)
flags.DEFINE_integer(
    "num_prompts", 16, "Prompts to use (repeated to fill a larger batch).", lower_bound=1
)
flags.DEFINE_list("batch_sizes", ["1", "4", "16", "64"], "Batch sizes to sweep.")
flags.DEFINE_list(
    "modes",
    ["ar", "sequential", "parallel", "flex"],
    "Modes (ar is always added); options: MODE:nocalib, MODE:t=THETA, MODE:dv=N (draft "
    "vocabulary size, 0 = all), MODE:device (the device loop) with MODE:spc=N (steps per call, "
    "default 16), MODE:host (host dispatch: one executable per step; the default on a CPU) with "
    "MODE:la=N (its lookahead), MODE:cap=N (KV cache capacity).",
)
flags.DEFINE_integer("max_new_tokens", 64, "Tokens per prompt.", lower_bound=1)
flags.DEFINE_integer(
    "block_size", None, f"Draft block size, 2..{MAX_BLOCK_SIZE} (default: the draft's own).",
    lower_bound=2, upper_bound=MAX_BLOCK_SIZE,
)  # fmt: skip
flags.DEFINE_integer("draft_depth", 6, "Layers with draft projectors (untrained draft only).")
flags.DEFINE_float("threshold", 0.01, "Confidence threshold (0 = verify the whole block).")
flags.DEFINE_float(
    "temperature", 0.0, "0 = greedy (outputs are checked against AR).", lower_bound=0.0
)
flags.DEFINE_bool("no_calibration", False, "Ablation: decode without the calibration MLP.")
flags.DEFINE_bool("hf_baseline", False, "Also time transformers generate on the same weights.")
flags.DEFINE_integer(
    "repeats", 3,
    "Timed rounds per batch size (the speedup sums them; 5 or more give its range).",
    lower_bound=1,
)  # fmt: skip
flags.DEFINE_float(
    "repeats_within_seconds", None,
    "A mode's repeats after the second only if that many of its decodes fit in this many seconds"
    " (default: all).",
    lower_bound=0.0,
)  # fmt: skip
flags.DEFINE_integer("profile_repeats", 5, "Rounds of the flex cost profile.", lower_bound=1)
flags.DEFINE_float(
    "profile_seconds", None, "Stop profile rounds (after two) once this long.", lower_bound=0.0
)
flags.DEFINE_integer("cache_len", None, "KV cache slots (default: fits prompt + output).")
loading.define_decoding_flags()
flags.adopt_module_key_flags(loading)  # list them in --help
flags.DEFINE_bool(
    "tau_only", False,
    "Tau only: each mode decodes every batch once, untimed, without AR or a cost profile; writes"
    " tau.json.",
)  # fmt: skip
flags.DEFINE_string("output_dir", "/tmp/flexdraft_bench", "results.json, plots, cost profiles.")


def main(_):
    main_process = loading.initialize(F.distributed)
    compilation.enable_cache(F.compilation_cache)
    batch_sizes = [int(b) for b in F.batch_sizes]
    if F.prompts_file:
        texts = loading.read_prompts((), F.prompts_file)
    else:
        texts = prompts.benchmark_prompts(F.dataset)
    texts = texts[: F.num_prompts]
    cfg, target, tok = loading.load_target(
        F.checkpoint, dtype=F.dtype, attention_impl=F.attention_impl
    )
    chat = bool(getattr(tok, "chat_template", None)) if F.chat is None else F.chat
    draft_path = F.draft_checkpoint or loading.shipped_draft(F.checkpoint)
    if draft_path is None:
        logging.warning("no trained draft: using UNTRAINED draft projectors (tau ~1, no speedup)")
    draft = loading.load_draft(
        draft_path, cfg, target, depth=F.draft_depth,
        block_size=8 if F.block_size is None else F.block_size,
    )  # fmt: skip
    dcfg = draft.config
    if F.block_size is not None and F.block_size != dcfg.block_size:  # another block size
        dcfg = dataclasses.replace(dcfg, block_size=F.block_size)
    ids = loading.encode(tok, texts, chat)
    mesh = loading.decode_mesh(F.mesh, cfg, target, draft.params, batch=max(batch_sizes),
                                cache_len=F.cache_len or 1024)  # fmt: skip
    logging.info(
        "target %s, draft %s, %d prompts, chat=%s, mesh %s",
        F.checkpoint or "embedded SmolLM2",
        draft_path or "untrained",
        len(ids),
        chat,
        loading.mesh_name(mesh),
    )
    meta = {
        "checkpoint": F.checkpoint or "embedded",
        "draft": draft_path or "untrained",
        "prompts": F.prompts_file or F.dataset,
        "chat": chat,
        "dtype": str(target["embed"]["embedding"].dtype),
        "mesh": loading.mesh_name(mesh),
    }
    if F.tau_only:
        rows = harness.measure_tau(
            cfg, target, draft, dcfg, ids, batch_sizes=batch_sizes, modes=F.modes,
            max_new_tokens=F.max_new_tokens, threshold=F.threshold, temperature=F.temperature,
            use_calibration=not F.no_calibration, cache_len=F.cache_len, mesh=mesh,
        )  # fmt: skip
        if main_process:
            setup = dict(num_prompts=len(ids), max_new_tokens=F.max_new_tokens,
                         threshold=F.threshold, temperature=F.temperature)  # fmt: skip
            out = {"config": {**meta, **setup}, "rows": rows}
            path = write_json_atomic(os.path.join(F.output_dir, "tau.json"), out)
            for r in rows:
                print(f"{r['mode']:<20} batch {r['batch_size']:>3}  tau {r['tau']:.3f}  "
                      f"({r['tokens']} tokens, {r['steps']} steps)")  # fmt: skip
            print(f"results: {path}")
        return
    results = harness.run_benchmark(
        cfg, target, tok, draft, dcfg, ids,
        batch_sizes=batch_sizes,
        modes=F.modes,
        max_new_tokens=F.max_new_tokens,
        threshold=F.threshold,
        temperature=F.temperature,
        use_calibration=not F.no_calibration,
        hf_baseline=F.hf_baseline,
        hf_source=F.checkpoint,
        output_dir=F.output_dir,
        cache_len=F.cache_len,
        timing=harness.TimingPlan(
            repeats=F.repeats, repeats_within_seconds=F.repeats_within_seconds,
            profile_repeats=F.profile_repeats, profile_seconds=F.profile_seconds,
        ),
        mesh=mesh,
        meta=meta,
    )  # fmt: skip
    if main_process:
        print(report.format_table(results))
        print(report.format_step_costs(results))
        print(f"results: {os.path.join(F.output_dir, report.RESULTS_FILE)}")


if __name__ == "__main__":
    app.run(main)
