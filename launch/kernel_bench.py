"""Time the masked-attention Pallas kernel against the jnp reference, per attention layout.

  python launch/kernel_bench.py --num_heads=32 --num_kv_heads=8 --head_dim=128 --cache=4096
  python launch/kernel_bench.py --layouts=parallel,draft_pass --batch=8 --out=bench.json

Layouts (DESIGN §2.3, models/layouts.py): causal (a verify pass of --rows rows), prefill_block
(--prompt rows + a mask block), parallel (--rows candidate rows + --groups mask groups), draft_pass
(one mask block), training (--seq_len rows + --anchors blocks, no cache). Decode layouts sit at a
random per-sequence start in the first half of the cache. Prints a table and writes JSON. On CPU the
kernel runs in the Pallas interpreter: the numbers then check plumbing, not speed.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from flexdraft_jax.kernels.benchmark import compare
from flexdraft_jax.kernels.blocks import BlockSizes
from flexdraft_jax.models import layouts

LAYOUTS = ("causal", "prefill_block", "parallel", "draft_pass", "training")
F = flags.FLAGS
flags.DEFINE_list("layouts", list(LAYOUTS), f"Layouts to time (of {', '.join(LAYOUTS)}).")
flags.DEFINE_integer("batch", 1, "Batch size B.", lower_bound=1)
flags.DEFINE_integer("num_heads", 9, "Query heads N (SmolLM2-135M: 9).", lower_bound=1)
flags.DEFINE_integer("num_kv_heads", 3, "KV heads K (SmolLM2-135M: 3).", lower_bound=1)
flags.DEFINE_integer("head_dim", 64, "Head dim D.", lower_bound=1)
flags.DEFINE_integer("cache", 1024, "KV cache capacity (clean key slots) for decode layouts.")
flags.DEFINE_integer("block_size", 8, "Draft block size W.", lower_bound=2)
flags.DEFINE_integer("rows", 8, "Candidate / verify rows R.", lower_bound=1)
flags.DEFINE_integer("groups", 8, "Mask groups G of the parallel step.", lower_bound=1)
flags.DEFINE_integer("prompt", 256, "Prompt rows of prefill_block.", lower_bound=1)
flags.DEFINE_integer("seq_len", 512, "Sequence length of the training layout.", lower_bound=2)
flags.DEFINE_integer("anchors", 16, "Mask blocks per sequence in the training layout.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "q/k/v dtype.")
flags.DEFINE_integer("block_q", 0, "Kernel query block (0: backend default).", lower_bound=0)
flags.DEFINE_integer("block_k", 0, "Kernel key block (0: backend default).", lower_bound=0)
flags.DEFINE_integer("iters", 10, "Timed calls per implementation.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Random lengths and inputs.")
flags.DEFINE_string("out", "kernel_bench.json", "JSON output path ('' to skip).")


def build(kind: str, rng: np.random.Generator):
    """(Layout meta, number of clean key slots) for one layout at the flag shapes."""
    b, w = F.batch, F.block_size
    start = rng.integers(0, max(1, F.cache // 2), b)
    if kind == "causal":
        return layouts.causal(start, F.rows).meta, F.cache
    if kind == "prefill_block":
        lengths = rng.integers(F.prompt // 2, F.prompt + 1, b)
        return layouts.prefill_block(lengths, F.prompt, w).meta, F.prompt
    if kind == "parallel":
        return layouts.parallel(start, F.rows, F.groups, w).meta, F.cache
    if kind == "draft_pass":
        return layouts.draft_pass(start, w).meta, F.cache
    if kind == "training":
        anchors = np.sort(rng.integers(1, F.seq_len, (b, F.anchors)), axis=1)
        return layouts.training(F.seq_len, anchors, w).meta, F.seq_len
    raise ValueError(f"unknown layout {kind!r}; choose from {', '.join(LAYOUTS)}")


def main(_):
    unknown = sorted(set(F.layouts) - set(LAYOUTS))
    if unknown:
        raise app.UsageError(f"unknown layouts {unknown}; choose from {', '.join(LAYOUTS)}")
    platform = jax.default_backend()
    if platform == "cpu":
        logging.warning(
            "JAX runs on CPU: the kernel runs in the Pallas interpreter (slow by design)"
        )
    sizes = None
    if F.block_q or F.block_k:
        d = BlockSizes.get_default("gpu" if platform == "gpu" else "tpu")
        sizes = BlockSizes(F.block_q or d.block_q, F.block_k or d.block_k)
    rng = np.random.default_rng(F.seed)
    dtype = jnp.dtype(F.dtype)
    results = []
    for kind in F.layouts:
        meta, num_clean = build(kind, rng)
        b, t = meta.q_limit.shape
        s = num_clean + meta.num_mask_keys
        draw = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dtype)  # noqa: E731
        q = draw(b, t, F.num_heads, F.head_dim)
        k, v = draw(b, s, F.num_kv_heads, F.head_dim), draw(b, s, F.num_kv_heads, F.head_dim)
        logging.info("timing %s: T=%d S=%d", kind, t, s)
        timing = compare(q, k, v, meta, block_sizes=sizes, iters=F.iters)
        results.append({"layout": kind, "T": t, "S": s, **dataclasses.asdict(timing)})

    mode = "interpret (CPU)" if platform == "cpu" else platform
    print(
        f"\nB={F.batch} N={F.num_heads} K={F.num_kv_heads} D={F.head_dim} {F.dtype} "
        f"on {platform}; kernel mode: {mode}"
    )
    header = f"{'layout':<14}{'T':>6}{'S':>7}{'kernel ms':>11}{'ref ms':>9}{'speedup':>9}"
    print(header + f"{'tiles':>7}{'max err':>10}")
    for r in results:
        print(
            f"{r['layout']:<14}{r['T']:>6}{r['S']:>7}{r['kernel_ms']:>11.3f}"
            f"{r['reference_ms']:>9.3f}{r['speedup']:>9.2f}{r['tile_density']:>7.2f}"
            f"{r['max_abs_err']:>10.2e}"
        )
    if F.out:
        payload = {
            "platform": platform,
            "interpret": platform == "cpu",
            "devices": [str(d) for d in jax.devices()],
            "shapes": {
                "batch": F.batch,
                "num_heads": F.num_heads,
                "num_kv_heads": F.num_kv_heads,
                "head_dim": F.head_dim,
                "dtype": F.dtype,
            },
            "results": results,
        }
        with open(F.out, "w") as f:
            json.dump(payload, f, indent=2)
        logging.info("wrote %s", F.out)


if __name__ == "__main__":
    app.run(main)
