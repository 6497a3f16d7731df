"""The accelerator check: what one lent GPU or TPU should measure, in one command.

`run_check(config, output_dir)` runs these sections in order, each guarded (an exception is
recorded with its traceback and the next section runs) and each within its share of the time:

  kernels     the Pallas attention kernel on the device against the jnp reference, forward and
              backward, float32 and bfloat16 (`kernel_check`)
  decoding    the embedded SmolLM2-135M with the shipped draft, every mode, batch 1 to 64
              (`decode_check`; skipped when the weights are not installed)
  step_costs  every branch of the compiled step on random-weight SmolLM2-135M, Qwen3-1.7B and
              Qwen3-8B shapes, batch 1 to 256, Pallas and XLA attention (`step_costs`)
  train       with `train_minutes`: self-distil and train the SmolLM2 drafter, export it in the
              release layout in files of at most 16 MiB (`device_train`)

Under `output_dir` it writes accelerator_check.json (rewritten atomically after every section, so
a run cut short keeps what it finished), accelerator_check.md (the tables), accelerator_check.png
(step costs, decoding speedups) and with training draft_release/ (5 files): 8 files at most, what
one device call brings back. Scratch (benchmark files, training checkpoints,
the distillation cache) goes to `work_dir` (default: DEFAULT_WORK_DIR).
`CheckConfig.dry_run()` is the same check at CPU sizes (tests/test_accelerator_check.py).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback

import jax

from flexdraft_jax.bench import accelerator_report as report
from flexdraft_jax.bench.kernel_check import HeadShape, KernelPlan, check_kernels
from flexdraft_jax.bench.step_costs import StepCostPlan, TargetShape, measure_step_costs
from flexdraft_jax.common import write_json_atomic
from flexdraft_jax.models.config import ModelConfig
from flexdraft_jax.recipes.decode_check import DecodePlan, Unavailable, check_decoding
from flexdraft_jax.recipes.device_train import TrainPlan, train_on_device

log = logging.getLogger(__name__)

SECTIONS = ("kernels", "decoding", "step_costs", "train")
RECORD_FILE = "accelerator_check.json"
# Scratch outside the output folder, which a device call brings back (8 files at most); stable, so
# a rerun on a warm machine finds its distillation cache.
DEFAULT_WORK_DIR = os.path.join(tempfile.gettempdir(), "flexdraft_accelerator_check")


@dataclasses.dataclass(frozen=True)
class CheckConfig:
    """What the check runs and how long each part may take. The step costs take whatever time
    the budget has left after the kernels and decoding (their seconds are upper bounds); training
    runs after the budget, for `train_minutes` of its own."""

    sections: tuple[str, ...] = ("kernels", "decoding", "step_costs")
    budget_seconds: float = 420.0  # 8 minutes on the device, less start-up and writing
    kernel_seconds: float = 60.0  # ~30 cases, each a Triton/Mosaic compilation
    decoding_seconds: float = 150.0  # batch 1 and 16 first
    kernels: KernelPlan = KernelPlan()
    decoding: DecodePlan = DecodePlan()
    steps: StepCostPlan = StepCostPlan()
    train: TrainPlan = TrainPlan()
    train_minutes: float = 0.0

    def __post_init__(self):
        unknown = sorted(set(self.sections) - set(SECTIONS))
        if unknown:
            raise ValueError(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
        if "train" in self.sections and self.train_minutes <= 0:
            raise ValueError("the train section needs train_minutes > 0")
        if self.budget_seconds <= 0:
            raise ValueError(f"budget_seconds must be > 0, got {self.budget_seconds}")

    @classmethod
    def dry_run(cls, sections=SECTIONS, train_minutes: float = 0.1) -> CheckConfig:
        """Every section at CPU sizes: tiny models, one batch size, both attention implementations
        (Pallas in its interpreter), training on the tiny config until `train_minutes` stops it
        (the planned schedule is far longer), its export cut into 8 KiB files."""
        tiny = ModelConfig(
            arch="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
            num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True,
        )  # fmt: skip
        return cls(
            sections=tuple(sections),
            budget_seconds=600.0,
            kernel_seconds=120.0,
            decoding_seconds=240.0,
            kernels=KernelPlan(
                heads=(HeadShape("tiny", 4, 2, 16),),
                layouts=("parallel", "training"),
                grad_layouts=("training",),
                timed_shapes=("tiny",),
                timed_layouts=("parallel",),
                batch=2,
                block_size=4,
                rows=4,
                cache=64,
                prompt=16,
                seq_len=32,
                anchors=3,
                timing_iters=1,
            ),
            decoding=DecodePlan(
                target="tiny",
                batch_sizes=(2,),
                modes=("ar", "flex"),
                max_new_tokens=8,
                prompts=4,
                min_prompts_per_batch=2,
                dtype="float32",
                repeats=1,
                profile_repeats=1,
                profile_seconds=0.5,
            ),
            steps=StepCostPlan(
                shapes=(TargetShape("tiny", tiny, 1),),
                batch_sizes=(2,),
                impls=("xla", "pallas"),
                block_size=2,
                cache_len=64,
                draft_vocab=16,
                dtype="float32",
                repeats=2,
                max_seconds=0.5,
                workers=2,
            ),
            train=TrainPlan(
                config="configs/tiny.py",
                data_scale=1.0,
                batch_size=8,
                gen_batch_size=64,
                seconds_per_step=0.005,
                max_file_bytes=8 * 1024,
            ),
            train_minutes=train_minutes if "train" in sections else 0.0,
        )


@dataclasses.dataclass
class SectionRecord:
    name: str
    status: str  # "ok", "partial" (something inside skipped or failed), "failed" or "skipped"
    seconds: float
    reason: str = ""  # why it failed or was skipped
    traceback: str = ""
    result: dict | None = None


def device_info() -> dict:
    devices = jax.devices()
    stats = devices[0].memory_stats() or {}
    info = {
        "platform": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "memory_gib": stats.get("bytes_limit", 0) / 2**30 or None,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "host": platform.machine(),
        "host_cores": os.cpu_count(),
    }
    try:  # the commit checked, where the tree carries its git metadata
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=os.path.dirname(os.path.abspath(__file__)), check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def _status(result: dict) -> str:
    """ "partial" when the section skipped or failed part of its work, else "ok"."""
    inner = list(result.get("skipped") or []) + list(result.get("failed") or [])
    inner += [r for r in result.get("results", []) if r.get("status") != "measured"]
    if result.get("all_ok") is False:
        return "partial"
    return "partial" if inner else "ok"


def _run_section(name: str, fn) -> SectionRecord:
    t0 = time.perf_counter()
    log.info("section %s: starting", name)
    try:
        result = fn()
    except Unavailable as e:
        rec = SectionRecord(name, "skipped", time.perf_counter() - t0, reason=str(e))
    except Exception as e:  # recorded; the check goes on with the next section
        rec = SectionRecord(
            name, "failed", time.perf_counter() - t0, reason=f"{type(e).__name__}: {e}"[:4000],
            traceback=traceback.format_exc()[-8000:],
        )  # fmt: skip
    else:
        rec = SectionRecord(name, _status(result), time.perf_counter() - t0, result=result)
    log.info("section %s: %s in %.0fs %s", name, rec.status, rec.seconds, rec.reason[:300])
    return rec


def run_check(config: CheckConfig, output_dir: str, work_dir: str | None = None) -> dict:
    """Run the configured sections; returns the record (also written under `output_dir`)."""
    t_start = time.perf_counter()
    deadline = t_start + config.budget_seconds
    work_dir = work_dir or DEFAULT_WORK_DIR
    os.makedirs(output_dir, exist_ok=True)
    os.makedirs(work_dir, exist_ok=True)
    say = lambda msg: log.info("%s", msg)  # noqa: E731
    record = {
        "check": "flexdraft_jax accelerator check",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(),
        "argv": sys.argv,
        "config": _config_record(config),
        "work_dir": work_dir,
        "sections": {},
    }
    log.info("device: %s", record["device"])

    def section_deadline(seconds: float) -> float:
        return min(time.perf_counter() + seconds, deadline)

    runs = {
        "kernels": lambda: check_kernels(
            config.kernels, section_deadline(config.kernel_seconds), log=say
        ),
        "decoding": lambda: check_decoding(
            config.decoding,
            os.path.join(work_dir, "decoding"),
            section_deadline(config.decoding_seconds),
            log=say,
        ),  # fmt: skip
        "step_costs": lambda: measure_step_costs(config.steps, deadline, log=say),
        "train": lambda: train_on_device(
            config.train, config.train_minutes, work_dir, output_dir, log=say
        ),
    }
    for name in SECTIONS:
        if name not in config.sections:
            continue
        if name != "train" and time.perf_counter() > deadline:
            rec = SectionRecord(name, "skipped", 0.0, reason="the check's time budget ran out")
        else:
            rec = _run_section(name, runs[name])
        record["sections"][name] = dataclasses.asdict(rec)
        record["summary"] = _summary(record)
        record["wall_seconds"] = time.perf_counter() - t_start
        write_json_atomic(os.path.join(output_dir, RECORD_FILE), record)
    record["outputs"] = report.write_outputs(record, output_dir)
    record["wall_seconds"] = time.perf_counter() - t_start
    write_json_atomic(os.path.join(output_dir, RECORD_FILE), record)
    return record


def _summary(record: dict) -> dict:
    try:
        return report.summary(record)
    except Exception as e:  # a malformed section result must not cost the record
        return {"error": f"{type(e).__name__}: {e}"}


def _config_record(config: CheckConfig) -> dict:
    rec = dataclasses.asdict(config)
    rec["steps"]["shapes"] = [
        {"name": s.name, "depth": s.depth, "model": repr(s.cfg)} for s in config.steps.shapes
    ]
    return rec
