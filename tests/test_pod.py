"""TPU pod recipe (issue: Colab notebook and TPU pod launch recipe).

launch/pod.py --dry_run prints the exact gcloud commands: the repo shipped and installed on every
host, the same launch/train.py --distributed command on every host (--worker=all), config path and
--config.* overrides forwarded verbatim and shell-quoted; bad overrides fail locally. The pod config
shards every large parameter on its slice, and launch/train.py --distributed calls
jax.distributed.initialize() with no arguments (Cloud TPU auto-detection).
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POD = os.path.join(ROOT, "launch", "pod.py")
BASE = ["--tpu_name=my-pod", "--zone=us-east5-a"]


def dry_run(*args: str) -> list[tuple[str, list[str]]]:
    """[(step, argv)] printed by launch/pod.py --dry_run."""
    res = subprocess.run(
        [sys.executable, POD, *BASE, *args, "--dry_run"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) % 2 == 0, res.stdout
    return [(lines[i][2:], shlex.split(lines[i + 1])) for i in range(0, len(lines), 2)]


def remote(argv: list[str]) -> str:
    (command,) = [a[len("--command=") :] for a in argv if a.startswith("--command=")]
    return command


def test_dry_run_copies_installs_and_trains_on_every_host():
    steps = dry_run(
        "--project=my-proj",
        "--config=configs/qwen3_8b_v5p128.py",
        "--workdir=/mnt/shared/qwen3",
        "--config.model.source=/data/Qwen3-8B",
        "--config.mesh.shape=(2,8,4)",
        "--config.train.steps=100",
    )
    assert [s for s, _ in steps] == ["package", "copy", "install", "train"]
    cmds = dict(steps)
    assert cmds["package"] == [
        "git", "-C", ROOT, "archive", "--format=tar.gz", "--prefix=flexdraft_jax/",
        "-o", "/tmp/flexdraft_jax.tar.gz", "HEAD",
    ]  # fmt: skip
    gflags = ["--zone=us-east5-a", "--project=my-proj", "--worker=all"]
    assert cmds["copy"] == [
        "gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/flexdraft_jax.tar.gz",
        "my-pod:flexdraft_jax.tar.gz", *gflags,
    ]  # fmt: skip
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod", *gflags]
    assert cmds["install"][:-1] == ssh and cmds["train"][:-1] == ssh
    assert remote(cmds["install"]) == (
        "set -e; rm -rf ~/flexdraft_jax && tar -xzf ~/flexdraft_jax.tar.gz -C ~ && "
        'cd ~/flexdraft_jax && python3 -m pip install -q -U "jax[tpu]" -r requirements.txt && '
        "python3 -m pip install -q --no-deps -e ."
    )
    # The parenthesised override is quoted for the remote shell and arrives as one argument.
    assert remote(cmds["train"]) == (
        "cd ~/flexdraft_jax && python3 launch/train.py --distributed "
        "--config=configs/qwen3_8b_v5p128.py --workdir=/mnt/shared/qwen3 "
        "--config.model.source=/data/Qwen3-8B '--config.mesh.shape=(2,8,4)' "
        "--config.train.steps=100"
    )
    assert shlex.split(remote(cmds["train"]))[3:] == [
        "python3", "launch/train.py", "--distributed", "--config=configs/qwen3_8b_v5p128.py",
        "--workdir=/mnt/shared/qwen3", "--config.model.source=/data/Qwen3-8B",
        "--config.mesh.shape=(2,8,4)", "--config.train.steps=100",
    ]  # fmt: skip


def test_dry_run_clone_detach_stage_and_skip_setup():
    common = ["--config=configs/tiny.py:runlocal", "--workdir=/tmp/w", "--stage=calibration"]
    steps = dry_run(
        *common, "--repo_url=https://example.com/me/flexdraft_jax.git", "--ref=v1",
        "--extra_setup=huggingface-cli download X --local-dir /data/X", "--detach",
        "--config.train.init_from=/tmp/attn dir",
    )  # fmt: skip
    assert [s for s, _ in steps] == ["install", "train"]  # no local archive to copy
    install, train = (remote(a) for _, a in steps)
    assert install.startswith(
        "set -e; rm -rf ~/flexdraft_jax && git clone --depth=1 --branch=v1 "
        "https://example.com/me/flexdraft_jax.git ~/flexdraft_jax && cd ~/flexdraft_jax && "
    )
    assert install.endswith(" && huggingface-cli download X --local-dir /data/X")
    assert "--project" not in " ".join(steps[0][1])
    assert train == (
        "cd ~/flexdraft_jax && nohup python3 launch/train.py --distributed "
        "--config=configs/tiny.py:runlocal --workdir=/tmp/w --stage=calibration "
        "'--config.train.init_from=/tmp/attn dir' > ~/flexdraft_train.log 2>&1 < /dev/null &"
    )
    steps = dry_run(*common, "--skip_setup")
    assert [s for s, _ in steps] == ["train"]


@pytest.mark.parametrize("job", ["generate", "benchmark"])
def test_dry_run_starts_a_sharded_decode_job_on_every_host(job):
    """--job=generate|benchmark: the same launch/JOB.py --distributed on every host, with the
    arguments after `--` (the mesh among them) forwarded verbatim and quoted."""
    res = subprocess.run(
        [sys.executable, POD, *BASE, f"--job={job}", "--dry_run", "--",
         "--checkpoint=/data/Qwen3-8B", "--mesh=data:1,tensor:8", "--prompt", "Hello there"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    steps = [(lines[i][2:], shlex.split(lines[i + 1])) for i in range(0, len(lines), 2)]
    assert [s for s, _ in steps] == ["package", "copy", "install", job]
    argv = dict(steps)[job]
    assert "--worker=all" in argv
    assert shlex.split(remote(argv)) == [
        "cd", "~/flexdraft_jax", "&&", "python3", f"launch/{job}.py", "--distributed",
        "--checkpoint=/data/Qwen3-8B", "--mesh=data:1,tensor:8", "--prompt", "Hello there",
    ]  # fmt: skip
    bad = subprocess.run(
        [sys.executable, POD, *BASE, f"--job={job}", "--config=configs/tiny.py", "--dry_run"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode != 0 and "--config is for --job=train" in bad.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config=configs/tiny.py", "--workdir=w", "--config.train.no_such_field=1"], "no_such"),
        (["--config=configs/tiny.py", "--config.train.steps=3"], "workdir"),
        (["--workdir=w"], "config"),
    ],
)
def test_bad_invocations_fail_before_launching(args, message):
    res = subprocess.run(
        [sys.executable, POD, *BASE, *args, "--dry_run"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode != 0 and message in res.stderr
    assert "gcloud" not in res.stdout


def test_overrides_need_equals_and_configs_inside_the_repo(tmp_path):
    spec = importlib.util.spec_from_file_location("pod", POD)
    pod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pod)
    argv = ["--config=c.py", "--config.a=1", "--x=2", "--noconfig.b", "--config.c"]
    assert pod.config_overrides(argv) == ["--config.a=1", "--noconfig.b", "--config.c"]
    with pytest.raises(ValueError, match="--config.a=VALUE"):
        pod.config_overrides(["--config.a", "1"])
    assert pod.repo_relative(os.path.join(ROOT, "configs", "tiny.py:runlocal")) == (
        "configs/tiny.py:runlocal"
    )
    with pytest.raises(ValueError, match="outside the repository"):
        pod.repo_relative(str(tmp_path / "mine.py"))


def test_pod_config_fits_its_slice():
    from flexdraft_jax.training import trainer

    spec = importlib.util.spec_from_file_location(
        "pod_cfg", os.path.join(ROOT, "configs", "qwen3_8b_v5p128.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(None)
    data, fsdp, tensor = c.mesh.shape
    assert data * fsdp * tensor == c.mesh.expected_devices == 64
    hosts = 64 // 4  # v5p: 4 chips per host, one process each
    assert c.train.batch_size % (data * fsdp) == 0 and c.train.batch_size % hosts == 0
    assert c.model.tiny["num_kv_heads"] % tensor == 0
    assert trainer.check_config_sharding(c) == []
    assert mod.get_config("runlocal").train.steps < c.train.steps


def test_train_launcher_distributed_autodetects():
    """--distributed -> jax.distributed.initialize() with no arguments, before training."""
    code = f"""
import runpy, sys
import jax
def init(*args, **kw):
    print("INIT", args, kw, flush=True)
    raise SystemExit(0)
jax.distributed.initialize = init
sys.argv = ["train.py", "--distributed", "--config=configs/tiny.py", "--workdir=/nonexistent/w"]
runpy.run_path({os.path.join(ROOT, "launch", "train.py")!r}, run_name="__main__")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "INIT () {}" in res.stdout
