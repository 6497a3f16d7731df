"""Train, decode or benchmark on a Cloud TPU pod slice: install the repo on every host, start the
same job on all.

  python launch/pod.py --tpu_name=my-v5p-128 --zone=us-east5-a --project=my-project \
      --config=configs/qwen3_8b_v5p128.py --workdir=/shared/qwen3_attn \
      --config.model.source=/data/Qwen3-8B --config.train.steps=5000 --dry_run
  python launch/pod.py --tpu_name=my-v5e-8 --zone=us-west4-a --job=generate --dry_run -- \
      --checkpoint=/data/Qwen3-8B --draft_checkpoint=/shared/qwen3_attn --mesh=data:1,tensor:8 \
      --prompts_file=/data/prompts.jsonl --output_json=/shared/out.json

Steps, each one command run from this machine (`--dry_run` prints them and runs nothing):

  package  git archive of this repository's committed HEAD (or, with --repo_url, nothing: every
           host clones the repository itself)
  copy     gcloud compute tpus tpu-vm scp of that archive to every host (--worker=all)
  install  on every host: unpack (or clone), pip install jax[tpu] + requirements + the package
  train    on every host: python3 launch/train.py --distributed --config=... --workdir=...
           (--job=generate / benchmark: python3 launch/generate.py or launch/benchmark.py
           --distributed, then every argument after `--`, e.g. --mesh=data:1,tensor:8: one SPMD
           decode over the slice's chips, the same prompts on every host)

`--distributed` makes launch/train.py call `jax.distributed.initialize()` with no arguments, which
auto-detects the pod's coordinator, process count and process index on Cloud TPU; every host runs
the same command. Every `--config.*` override given here is checked against the config file
locally (a typo fails before anything is launched) and forwarded verbatim. `--skip_setup` reruns
only the train step (e.g. to resume from the workdir's checkpoints).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from absl import app, flags, logging
from ml_collections import config_flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TPU = flags.DEFINE_string("tpu_name", None, "Name of the TPU VM (pod slice).")
_ZONE = flags.DEFINE_string("zone", None, "Zone of the TPU VM, e.g. us-east5-a.")
_PROJECT = flags.DEFINE_string("project", None, "GCP project (default: gcloud's configured one).")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file in this repo.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Training workdir, the same path on every host (see launch/train.py)."
)
_JOB = flags.DEFINE_enum(
    "job", "train", ["train", "generate", "benchmark"],
    "What every host runs: launch/JOB.py --distributed (generate / benchmark: with the arguments "
    "given after `--`).",
)  # fmt: skip
_STAGE = flags.DEFINE_enum(
    "stage", None, ["attention", "calibration", "joint"], "Forwarded to launch/train.py."
)
_REPO_URL = flags.DEFINE_string(
    "repo_url", None, "Clone this git URL on every host instead of copying the local HEAD."
)
_REF = flags.DEFINE_string("ref", "main", "Branch or tag to clone with --repo_url.")
_REMOTE_DIR = flags.DEFINE_string("remote_dir", "flexdraft_jax", "Checkout dir under ~ on hosts.")
_TARBALL = flags.DEFINE_string("tarball", "/tmp/flexdraft_jax.tar.gz", "Local archive of the repo.")
_PYTHON = flags.DEFINE_string("python", "python3", "Python interpreter on the hosts.")
_EXTRA_SETUP = flags.DEFINE_string(
    "extra_setup",
    None,
    "Shell run on every host after the install, in the checkout (e.g. fetch the target: "
    "'huggingface-cli download Qwen/Qwen3-8B --local-dir /data/Qwen3-8B').",
)
_SKIP_SETUP = flags.DEFINE_bool("skip_setup", False, "Only the train step.")
_DETACH = flags.DEFINE_bool(
    "detach", False, "Run training under nohup (log: ~/flexdraft_train.log) and return."
)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands; run nothing.")
flags.mark_flags_as_required(["tpu_name", "zone"])

LOG_FILE = "flexdraft_train.log"  # flexdraft_{job}.log


def config_overrides(argv: list[str]) -> list[str]:
    """The `--config.*` (and `--noconfig.*`) arguments of `argv`, verbatim and in order."""
    out = []
    for i, arg in enumerate(argv):
        if not arg.startswith(("--config.", "--noconfig.")):
            continue
        if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            raise ValueError(f"write {arg}=VALUE (with '='), got {arg} {argv[i + 1]}")
        out.append(arg)
    return out


def repo_relative(path: str) -> str:
    """A config path (`file.py[:arg]`) relative to the repo root, as the hosts will see it."""
    file, sep, arg = path.partition(":")
    rel = os.path.relpath(os.path.abspath(file), REPO_ROOT)
    if rel.startswith(".."):
        raise ValueError(
            f"config {file} is outside the repository {REPO_ROOT}; hosts cannot see it"
        )
    return rel + sep + arg


def gcloud(verb: str, zone: str, project: str | None, *args: str, command: str | None = None):
    """`gcloud compute tpus tpu-vm VERB ARGS --zone --project --worker=all [--command]`."""
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, f"--zone={zone}"]
    if project:
        cmd.append(f"--project={project}")
    cmd.append("--worker=all")
    return cmd + ([f"--command={command}"] if command is not None else [])


def build_commands(
    *,
    tpu_name: str,
    zone: str,
    config: str | None = None,
    workdir: str | None = None,
    overrides: list[str] = (),
    job: str = "train",
    job_args: list[str] = (),
    project: str | None = None,
    stage: str | None = None,
    repo_url: str | None = None,
    ref: str = "main",
    remote_dir: str = "flexdraft_jax",
    tarball: str = "/tmp/flexdraft_jax.tar.gz",
    python: str = "python3",
    extra_setup: str | None = None,
    skip_setup: bool = False,
    detach: bool = False,
) -> list[tuple[str, list[str]]]:
    """[(step name, argv)] to run in order on this machine. Remote shell commands are single
    strings whose every argument is shell-quoted (overrides may hold spaces, parentheses...)."""
    q = shlex.quote
    home_dir = f"~/{q(remote_dir)}"
    ssh = lambda command: gcloud("ssh", zone, project, tpu_name, command=command)
    steps = []
    if not skip_setup:
        if repo_url:
            clone = f"git clone --depth=1 --branch={q(ref)} {q(repo_url)} {home_dir}"
            fetch = f"rm -rf {home_dir} && {clone}"
        else:
            archive = os.path.basename(tarball)
            steps.append(
                ("package", ["git", "-C", REPO_ROOT, "archive", "--format=tar.gz",
                             f"--prefix={remote_dir}/", "-o", tarball, "HEAD"])
            )  # fmt: skip
            steps.append(("copy", gcloud("scp", zone, project, tarball, f"{tpu_name}:{archive}")))
            fetch = f"rm -rf {home_dir} && tar -xzf ~/{q(archive)} -C ~"
        install = (
            f"set -e; {fetch} && cd {home_dir} && "
            f'{q(python)} -m pip install -q -U "jax[tpu]" -r requirements.txt && '
            f"{q(python)} -m pip install -q --no-deps -e ."
        )
        if extra_setup:
            install += f" && {extra_setup}"
        steps.append(("install", ssh(install)))
    if job == "train":
        run = [python, "launch/train.py", "--distributed", f"--config={config}"]
        run += [f"--workdir={workdir}", *([f"--stage={stage}"] if stage else []), *overrides]
    else:  # a decode or benchmark job: one SPMD program over every host's chips
        run = [python, f"launch/{job}.py", "--distributed", *job_args]
    run_sh = " ".join(q(a) for a in run)
    if detach:
        log = LOG_FILE if job == "train" else f"flexdraft_{job}.log"
        run_sh = f"nohup {run_sh} > ~/{log} 2>&1 < /dev/null &"
    steps.append((job, ssh(f"cd {home_dir} && {run_sh}")))
    return steps


def main(argv):
    job_args = argv[1:]  # after `--`
    if _JOB.value == "train":
        for flag in ("config", "workdir"):
            if flags.FLAGS[flag].value is None:
                raise app.UsageError(f"--{flag} is required for --job=train")
        if job_args:
            raise app.UsageError(f"--job=train takes no arguments after --, got {job_args}")
    elif flags.FLAGS["config"].value is not None:
        raise app.UsageError(f"--config is for --job=train; give {_JOB.value}'s flags after --")
    if _WORKDIR.value and _WORKDIR.value.startswith("gs://"):
        logging.warning(
            "workdir %s: the trainer writes with os/open, so a gs:// path is not supported yet; "
            "use a directory every host shares (e.g. a gcsfuse mount of the bucket)",
            _WORKDIR.value,
        )
    steps = build_commands(
        tpu_name=_TPU.value,
        zone=_ZONE.value,
        config=repo_relative(config_flags.get_config_filename(flags.FLAGS["config"]))
        if _JOB.value == "train"
        else None,
        workdir=_WORKDIR.value,
        overrides=config_overrides(sys.argv[1:]) if _JOB.value == "train" else [],
        job=_JOB.value,
        job_args=job_args,
        project=_PROJECT.value,
        stage=_STAGE.value,
        repo_url=_REPO_URL.value,
        ref=_REF.value,
        remote_dir=_REMOTE_DIR.value,
        tarball=_TARBALL.value,
        python=_PYTHON.value,
        extra_setup=_EXTRA_SETUP.value,
        skip_setup=_SKIP_SETUP.value,
        detach=_DETACH.value,
    )
    for name, cmd in steps:
        if name == "package" and not _DRY_RUN.value:
            dirty = subprocess.run(
                ["git", "-C", REPO_ROOT, "status", "--porcelain", "--untracked-files=no"],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            if dirty.strip():
                logging.warning(
                    "uncommitted changes are NOT shipped (git archive HEAD):\n%s", dirty
                )
        if _DRY_RUN.value:
            print(f"# {name}\n{shlex.join(cmd)}")
            continue
        logging.info("step %s: %s", name, shlex.join(cmd))
        subprocess.run(cmd, check=True)
    if _DETACH.value and not _DRY_RUN.value:
        log = LOG_FILE if _JOB.value == "train" else f"flexdraft_{_JOB.value}.log"
        logging.info("%s runs in the background; logs: ~/%s on each host", _JOB.value, log)


if __name__ == "__main__":
    app.run(main)
