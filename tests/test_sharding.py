"""Sharding: the rules, pod configs fully sharded (abstractly), sharded steps equal one device,
and two processes on localhost train together and agree with one process.

Tests that need several devices run in subprocesses with
XLA_FLAGS=--xla_force_host_platform_device_count=N set before jax is imported, so the rest of
the suite keeps its single CPU device.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys

import jax
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


def test_projectors_follow_the_megatron_layout():
    """On a 2x2x2 mesh, target and draft alike: q, k, v (kernels and biases) split their output
    heads over "tensor" and o_proj its input heads, so attention runs on each device's own heads
    with no communication, every shard holding whole heads; gate/up split F over tensor and
    down_proj its input F; the vocabulary (embedding, lm_head, calibration fc2) over tensor; the
    hidden dimension of every matrix over fsdp; the layer axis and the norms are never split."""
    import jax

    from flexdraft_jax.models import transformer as tf
    from flexdraft_jax.models.config import DraftConfig, ModelConfig

    cfg = ModelConfig(arch="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8,
                      attention_bias=True)  # fmt: skip
    dcfg = DraftConfig(depth=2, block_size=4, calib_rank=16)

    def init(key):
        target = tf.init_target(cfg, key)
        return {"target": target, "draft": tf.init_draft(cfg, dcfg, target, key)}

    tree = jax.eval_shape(init, jax.random.PRNGKey(0))
    mesh = shd.abstract_mesh((2, 2, 2))
    specs = shd.param_specs(tree, mesh)
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
    got = {"/".join(shd._path_names(path)): spec for path, spec in flat}
    column, row = P(None, "fsdp", "tensor"), P(None, "tensor", "fsdp")
    want = {"target/embed/embedding": P("tensor", "fsdp"),
            "target/lm_head/kernel": P("fsdp", "tensor"), "target/final_norm/scale": P(None),
            "draft/mask_embedding": P(None), "draft/calibration/fc1/kernel": P("fsdp", None),
            "draft/calibration/fc1/bias": P(None),
            "draft/calibration/fc2/kernel": P(None, "tensor"),
            "draft/calibration/fc2/bias": P("tensor")}  # fmt: skip
    for layers in ("target/layers/attn", "draft/layers"):
        for proj in ("q_proj", "k_proj", "v_proj"):
            want[f"{layers}/{proj}/kernel"] = column
            want[f"{layers}/{proj}/bias"] = P(None, "tensor")
        want[f"{layers}/o_proj/kernel"] = row
    for proj in ("gate_proj", "up_proj"):
        want[f"target/layers/mlp/{proj}/kernel"] = column
    want["target/layers/mlp/down_proj/kernel"] = row
    for norm in ("input_norm", "post_norm"):
        want[f"target/layers/{norm}/scale"] = P(None, None)
    assert got == want
    kv = tree["target"]["layers"]["attn"]["k_proj"]["kernel"].shape[-1]  # K * D
    assert (kv // mesh.shape["tensor"]) % cfg.head_dim == 0  # whole kv heads per shard


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


# Training long enough to leave the warm-up (lr 0 at step 0: one step would compare the initial
# parameters): 6 steps, warm-up 2, then a decaying nonzero learning rate, peak LR. Adam turns a
# gradient's relative rounding difference into a parameter difference of about lr times it, and
# the calibration stage's fc1 gradients are tiny while fc2 is near its zero init, so their
# relative rounding differs most between meshes: lr 1e-3 (the default config's) keeps that
# well inside SHARD_TOL.
STEPS, WARMUP, LR = 6, 2, 1e-3

_SHARDED_TRAINING = """
import sys, jax, numpy as np
sys.path.insert(0, {root!r})
from configs import tiny
from flexdraft_jax.training import trainer
from flexdraft_jax.training.step import trainable_keys
assert jax.device_count() == 8, jax.devices()
stage, steps, warmup, tol = {stage!r}, {steps}, {warmup}, {tol}
results = {{}}
for shape in [(1, 1, 1), (2, 2, 2), (8, 1, 1), (1, 1, 8)]:
    n = int(np.prod(shape))
    c = tiny.get_config()
    c.train.steps, c.train.warmup_steps, c.train.log_every = steps, warmup, 1
    c.train.lr = {lr}
    c.train.stage = stage
    c.train.kl_weight = 0.5
    c.train.gamma = 2.0
    c.data.cache_dir = {cache!r}
    c.mesh.shape = shape
    name = "x".join(map(str, shape))
    out = trainer.train(c, {tmp!r} + "/" + name, devices=jax.devices()[:n])
    state = out["state"]
    # The trainable state is spread over the model axes (fsdp, tensor) as its moments are.
    params = jax.tree.leaves({{k: state["draft"][k] for k in trainable_keys(stage)}})
    moments = jax.tree.leaves(state["opt_state"][1][0].mu)
    assert [m.sharding.spec for m in moments] == [p.sharding.spec for p in params], name
    split = sum(p.addressable_shards[0].data.size < p.size for p in params)
    assert split > 0 if shape[1] * shape[2] > 1 else split == 0, (name, split)
    results[name] = ([h["loss"] for h in out["history"]], jax.device_get(state))
    lrs = [h["lr"] for h in out["history"]]
    assert len(lrs) == steps > warmup and lrs[0] == 0 and min(lrs[1:]) > 0, lrs
    if n == 1:
        init = jax.device_get(trainer.draft_init(
            out["cfg"], out["dcfg"], out["target"], jax.random.PRNGKey(c.seed)))
ref_losses, ref = results["1x1x1"]
# Trainable parameters moved far beyond the tolerance; the frozen ones did not (up to the
# rounding between this eager init and the trainer's jitted one).
keys = trainable_keys(stage)
for k in ref["draft"]:
    moved = max(float(np.abs(a - b).max())
                for a, b in zip(jax.tree.leaves(ref["draft"][k]), jax.tree.leaves(init[k])))
    assert (moved > 100 * tol) if k in keys else moved <= tol, (k, moved)  # (init: eager)
for name, (losses, state) in results.items():
    diffs = jax.tree_util.tree_flatten_with_path(jax.tree.map(
        lambda a, b: float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()),
        ref, state))[0]
    path, worst = max(diffs, key=lambda d: d[1])
    print(name, "losses", losses, "worst", jax.tree_util.keystr(path), worst)
    assert np.abs(np.subtract(losses, ref_losses)).max() <= tol, (name, losses, ref_losses)
    assert worst <= tol, (name, jax.tree_util.keystr(path), worst)
    n_opt = len(jax.tree.leaves(state["opt_state"]))
    assert n_opt >= 2 * len(jax.tree.leaves({{k: state["draft"][k] for k in keys}})), n_opt
print("OK")
"""


@pytest.mark.parametrize("stage", ["attention", "calibration", "joint"])
def test_sharded_training_equals_one_device(tmp_path, stage):
    """Six steps (past the warm-up, at a nonzero learning rate) on meshes 2x2x2, 8x1x1 and 1x1x8
    against one device: the losses, the draft and the optimizer state (Adam moments, counts)
    agree to SHARD_TOL, leaf by leaf; the trainable parameters moved 100x further than that
    and the frozen ones did not move; parameters and moments are sharded alike, over the model
    axes where the mesh has them."""
    code = _SHARDED_TRAINING.format(
        root=ROOT, stage=stage, cache=str(tmp_path / "distill"), tmp=str(tmp_path),
        tol=SHARD_TOL, steps=STEPS, warmup=WARMUP, lr=LR,
    )  # fmt: skip
    res = run_py(code, devices=8)
    print(res.stdout)
    assert "OK" in res.stdout, res.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(workdir, cache, mesh, extra=()):
    return [
        sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config=configs/tiny.py",
        f"--workdir={workdir}", f"--config.train.steps={STEPS}", "--config.train.log_every=1",
        f"--config.train.warmup_steps={WARMUP}", f"--config.train.lr={LR}",
        "--config.train.stage=joint", f"--config.mesh.shape={mesh}",
        "--config.data.gen_batch_size=16", f"--config.data.cache_dir={cache}", *EVAL_FLAGS,
        *extra,
    ]  # fmt: skip


# Held-out evaluation on (the tiny model has no tokenizer: random held-out prompts), sharded on
# every process and logged by process 0.
EVAL_FLAGS = (
    "--config.eval.every=2", "--config.eval.num_prompts=4", "--config.eval.max_new_tokens=12",
    "--config.eval.seq_len=64",
)  # fmt: skip


def heldout_taus(workdir) -> list[tuple[int, float]]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [(r["step"], r["heldout_tau"]) for r in recs if "heldout_tau" in r]


def final_state(workdir, like=None) -> dict:
    """The last checkpoint's {step, draft, opt_state} as host arrays; `like`: a state of the same
    tree to restore onto this process's device (a checkpoint of another topology needs one)."""
    import orbax.checkpoint as ocp

    target = None
    if like is not None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), like)
    mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")))
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
    state = mngr.restore(mngr.latest_step(), args=args)["state"]
    mngr.close()
    return jax.device_get(state)


@pytest.mark.slow  # 41 s; the default run keeps every stage sharded in one process
def test_two_processes_agree_with_one_device(tmp_path):
    """Two processes of 4 devices each (a 2x2x2 mesh, coordinated over localhost) train the joint
    stage as one process on one device does: the exported draft and the last checkpoint's whole
    state (draft, Adam moments, counts) agree to SHARD_TOL, after steps at a nonzero learning
    rate; the self-distillation and the held-out evaluation ran as one SPMD program over both
    processes and give the same responses and held-out tau."""
    from safetensors.numpy import load_file

    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = []
    for pid in range(2):
        cmd = train_cmd(
            tmp_path / "multi", tmp_path / "cache_multi", "(2,2,2)",
            [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
             f"--process_id={pid}"],
        )  # fmt: skip
        e = {**env, "XLA_FLAGS": DEVICE_FLAGS + "4"}
        procs.append(
            subprocess.Popen(cmd, env=e, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        )
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=900)
        errs.append(err.decode())
    assert all(p.returncode == 0 for p in procs), "\n\n".join(e[-4000:] for e in errs)
    assert "over 8 devices, 2 processes" in errs[0], errs[0][-4000:]
    res = subprocess.run(
        train_cmd(tmp_path / "single", tmp_path / "cache_single", "(1,1,1)"),
        env={**env, "XLA_FLAGS": DEVICE_FLAGS + "1"}, cwd=ROOT, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    assert "over 1 devices, 1 processes" in res.stderr, res.stderr[-4000:]
    with open(tmp_path / "single" / "metrics.jsonl") as f:
        lrs = [r["lr"] for r in map(json.loads, f) if "lr" in r]  # held-out records have none
    assert len(lrs) == STEPS > WARMUP and lrs[0] == 0 and min(lrs[1:]) > 0, lrs
    a = load_file(str(tmp_path / "multi" / "draft_release" / "model.safetensors"))
    b = load_file(str(tmp_path / "single" / "draft_release" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=SHARD_TOL, rtol=0, err_msg=name)
    single = final_state(tmp_path / "single")
    multi = final_state(tmp_path / "multi", like=single)
    assert int(single["step"]) == STEPS
    flat = jax.tree_util.tree_flatten_with_path(multi)[0]
    assert jax.tree.structure(multi) == jax.tree.structure(single)
    for (path, x), y in zip(flat, jax.tree.leaves(single)):
        np.testing.assert_allclose(x, y, atol=SHARD_TOL, rtol=0, err_msg=jax.tree_util.keystr(path))
    mu = single["opt_state"][1][0]["mu"]
    assert max(float(np.abs(m).max()) for m in jax.tree.leaves(mu)) > 100 * SHARD_TOL
    ca = sorted(os.listdir(tmp_path / "cache_multi"))
    cb = sorted(os.listdir(tmp_path / "cache_single"))
    assert ca == cb and len(ca) == 2  # training and held-out sets: same keys (prompts, model)
    for name in ca:  # the same responses
        assert (
            open(tmp_path / "cache_multi" / name).read()
            == open(tmp_path / "cache_single" / name).read()
        )
    multi_tau, single_tau = heldout_taus(tmp_path / "multi"), heldout_taus(tmp_path / "single")
    assert [s for s, _ in multi_tau] == list(range(2, STEPS + 1, 2)), multi_tau
    assert [s for s, _ in single_tau] == [s for s, _ in multi_tau]
    np.testing.assert_allclose([t for _, t in multi_tau], [t for _, t in single_tau], atol=1e-6)
