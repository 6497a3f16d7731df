"""Sharding: the rules, pod configs fully sharded (abstractly), sharded steps equal one device,
and two processes on localhost train together and agree with one process.

Tests that need several devices run in subprocesses with
XLA_FLAGS=--xla_force_host_platform_device_count=N set before jax is imported, so the rest of
the suite keeps its single CPU device.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from flexdraft_jax import sharding as shd
from flexdraft_jax.training import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD_TOL = 1e-5  # sharded vs one device: reduction order differs


def load_config(name: str, arg=None):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def test_rules_and_fallback():
    mesh = shd.abstract_mesh((2, 4, 2))
    assert shd.logical_axes(("embed", "embedding"), (96, 32)) == (shd.VOCAB, shd.EMBED)
    assert shd.logical_axes(("layers", "attn", "q_proj", "kernel"), (4, 32, 32))[0] == shd.LAYERS
    assert shd.spec_for((shd.VOCAB, shd.EMBED), (96, 32), mesh) == P("tensor", "fsdp")
    assert shd.spec_for((shd.VOCAB, shd.EMBED), (97, 30), mesh) == P(None, None)  # no divide
    assert shd.spec_for(("batch", None), (16, 5), mesh) == P(("data", "fsdp"), None)
    with pytest.raises(ValueError, match="no logical axes"):
        shd.logical_axes(("mystery", "kernel"), (3, 3))
    with pytest.raises(ValueError, match="devices"):
        shd.resolve_mesh_shape((3, -1, 1), 8)


@pytest.mark.parametrize("name", ["qwen3_8b", "llama3_8b"])
@pytest.mark.parametrize("stage", ["attention", "joint"])
def test_pod_configs_shard_every_large_param(name, stage):
    config = load_config(name)
    config.train.stage = stage
    assert config.mesh.expected_devices > 1
    assert trainer.check_config_sharding(config) == []
    # The check does catch replicated params: on one device everything large is replicated.
    config.mesh.shape, config.mesh.expected_devices = (1, 1, 1), 1
    bad = trainer.check_config_sharding(config)
    assert any(b.startswith("embed/embedding") for b in bad) and any("adam" in b for b in bad)


# ----------------------------------------------------------------------------- multi-device

DEVICE_FLAGS = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count="


def run_py(code: str, devices: int, env_extra=None, timeout=900):
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": DEVICE_FLAGS + f"{devices}",
        **(env_extra or {}),
    }
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    if res.returncode:
        raise AssertionError(f"subprocess failed:\n{res.stderr[-5000:]}")
    return res


_SHARDED_STEP = """
import sys, jax, numpy as np
sys.path.insert(0, {root!r})
from configs import tiny
from flexdraft_jax.training import trainer
assert jax.device_count() == 8, jax.devices()
results = {{}}
for shape, n in [((1, 1, 1), 1), ((2, 2, 2), 8), ((8, 1, 1), 8)]:
    c = tiny.get_config()
    c.train.steps = 1
    c.train.stage = {stage!r}
    c.train.kl_weight = 0.5
    c.train.gamma = 2.0
    c.data.cache_dir = {cache!r}
    c.mesh.shape = shape
    name = "x".join(map(str, shape))
    out = trainer.train(c, {tmp!r} + "/" + name, devices=jax.devices()[:n])
    leaves = [np.asarray(x) for x in jax.tree.leaves(out["state"]["draft"])]
    results[name] = (out["history"][-1]["loss"], leaves)
ref_loss, ref = results["1x1x1"]
for name, (loss, leaves) in results.items():
    err = max(float(np.abs(a - b).max()) for a, b in zip(ref, leaves))
    print(name, loss, ref_loss, err)
    assert abs(loss - ref_loss) <= {tol}, (name, loss, ref_loss)
    assert err <= {tol}, (name, err)
print("OK")
"""


@pytest.mark.parametrize("stage", ["joint"])
def test_sharded_step_equals_one_device(tmp_path, stage):
    code = _SHARDED_STEP.format(
        root=ROOT, stage=stage, cache=str(tmp_path / "distill"), tmp=str(tmp_path), tol=SHARD_TOL
    )
    res = run_py(code, devices=8)
    assert "OK" in res.stdout, res.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(workdir, cache, extra=()):
    return [
        sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config=configs/tiny.py",
        f"--workdir={workdir}", "--config.train.steps=3", "--config.train.log_every=1",
        "--config.mesh.shape=(2,2,2)", "--config.data.gen_batch_size=16",
        f"--config.data.cache_dir={cache}", *EVAL_FLAGS, *extra,
    ]  # fmt: skip


# Held-out evaluation on (the tiny model has no tokenizer: random held-out prompts), sharded on
# every process and logged by process 0.
EVAL_FLAGS = (
    "--config.eval.every=2", "--config.eval.num_prompts=4", "--config.eval.max_new_tokens=12",
    "--config.eval.seq_len=64",
)  # fmt: skip


def heldout_taus(workdir) -> list[tuple[int, float]]:
    import json

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [(r["step"], r["heldout_tau"]) for r in recs if "heldout_tau" in r]


def test_two_processes_agree_with_one(tmp_path):
    from safetensors.numpy import load_file

    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = []
    for pid in range(2):
        cmd = train_cmd(
            tmp_path / "multi",
            tmp_path / "cache_multi",
            [
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={pid}",
            ],
        )
        e = {
            **env,
            "XLA_FLAGS": DEVICE_FLAGS + "4",
        }
        procs.append(
            subprocess.Popen(cmd, env=e, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        )
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=900)
        errs.append(err.decode())
    assert all(p.returncode == 0 for p in procs), "\n\n".join(e[-4000:] for e in errs)
    assert "over 8 devices, 2 processes" in errs[0], errs[0][-4000:]
    # The self-distillation ran as one SPMD program over both processes' devices.
    single_env = {
        **env,
        "XLA_FLAGS": DEVICE_FLAGS + "8",
    }
    res = subprocess.run(
        train_cmd(tmp_path / "single", tmp_path / "cache_single"),
        env=single_env, cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    a = load_file(str(tmp_path / "multi" / "draft_release" / "model.safetensors"))
    b = load_file(str(tmp_path / "single" / "draft_release" / "model.safetensors"))
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=SHARD_TOL, rtol=0, err_msg=name)
    ca = sorted(os.listdir(tmp_path / "cache_multi"))
    cb = sorted(os.listdir(tmp_path / "cache_single"))
    assert ca == cb and len(ca) == 2  # training and held-out sets: same keys (prompts, model)
    for name in ca:  # the same responses
        assert (
            open(tmp_path / "cache_multi" / name).read()
            == open(tmp_path / "cache_single" / name).read()
        )
    # Held-out tau after steps 2 and 3 (the last), the same as one process's.
    multi, single = heldout_taus(tmp_path / "multi"), heldout_taus(tmp_path / "single")
    assert [s for s, _ in multi] == [2, 3], multi
    np.testing.assert_allclose([t for _, t in multi], [t for _, t in single], atol=1e-6)
