"""The one-command story: target -> (optionally) a freshly trained drafter -> the benchmark.

  run_demo(workdir, retrain=False, ...)   embedded SmolLM2-135M-Instruct, the shipped draft (or an
                                          untrained one, loudly), the benchmark on the shortest
                                          HumanEval prompts and held-out ShareGPT chat turns
  run_demo(workdir, retrain=True, budget_minutes=40)
        distil   training prompts from Python's own documentation, greedy self-distillation
        attention  attention tuning (mask embedding + draft projectors)
        calibration  the bonus-guided calibration MLP, everything else frozen
        benchmark  as above, with the new draft

Each stage writes `workdir/stages/NAME.json` when it finishes, so a rerun skips finished work;
training stages also resume from their own orbax checkpoints when interrupted. The training library
(flexdraft_jax.training) is imported only on the retrain path.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time

from flexdraft_jax import prompts
from flexdraft_jax.bench import harness, report
from flexdraft_jax.common import round_up, write_json_atomic
from flexdraft_jax.models import precision
from flexdraft_jax.recipes import loading

log = logging.getLogger(__name__)

# The benchmark a demo runs on each prompt set (8-12 minutes in all on a 2-core CPU).
DEMO_BENCH = dict(
    num_prompts=4,
    batch_sizes=(1, 4, 16, 64),
    modes=None,  # each set's own (DEMO_SETS)
    max_new_tokens=12,
    # Timed decodes per mode and batch size: five rounds of AR and flex decoded in turns, step
    # by step (their 11-step decodes at one batch take about a second; the speedup sums the
    # rounds, and five give its range at >= 90%); a third and later for the others only where
    # their five decodes fit in 5 s.
    repeats=5,
    repeats_within_seconds=5.0,
    # AR and flex timed again, up to 10 rounds started within 20 s, while flex's paired range
    # reaches over 2% from its speedup.
    settle_rounds=10,
    settle_seconds=20.0,
    # Rounds over the branches when profiling step costs: up to 8 while they take under 3 s,
    # twice per batch size (before and after the warm-up). Each round prices the speculative
    # steps against its own AR step; their median ratio over rounds is what the policy reads.
    profile_repeats=8,
    profile_seconds=3.0,
)
# Prompt sets (`prompts.BENCHMARK_SETS`): every mode on code, with the `transformers` peer row
# at small batch; AR against flex, the mode a user runs, on chat.
DEMO_SETS = {
    "humaneval": dict(modes=("ar", "sequential", "parallel", "flex"), hf_batch_sizes=(1, 4)),
    "sharegpt": dict(modes=("ar", "flex"), hf_batch_sizes=()),
}
# Rough rates on a 2-core CPU used to size the retrain stages to the budget; each stage records the
# rates it achieved in its marker file, so they can be corrected from a real run.
DISTILL_TOKENS_PER_S = 150.0  # greedy generation at batch 64, 128-token responses
TRAIN_SECONDS_PER_STEP = 1.5  # smollm2_135m's joint step with the cached clean pass, batch 8
BENCH_MINUTES = 10.0


class Stages:
    """Marker files for finished stages: `workdir/stages/NAME.json` holds the stage's summary."""

    def __init__(self, workdir: str):
        self.dir = os.path.join(workdir, "stages")
        os.makedirs(self.dir, exist_ok=True)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, f"{name}.json")

    def done(self, name: str) -> dict | None:
        p = self.path(name)
        if not os.path.exists(p):
            return None
        with open(p) as f:
            return json.load(f)

    def run(self, name: str, fn, *args, **kw) -> dict:
        """fn(...) -> summary dict, unless the stage already finished (then its saved summary)."""
        prev = self.done(name)
        if prev is not None:
            log.info("stage %s: already done (%s), skipping", name, self.path(name))
            return prev
        log.info("stage %s: starting", name)
        t0 = time.perf_counter()
        summary = dict(fn(*args, **kw) or {})
        summary["stage_seconds"] = time.perf_counter() - t0
        write_json_atomic(self.path(name), summary)
        log.info("stage %s: done in %.0fs", name, summary["stage_seconds"])
        return summary


# ----------------------------------------------------------------------------- retrain


def plan_retrain(config, budget_minutes: float) -> dict:
    """Shrink the training config to fit `budget_minutes` (the benchmark keeps BENCH_MINUTES).

    Returns the per-stage minutes; edits `config` in place (never grows what it asks for)."""
    train_min = budget_minutes - BENCH_MINUTES
    if train_min <= 2:
        raise ValueError(
            f"--budget_minutes={budget_minutes} leaves no time to train: the benchmark alone "
            f"takes about {BENCH_MINUTES:.0f} minutes"
        )
    minutes = {"distil": 0.3 * train_min, "attention": 0.55 * train_min}
    minutes["calibration"] = train_min - minutes["distil"] - minutes["attention"]
    dc, tc = config.data, config.train
    tokens = minutes["distil"] * 60 * DISTILL_TOKENS_PER_S
    n_prompts = max(int(tokens / dc.max_new_tokens), dc.gen_batch_size)
    dc.num_prompts = min(dc.num_prompts or n_prompts, n_prompts)
    tc.steps = min(tc.steps, max(int(minutes["attention"] * 60 / TRAIN_SECONDS_PER_STEP), 1))
    tc.warmup_steps = min(tc.warmup_steps, max(tc.steps // 10, 1))
    tc.ckpt_every = min(tc.ckpt_every, max(tc.steps // 4, 1))
    return minutes


def _calibration_config(config, attention_workdir: str, minutes: float):
    c = config.copy_and_resolve_references()
    c.train.stage = "calibration"
    c.train.init_from = attention_workdir
    c.train.steps = min(
        config.train.steps, max(int(minutes * 60 / (0.5 * TRAIN_SECONDS_PER_STEP)), 1)
    )
    c.train.warmup_steps = min(c.train.warmup_steps, max(c.train.steps // 10, 1))
    return c


def retrain(workdir: str, stages: Stages, target, config_path: str, budget_minutes: float) -> str:
    """Distil, attention-tune and calibrate a draft for the embedded target; its release dir."""
    from flexdraft_jax.training import trainer

    config = load_config(config_path)
    config.train.stage = "attention"  # then calibration on the frozen drafter
    minutes = plan_retrain(config, budget_minutes)
    config.data.cache_dir = os.path.join(workdir, "distil")
    log.info(
        "retrain plan (minutes): %s; %d prompts x %d tokens, %d attention steps",
        {k: round(v, 1) for k, v in minutes.items()},
        config.data.num_prompts,
        config.data.max_new_tokens,
        config.train.steps,
    )
    cfg, params, tok = target

    def distil():
        ds = trainer.build_dataset(config, cfg, params, tok, None)
        n = int(ds.packed.loss_mask.sum())
        return {"sequences": int(len(ds.packed.lengths)), "response_tokens": n,
                "num_prompts": config.data.num_prompts}  # fmt: skip

    def train(cfg_stage, sub):
        out = trainer.train(cfg_stage, os.path.join(workdir, sub), target=target)
        last = out["history"][-1] if out["history"] else {}
        return {"steps": int(cfg_stage.train.steps), "last_metrics": last,
                "release": os.path.join(workdir, sub, "draft_release")}  # fmt: skip

    stages.run("distil", distil)
    stages.run("attention", train, config, "attention")
    calib = _calibration_config(config, os.path.join(workdir, "attention"), minutes["calibration"])
    done = stages.run("calibration", train, calib, "calibration")
    return done["release"]


def load_config(config_path: str):
    """A config file `path.py[:arg]` (ml_collections style: `get_config(arg)`)."""
    import importlib.util

    path, _, arg = config_path.partition(":")
    if not os.path.isabs(path):
        path = os.path.join(loading.REPO_ROOT, path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location("demo_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg or None)


# ----------------------------------------------------------------------------- the story


def run_demo(
    workdir: str,
    *,
    retrain_draft: bool = False,
    budget_minutes: float = 40.0,
    config_path: str = "configs/smollm2_135m.py",
    bench_overrides: dict | None = None,
    hf_baseline: bool | None = None,
    dtype: str = "auto",
    attention_impl: str = "auto",
    mesh: str | None = "auto",
) -> dict:
    """Load the embedded target, get a draft, benchmark it on each set of DEMO_SETS; returns
    {set name: its benchmark results, "demo_seconds": wall time}.

    hf_baseline: the `transformers` peer row at the set's batch sizes (None: when torch is
    installed). dtype, attention_impl, mesh: how decoding runs (`precision.DTYPES`,
    `config.ATTENTION_IMPLS`, `loading.decode_mesh`); training (--retrain) always runs in
    float32."""
    t0 = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    stages = Stages(workdir)
    log.info("loading the embedded SmolLM2-135M-Instruct")
    load_dtype = "float32" if retrain_draft else dtype
    cfg, target, tok = loading.load_target(None, dtype=load_dtype, attention_impl=attention_impl)
    if retrain_draft:
        draft_path = retrain(workdir, stages, (cfg, target, tok), config_path, budget_minutes)
        target = precision.cast_params(target, precision.decode_dtype(dtype))
    else:
        draft_path = loading.shipped_draft(None)
        if draft_path is None:
            log.warning(
                "\n%s\nNO SHIPPED DRAFT at %s: benchmarking an UNTRAINED draft (tau ~1, "
                "speculation cannot pay). Run with --retrain to train one.\n%s",
                "!" * 78, loading.SHIPPED_DRAFT, "!" * 78,
            )  # fmt: skip
    draft = loading.load_draft(draft_path, cfg, target)
    bench = {**DEMO_BENCH, **(bench_overrides or {})}
    dmesh = loading.decode_mesh(mesh, cfg, target, draft.params, batch=max(bench["batch_sizes"]))
    log.info("decoding on %s", loading.mesh_name(dmesh))
    if hf_baseline is None:  # the peer row wherever its library is installed
        hf_baseline = importlib.util.find_spec("torch") is not None
    n = bench.pop("num_prompts")
    picked = {name: _shortest(tok, name, n) for name in DEMO_SETS}
    # One KV capacity for every set: the same step programs, so the sets after the first reuse
    # its executables and its measured step costs instead of profiling the same shapes again.
    longest = max(len(p) for ids, _ in picked.values() for p in ids)
    block = draft.config.block_size
    bench["cache_len"] = bench.get("cache_len") or round_up(
        longest + bench["max_new_tokens"] + 2 * block + 1, 64
    )
    decode = dict(cfg=cfg, target=target, tok=tok, draft=draft, mesh=dmesh)
    out, profiles = {}, None
    for name, extra in DEMO_SETS.items():
        peer = tuple(b for b in extra["hf_batch_sizes"] if b in bench["batch_sizes"])
        options = dict(bench, modes=bench.get("modes") or extra["modes"])
        key = dict(
            draft=draft_path or "untrained", hf_baseline=peer if hf_baseline else (), dtype=dtype,
            attention_impl=attention_impl, mesh=loading.mesh_name(dmesh), num_prompts=n,
        )  # fmt: skip
        out[name] = _benchmark_set(workdir, stages, name, picked[name], decode, options, key,
                                   profiles)  # fmt: skip
        profiles = profiles or _profiles(workdir, name, bench["batch_sizes"])
    out["demo_seconds"] = time.perf_counter() - t0
    return out


def _shortest(tok, name: str, n: int) -> tuple[list, list[int]]:
    """The `n` shortest prompts of the set `name` as chat turns (ids), and their indices. At
    batch 64 the prefill of long prompts (padded to a power-of-two width) would take most of the
    demo's time; launch/benchmark.py takes the first n. Chat template on: SmolLM2 is an instruct
    model and its drafter is trained on chat turns."""
    all_ids = loading.encode(tok, prompts.benchmark_prompts(name), chat=True)
    pick = sorted(sorted(range(len(all_ids)), key=lambda i: len(all_ids[i]))[:n])
    ids = [all_ids[i] for i in pick]
    log.info("%s prompts %s (%s tokens)", name, pick, [len(p) for p in ids])
    return ids, pick


def _stage(name: str) -> str:
    return "benchmark" if name == "humaneval" else f"benchmark_{name}"


def _profiles(workdir: str, name: str, batch_sizes) -> dict:
    """The step costs the benchmark of set `name` measured, by batch size."""
    from flexdraft_jax.decoding.costs import CostProfile

    path = os.path.join(workdir, _stage(name), "profiles", "batch{}.json")
    return {b: CostProfile.load(path.format(b)) for b in batch_sizes}


def _benchmark_set(workdir: str, stages: Stages, name: str, picked: tuple, decode: dict,
                   options: dict, key: dict, profiles: dict | None) -> dict:  # fmt: skip
    """The benchmark of the prompts `picked` of set `name` (the stage `benchmark` for HumanEval,
    `benchmark_NAME` for another set), with the step costs `profiles` if given, or its saved
    results when the stage already ran with the same settings."""
    stage = _stage(name)
    out_dir = os.path.join(workdir, stage)
    ids, pick = picked
    key = {**{k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}, **key}
    key.update(hf_baseline=list(key["hf_baseline"]), profiles_reused=profiles is not None)
    prev = stages.done(stage)
    if prev is not None and prev.get("key") != key:
        os.remove(stages.path(stage))  # settings changed: measure again

    def run():
        timing, rest = harness.split_timing(options)
        res = harness.run_benchmark(
            decode["cfg"], decode["target"], decode["tok"], decode["draft"],
            decode["draft"].config, ids, output_dir=out_dir, hf_baseline=key["hf_baseline"],
            meta={"draft": key["draft"], "chat": True, "mesh": key["mesh"],
                  "prompts": f"{name}, the {len(ids)} shortest: {pick}",
                  "profiles": "measured" if profiles is None else "humaneval's"},
            mesh=decode["mesh"], timing=timing, profiles=profiles, **rest,
        )  # fmt: skip
        return {"key": key, "results": os.path.join(out_dir, report.RESULTS_FILE),
                "wall_seconds": res["config"]["wall_seconds"]}  # fmt: skip

    stages.run(stage, run)
    with open(os.path.join(out_dir, report.RESULTS_FILE)) as f:
        return json.load(f)
