"""Step cost of every decoding branch on random-weight targets of real shapes (accelerator check).

`measure_step_costs(plan, deadline)` builds each target shape (SmolLM2-135M, Qwen3-1.7B, Qwen3-8B)
with random weights in the plan's dtype plus an untrained draft, and times every branch of the
flex engine's compiled step (AR; sequential and parallel at each row bucket up to the block size)
at each batch size, with Pallas and with XLA attention, through `Decoder.measure` (each branch
forced on a warm state, the fastest of a few rounds; random drafts are rarely accepted, which
changes no branch's work). The method's premise is visible here: on a memory-bound device a
16-row step should cost close to a 1-row step.

Compilation dominates the section, so the programs of one shape (every batch size and attention
implementation) are compiled at once from worker threads (`Decoder.compile_measure`: XLA compiles
with Python's lock released), then timed one after another. Whatever does not fit the time given
or the device's memory is recorded as skipped, with the reason; a failure (out of memory, a
lowering error) is recorded and the next job runs.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import queue
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from flexdraft_jax.decoding import engine
from flexdraft_jax.decoding.decoder import Decoder
from flexdraft_jax.models import precision
from flexdraft_jax.models import transformer as tf
from flexdraft_jax.models.config import DraftConfig, ModelConfig
from flexdraft_jax.models.draft import Draft

GIB = float(2**30)


@dataclasses.dataclass(frozen=True)
class TargetShape:
    name: str
    cfg: ModelConfig
    depth: int  # draft depth D


# Shapes of the public checkpoints' config.json files (HF hub: HuggingFaceTB/SmolLM2-135M-Instruct,
# Qwen/Qwen3-1.7B, Qwen/Qwen3-8B); the 8B one is configs/qwen3_8b.py's (a test keeps them equal).
SMOLLM2_135M = ModelConfig(
    arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
    num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
    tie_word_embeddings=True, max_position_embeddings=8192,
)  # fmt: skip
QWEN3_1_7B = ModelConfig(
    arch="qwen3", vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=28,
    num_heads=16, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
    qk_norm=True, tie_word_embeddings=True, max_position_embeddings=40960,
)  # fmt: skip
QWEN3_8B = ModelConfig(
    arch="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
    num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
    qk_norm=True, tie_word_embeddings=False, max_position_embeddings=40960,
)  # fmt: skip
FULL_SHAPES = (
    TargetShape("smollm2_135m", SMOLLM2_135M, 6),
    TargetShape("qwen3_1.7b", QWEN3_1_7B, 6),
    TargetShape("qwen3_8b", QWEN3_8B, 8),
)


@dataclasses.dataclass(frozen=True)
class StepCostPlan:
    shapes: tuple[TargetShape, ...] = FULL_SHAPES
    batch_sizes: tuple[int, ...] = (1, 4, 16, 64, 256)
    impls: tuple[str, ...] = ("pallas", "xla")
    block_size: int = 16  # row buckets 2, 4, 8, 16
    cache_len: int = 1024  # `Decoder.measure` decodes from a context of a quarter of it
    draft_vocab: int = 8192  # the draft pass's vocabulary (0: the whole one), as shipped drafts
    dtype: str = "bfloat16"
    repeats: int = 5  # rounds over the branches per measurement ...
    max_seconds: float = 2.0  # ... while they take under this long (after two)
    workers: int = 10  # compiling threads: every job of a shape at once (5 batch sizes x 2)
    memory_fraction: float = 0.9  # of the device's free memory a job may plan to use
    seed: int = 0


@dataclasses.dataclass
class StepCost:
    """One (shape, attention, batch) job: its branch times or why there are none."""

    shape: str
    impl: str
    batch: int
    status: str  # "measured", "skipped" or "failed"
    reason: str = ""
    seconds: dict = dataclasses.field(default_factory=dict)  # branch -> seconds per step
    relative: dict = dataclasses.field(default_factory=dict)  # branch -> seconds / AR step
    draft_pass: float = 0.0
    rows: dict = dataclasses.field(default_factory=dict)  # branch -> (shallow, deep) rows
    compile_seconds: float = 0.0
    measure_seconds: float = 0.0
    step_memory_gib: float | None = None  # arguments + temporaries of the compiled step


# ----------------------------------------------------------------------------- targets


def random_target(cfg: ModelConfig, dtype, seed: int) -> dict:
    """Target parameters of `cfg`'s shapes made directly in `dtype` on the device: N(0, 0.02)
    matrices, unit norm scales, zero biases (no float32 copy of an 8B model is ever built)."""
    abstract = jax.eval_shape(functools.partial(tf.init_target, cfg), jax.random.PRNGKey(0))
    paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(paths))
    dtype = jnp.dtype(dtype)

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def normal(key, shape, kind):
        if kind == "scale":
            return jnp.ones(shape, dtype)
        if kind == "bias":
            return jnp.zeros(shape, dtype)
        return jax.random.normal(key, shape, dtype) * jnp.asarray(0.02, dtype)

    leaves = []
    for (path, leaf), key in zip(paths, keys):
        name = jax.tree_util.keystr(path)
        kind = "scale" if "scale" in name else "bias" if "bias" in name else "weight"
        leaves.append(normal(key, tuple(leaf.shape), kind))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def random_draft(cfg: ModelConfig, dcfg: DraftConfig, target, dtype, vocab: int, seed: int):
    """An untrained draft (the target's projectors copied, as `init_draft` does) as a `Draft`
    whose draft vocabulary is the first `vocab` ids (0: the whole vocabulary)."""
    params = jax.jit(functools.partial(tf.init_draft, cfg, dcfg))(target, jax.random.PRNGKey(seed))
    params = precision.cast_params(params, dtype)
    if not vocab or vocab >= cfg.vocab_size:
        return Draft(params, dcfg)
    return Draft(params, dcfg, vocab=np.arange(cfg.vocab_size, dtype=np.int32), vocab_size=vocab)


def param_bytes(cfg: ModelConfig, itemsize: int) -> int:
    abstract = jax.eval_shape(functools.partial(tf.init_target, cfg), jax.random.PRNGKey(0))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract)) * itemsize


def cache_bytes(cfg: ModelConfig, batch: int, capacity: int, itemsize: int) -> int:
    return 2 * cfg.num_layers * batch * capacity * cfg.num_kv_heads * cfg.head_dim * itemsize


def free_device_bytes() -> float | None:
    """Free memory of the default device (None where JAX does not report it, e.g. CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return float(stats["bytes_limit"] - stats.get("bytes_in_use", 0))


def step_memory(exe) -> float | None:
    """Bytes a compiled program needs on the device: arguments, outputs not aliased to them, and
    temporaries (None where XLA does not say)."""
    try:
        m = exe.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if m is None:
        return None
    return float(
        m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )  # fmt: skip


# ----------------------------------------------------------------------------- compiling


def compile_all(jobs: list, compile_fn, workers: int, deadline: float) -> dict:
    """Run `compile_fn(job)` for each job from `workers` daemon threads, in order, until
    `deadline` (time.perf_counter()). Returns {job: (result or exception, seconds)}; jobs that
    did not start before the deadline or did not finish by it are absent. A job is not started
    when the compilations finished so far suggest it cannot end in time. The threads are daemons:
    a compilation still running at the deadline does not keep the process alive."""
    todo: queue.Queue = queue.Queue()
    for job in jobs:
        todo.put(job)
    done: dict = {}
    lock = threading.Lock()

    def expected() -> float:
        with lock:
            took = [s for _, s in done.values()]
        return float(np.median(took)) if took else 0.0

    def worker():
        while True:
            try:
                job = todo.get_nowait()
            except queue.Empty:
                return
            if time.perf_counter() + expected() > deadline:
                continue
            t0 = time.perf_counter()
            try:
                out = compile_fn(job)
            except Exception as e:  # recorded per job
                out = e
            with lock:
                done[job] = (out, time.perf_counter() - t0)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.perf_counter()))
    with lock:
        return dict(done)


# ----------------------------------------------------------------------------- the section


def _shape_jobs(shape: TargetShape, plan: StepCostPlan, free: float | None):
    """(jobs to run, StepCosts skipped up front for memory)."""
    itemsize = jnp.dtype(plan.dtype).itemsize
    weights = param_bytes(shape.cfg, itemsize)
    jobs, skipped = [], []
    for b in plan.batch_sizes:
        need = weights + cache_bytes(shape.cfg, b, plan.cache_len, itemsize)
        for impl in plan.impls:
            if free is not None and need > plan.memory_fraction * free:
                reason = (
                    f"weights and KV cache alone need {need / GIB:.1f} GiB; "
                    f"{free / GIB:.1f} GiB free"
                )
                skipped.append(StepCost(shape.name, impl, b, "skipped", reason))
            else:
                jobs.append((impl, b))
    return jobs, skipped


def _measure_shape(shape: TargetShape, plan: StepCostPlan, deadline: float, log) -> list:
    free = free_device_bytes()
    jobs, out = _shape_jobs(shape, plan, free)
    if not jobs:
        return out
    dtype = jnp.dtype(plan.dtype)
    t0 = time.perf_counter()
    target = random_target(shape.cfg, dtype, plan.seed)
    dcfg = DraftConfig(depth=shape.depth, block_size=plan.block_size)
    draft = random_draft(shape.cfg, dcfg, target, dtype, plan.draft_vocab, plan.seed + 1)
    log(f"step costs {shape.name}: random weights in {time.perf_counter() - t0:.1f}s")
    ecfg = engine.EngineConfig(mode="flex")
    decoders = {
        impl: Decoder(
            shape.cfg.replace(attention_impl=impl), target, draft, ecfg=ecfg,
            cache_len=plan.cache_len, eos_ids=(),
        )
        for impl in plan.impls
    }  # fmt: skip
    compiled = compile_all(
        jobs, lambda job: decoders[job[0]].compile_measure(job[1]), plan.workers, deadline
    )
    free = free_device_bytes()
    for impl, b in jobs:
        rec = StepCost(shape.name, impl, b, "skipped")
        got = compiled.get((impl, b))
        if got is None:
            rec.reason = "its compilation did not start or finish within the time budget"
            out.append(rec)
            continue
        exe, rec.compile_seconds = got
        if isinstance(exe, Exception):
            rec.status, rec.reason = "failed", f"compiling: {type(exe).__name__}: {exe}"[:2000]
            out.append(rec)
            continue
        need = step_memory(exe)
        rec.step_memory_gib = None if need is None else need / GIB
        if need is not None and free is not None and need > plan.memory_fraction * free:
            rec.reason = f"the step needs {need / GIB:.1f} GiB; {free / GIB:.1f} GiB free"
        elif time.perf_counter() > deadline:
            rec.reason = "the time budget ran out before it was timed"
        else:
            t1 = time.perf_counter()
            try:
                prof = decoders[impl].measure(b, repeats=plan.repeats, max_seconds=plan.max_seconds)
            except Exception as e:  # out of memory, say: recorded, the next job runs
                rec.status, rec.reason = "failed", f"measuring: {type(e).__name__}: {e}"[:2000]
            else:
                rec.status = "measured"
                rec.seconds, rec.relative = dict(prof.branches), prof.relative()
                rec.draft_pass = prof.draft_pass
                rec.rows = {k: list(v) for k, v in prof.rows.items()}
            rec.measure_seconds = time.perf_counter() - t1
            gc.collect()
        out.append(rec)
        if rec.status == "measured":
            rel = rec.relative
            top = max((k for k in rel if k.startswith("par")), key=lambda k: int(k[3:]))
            log(
                f"step costs {shape.name} {impl} batch {b}: AR {1e3 * rec.seconds['ar1']:.2f} ms, "
                f"{top} {rel[top]:.2f}x (compile {rec.compile_seconds:.0f}s)"
            )
        else:
            log(f"step costs {shape.name} {impl} batch {b}: {rec.status}: {rec.reason[:200]}")
    decoders.clear()  # the shape's weights go with its decoders
    gc.collect()
    return out


def measure_step_costs(plan: StepCostPlan, deadline: float, log=print) -> dict:
    """Every shape in turn, each given an equal share of the time left (a shape that finishes
    early leaves its time to the next). Returns the section's record."""
    results = []
    for i, shape in enumerate(plan.shapes):
        left = deadline - time.perf_counter()
        share = time.perf_counter() + left / (len(plan.shapes) - i)
        if left <= 0:
            results += [
                StepCost(shape.name, impl, b, "skipped", "the time budget ran out")
                for b in plan.batch_sizes
                for impl in plan.impls
            ]
            continue
        try:
            results += _measure_shape(shape, plan, share, log)
        except Exception as e:  # building the shape's weights failed: its jobs all fail
            reason = f"{type(e).__name__}: {e}"[:2000]
            results += [
                StepCost(shape.name, impl, b, "failed", reason)
                for b in plan.batch_sizes
                for impl in plan.impls
            ]
            gc.collect()
    plan_rec = dataclasses.asdict(plan)
    plan_rec["shapes"] = [
        {"name": s.name, "depth": s.depth, "model": dataclasses.asdict(s.cfg)} for s in plan.shapes
    ]
    return {"plan": plan_rec, "results": [dataclasses.asdict(r) for r in results]}
