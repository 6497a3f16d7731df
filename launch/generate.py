"""Generate completions with plain AR or FlexDraft decoding.

  python launch/generate.py --chat --prompt "Write a haiku about TPUs."
  python launch/generate.py --prompts_file=p.jsonl --mode=flex --output_json=out.json

Default target: the embedded SmolLM2-135M-Instruct; default draft: the one shipped in drafts/
(for the embedded target), else untrained copies of the target's projectors (still lossless).
"""

from __future__ import annotations

import dataclasses

from absl import app, flags, logging

from flexdraft_jax import compilation
from flexdraft_jax.common import write_json_atomic
from flexdraft_jax.decoding.decoder import Decoder, RunConfig
from flexdraft_jax.decoding.engine import MODES, EngineConfig
from flexdraft_jax.decoding.sampling import SamplingParams
from flexdraft_jax.models.config import MAX_BLOCK_SIZE
from flexdraft_jax.recipes import loading

F = flags.FLAGS
flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
flags.DEFINE_string("prompts_file", None, 'JSONL with one {"prompt": ...} (or "turns") per line.')
flags.DEFINE_bool("chat", False, "Apply the tokenizer's chat template to each prompt.")
flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate per prompt.", lower_bound=1)
flags.DEFINE_float("temperature", 0.0, "0 = greedy.", lower_bound=0.0)
flags.DEFINE_integer("top_k", 0, "Top-k sampling (0 = off).", lower_bound=0)
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling (1 = off).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("checkpoint", None, "HF directory or .gguf file (default: embedded SmolLM2).")
flags.DEFINE_enum("mode", "flex", MODES, "Decoding mode.")
flags.DEFINE_integer(
    "block_size", None, f"Draft block size, 2..{MAX_BLOCK_SIZE} (default: the draft's own).",
    lower_bound=2, upper_bound=MAX_BLOCK_SIZE,
)  # fmt: skip
flags.DEFINE_integer("draft_depth", 6, "Layers with draft projectors (untrained draft only).")
flags.DEFINE_float(
    "threshold", 0.01, "Confidence threshold for the verify length (0 = whole block)."
)
flags.DEFINE_string(
    "draft_checkpoint", None, "Release-format dir/.safetensors or an orbax workdir."
)
flags.DEFINE_enum("verify_rule", "speculative", ["speculative", "match"], "Sampling verification.")
flags.DEFINE_integer("cache_len", 1024, "KV cache capacity per sequence.")
flags.DEFINE_integer(
    "draft_vocab_size",
    EngineConfig.draft_vocab_size,
    "Draft among this many of the draft's most frequent tokens (0 = whole vocabulary; default: "
    "the size the draft was trained over, as its release records it).",
    lower_bound=0,
)
loading.define_decoding_flags()
flags.adopt_module_key_flags(loading)  # list them in --help
flags.DEFINE_string(
    "profile", "none",
    "Flex's step-cost profile: none (the estimate from bytes and FLOPs, nothing timed), auto "
    "(measured once per machine, model and batch size and stored under "
    "~/.cache/flexdraft_jax/profiles), or a JSON path (measured and written there if missing).",
)  # fmt: skip
flags.DEFINE_integer(
    "steps_per_call", RunConfig.steps_per_call, "Decode steps per device call.", lower_bound=1
)
flags.DEFINE_enum(
    "dispatch", RunConfig.dispatch, ["auto", "device", "host"],
    "Device loop (device), one executable per step (host), or host on a CPU and device "
    "elsewhere (auto).",
)  # fmt: skip
flags.DEFINE_string("output_json", None, "Write generations and stats here (atomically).")


def run(_):
    main_process = loading.initialize(F.distributed)
    compilation.enable_cache(F.compilation_cache)
    texts = loading.read_prompts(F.prompt, F.prompts_file)
    sp = SamplingParams(F.temperature, F.top_k, F.top_p)
    ecfg = EngineConfig(
        mode=F.mode,
        threshold=F.threshold,
        sampling=sp,
        rule=F.verify_rule,
        draft_vocab_size=F.draft_vocab_size,
    )
    cfg, target, tok = loading.load_target(
        F.checkpoint, dtype=F.dtype, attention_impl=F.attention_impl
    )
    draft_path = F.draft_checkpoint or loading.shipped_draft(F.checkpoint)
    draft = loading.load_draft(
        draft_path, cfg, target, depth=F.draft_depth,
        block_size=8 if F.block_size is None else F.block_size,
    )  # fmt: skip
    dcfg = draft.config
    if F.block_size is not None and F.block_size != dcfg.block_size:  # another block size
        dcfg = dataclasses.replace(dcfg, block_size=F.block_size)
    ids = loading.encode(tok, texts, F.chat)
    mesh = loading.decode_mesh(F.mesh, cfg, target, draft.params, batch=len(ids),
                                cache_len=F.cache_len)  # fmt: skip
    logging.info(
        "target %s, draft %s, %d prompts, %s, attention %s, mesh %s",
        F.checkpoint or "embedded SmolLM2",
        draft_path or "untrained",
        len(ids),
        target["embed"]["embedding"].dtype,
        cfg.attention_impl,
        loading.mesh_name(mesh),
    )
    dec = Decoder(
        cfg, target, draft, dcfg, ecfg, cache_len=F.cache_len,
        run=RunConfig(steps_per_call=F.steps_per_call, dispatch=F.dispatch),
        mesh=mesh,
    )  # fmt: skip
    dec.check(ids, F.max_new_tokens)  # bad prompts fail before a profile is measured
    dec.setup_profile(len(ids), F.profile)
    gen = dec.generate(ids, F.max_new_tokens, seed=F.seed)
    if not main_process:  # every process holds the same tokens; process 0 reports them
        return
    records = []
    for text, toks in zip(texts, gen.tokens):
        completion = tok.decode(toks, skip_special_tokens=True)
        records.append({"prompt": text, "text": completion, "token_ids": toks})
        print(f"### {text}\n{completion}\n")
    stats = {k: v for k, v in gen.stats.items() if k != "branch_per_step"}
    print(
        f"mode={F.mode} tau={stats['tau']:.2f} tokens/s={stats['tokens_per_s']:.1f} "
        f"steps={stats['steps']} branches={stats['branch_counts']}"
        + (f" costs={stats['cost_profile']}" if "cost_profile" in stats else "")
    )
    print(
        f"wall {stats['wall_seconds']:.2f} s: first token after "
        f"{stats['time_to_first_token']:.2f} s, compiling {stats['compile_seconds']:.2f} s "
        f"(compilation cache: {dec.compilation_cache or 'off'})"
    )
    if F.output_json:
        stats["branch_per_step"] = gen.stats["branch_per_step"]
        write_json_atomic(F.output_json, {"generations": records, "stats": stats})


if __name__ == "__main__":
    app.run(run)
