"""The masked-attention kernel against its jnp reference on the device it runs on (accelerator
check, `recipes/accelerator.py`).

`check_kernels(plan, deadline)` runs `kernels.pallas_attention.attention` (on a GPU the Triton
kernel, on a TPU the Mosaic one, compiled for the device; on a CPU the interpreter, which is what
the dry run exercises) on every attention layout of `models/layouts.py` at model head shapes, in
float32 and bfloat16, forward and backward (gradients of a random projection of the output in q,
k and v), and compares it with `kernels.reference.attention_reference` two ways:

  max_err        against the reference at the matmul precision models run at (the test suite's
                 comparison; judged against `reference.TOLERANCE` / `GRAD_TOLERANCE`)
  max_err_exact  against the reference at float32 precision ("highest"): on GPUs the default
                 float32 matmul may round its inputs to TF32, in the reference and in the
                 backward pass (the reference's VJP) alike

The kernel's backward pass is the reference's VJP (`pallas_attention`), so the gradient cases
check that the kernel's custom VJP runs and agrees on the device, and `max_err_exact` shows the
precision that VJP reaches there. It also times kernel and reference on the decode layouts
(`kernels.benchmark.compare`).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from flexdraft_jax.kernels import benchmark as kbench
from flexdraft_jax.kernels import pallas_attention
from flexdraft_jax.kernels.reference import GRAD_TOLERANCE, TOLERANCE, attention_reference
from flexdraft_jax.models import layouts

LAYOUTS = ("causal", "prefill_block", "parallel", "draft_pass", "training")
DECODE_LAYOUTS = ("causal", "parallel", "draft_pass")  # a decode step's attention


@dataclasses.dataclass(frozen=True)
class HeadShape:
    name: str
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # D


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """What the kernel section runs: every layout at each head shape and dtype, gradients on
    `grad_layouts`, timings on the decode layouts of `timed_shapes` (bfloat16)."""

    heads: tuple[HeadShape, ...] = (
        HeadShape("smollm2_135m", 9, 3, 64),
        HeadShape("qwen3_8b", 32, 8, 128),
    )
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    layouts: tuple[str, ...] = LAYOUTS
    grad_layouts: tuple[str, ...] = ("training", "parallel")
    timed_shapes: tuple[str, ...] = ("smollm2_135m", "qwen3_8b")
    timed_layouts: tuple[str, ...] = DECODE_LAYOUTS
    batch: int = 4
    block_size: int = 16
    rows: int = 16  # candidate rows (causal, parallel) and mask groups (parallel)
    cache: int = 1024  # clean key slots of the decode layouts
    prompt: int = 256  # prompt rows of prefill_block
    seq_len: int = 512  # training layout
    anchors: int = 16
    timing_iters: int = 10
    seed: int = 0


@dataclasses.dataclass
class KernelCase:
    layout: str
    heads: str
    dtype: str
    direction: str  # "forward" or "backward"
    shape: dict  # B, T, S, N, K, D
    max_err: float
    max_err_exact: float
    tolerance: float
    ok: bool
    max_abs_reference: float
    interpret: bool
    seconds: float


@dataclasses.dataclass
class KernelTiming:
    layout: str
    heads: str
    dtype: str
    shape: dict
    kernel_ms: float
    reference_ms: float
    speedup: float
    tile_density: float
    interpret: bool


def make_layout(kind: str, plan: KernelPlan, rng: np.random.Generator):
    """(RowMeta, number of clean key slots) of one layout at the plan's sizes; decode layouts
    start at random per-sequence lengths in the first half of the cache."""
    b, w = plan.batch, plan.block_size
    start = rng.integers(0, max(1, plan.cache // 2), b)
    if kind == "causal":
        return layouts.causal(start, plan.rows).meta, plan.cache
    if kind == "prefill_block":
        lengths = rng.integers(plan.prompt // 2, plan.prompt + 1, b)
        return layouts.prefill_block(lengths, plan.prompt, w).meta, plan.prompt
    if kind == "parallel":
        return layouts.parallel(start, plan.rows, plan.rows, w).meta, plan.cache
    if kind == "draft_pass":
        return layouts.draft_pass(start, w).meta, plan.cache
    if kind == "training":
        anchors = np.sort(rng.integers(1, plan.seq_len, (b, plan.anchors)), axis=1)
        return layouts.training(plan.seq_len, anchors, w).meta, plan.seq_len
    raise ValueError(f"unknown layout {kind!r}; choose from {', '.join(LAYOUTS)}")


def _inputs(meta, num_clean: int, hs: HeadShape, dtype, rng):
    b, t = meta.q_limit.shape
    s = num_clean + meta.num_mask_keys
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dtype)  # noqa: E731
    q = draw(b, t, hs.num_heads, hs.head_dim)
    k, v = draw(b, s, hs.num_kv_heads, hs.head_dim), draw(b, s, hs.num_kv_heads, hs.head_dim)
    shape = dict(B=b, T=t, S=s, N=hs.num_heads, K=hs.num_kv_heads, D=hs.head_dim)
    return (q, k, v), draw(b, t, hs.num_heads, hs.head_dim), shape


def _max_err(a, b) -> float:
    diffs = [jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))) for x, y in zip(a, b)]
    return float(max(diffs))


def _max_abs(xs) -> float:
    return float(max(jnp.max(jnp.abs(x.astype(jnp.float32))) for x in xs))


def _kernel_fns(meta):
    """(forward, gradients) of the kernel and of the reference, jitted, for one layout."""

    def fwd(fn):
        return jax.jit(lambda q, k, v: (fn(q, k, v, meta),))

    def grad(fn):
        loss = lambda q, k, v, cot: jnp.sum(fn(q, k, v, meta).astype(jnp.float32) * cot)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    kernel, reference = pallas_attention.attention, attention_reference
    return {
        "forward": (fwd(kernel), fwd(reference)),
        "backward": (grad(kernel), grad(reference)),
    }


def _case(layout, hs, dtype, direction, meta, num_clean, rng) -> KernelCase:
    t0 = time.perf_counter()
    (q, k, v), cot, shape = _inputs(meta, num_clean, hs, jnp.dtype(dtype), rng)
    kernel, reference = _kernel_fns(meta)[direction]
    args = (q, k, v) if direction == "forward" else (q, k, v, cot.astype(jnp.float32))
    got = jax.block_until_ready(kernel(*args))
    want = reference(*args)
    with jax.default_matmul_precision("highest"):  # part of jit's cache key: traced anew
        exact = reference(*args)
    err = _max_err(got, want)
    table = TOLERANCE if direction == "forward" else GRAD_TOLERANCE
    tol = table[jnp.dtype(dtype)]
    finite = all(bool(jnp.isfinite(x.astype(jnp.float32)).all()) for x in got)
    return KernelCase(
        layout=layout, heads=hs.name, dtype=jnp.dtype(dtype).name, direction=direction,
        shape=shape, max_err=err, max_err_exact=_max_err(got, exact), tolerance=tol,
        ok=finite and err <= tol, max_abs_reference=_max_abs(want),
        interpret=jax.default_backend() == "cpu", seconds=time.perf_counter() - t0,
    )  # fmt: skip


def check_kernels(plan: KernelPlan, deadline: float, log=print) -> dict:
    """Forward cases, gradient cases, then timings, until `deadline` (time.perf_counter());
    whatever does not fit is listed under "skipped" with the reason."""
    rng = np.random.default_rng(plan.seed)
    todo = []
    for hs in plan.heads:
        for dtype in plan.dtypes:
            todo += [("forward", kind, hs, dtype) for kind in plan.layouts]
            todo += [("backward", kind, hs, dtype) for kind in plan.grad_layouts]
    cases, timings, skipped, failed = [], [], [], []
    for direction, kind, hs, dtype in todo:
        what = f"{direction} {kind} {hs.name} {dtype}"
        if time.perf_counter() > deadline:
            skipped.append({"case": what, "reason": "the kernel section's time budget ran out"})
            continue
        meta, num_clean = make_layout(kind, plan, rng)
        try:
            case = _case(kind, hs, dtype, direction, meta, num_clean, rng)
        except Exception as e:  # one case's failure (a lowering error, say) is a result too
            failed.append({"case": what, "error": f"{type(e).__name__}: {e}"})
            log(f"kernel {what}: FAILED {type(e).__name__}: {e}")
            continue
        cases.append(case)
        log(
            f"kernel {what}: max err {case.max_err:.2e} (exact {case.max_err_exact:.2e}, "
            f"tol {case.tolerance:.0e}) {'ok' if case.ok else 'OUT OF TOLERANCE'}"
        )
    for hs in (h for h in plan.heads if h.name in plan.timed_shapes):
        for kind in plan.timed_layouts:
            what = f"timing {kind} {hs.name} bfloat16"
            if time.perf_counter() > deadline:
                skipped.append({"case": what, "reason": "the kernel section's time budget ran out"})
                continue
            meta, num_clean = make_layout(kind, plan, rng)
            (q, k, v), _, shape = _inputs(meta, num_clean, hs, jnp.bfloat16, rng)
            try:
                t = kbench.compare(q, k, v, meta, iters=plan.timing_iters, warmup=2)
            except Exception as e:
                failed.append({"case": what, "error": f"{type(e).__name__}: {e}"})
                continue
            timings.append(
                KernelTiming(
                    kind,
                    hs.name,
                    "bfloat16",
                    shape,
                    t.kernel_ms,
                    t.reference_ms,
                    t.speedup,
                    t.tile_density,
                    t.interpret,
                )  # fmt: skip
            )
    return {
        "backend": jax.default_backend(),
        "kernel": pallas_attention.default_backend(),
        "interpret": jax.default_backend() == "cpu",
        "plan": dataclasses.asdict(plan),
        "cases": [dataclasses.asdict(c) for c in cases],
        "timings": [dataclasses.asdict(t) for t in timings],
        "all_ok": bool(cases) and all(c.ok for c in cases) and not failed,
        "skipped": skipped,
        "failed": failed,
    }
