"""Qwen3-8B target on a TPU v5p-128 slice: 64 chips, 16 hosts of 4 chips, one process per host.

configs/qwen3_8b.py with an explicit mesh for this slice and the global batch doubled to keep 16
sequences of T = 2048 per batch shard (as on 32 chips), so the schedule covers the same tokens in
half the steps. Mesh (data 2, fsdp 8, tensor 4): tensor stays inside a host (4 chips, the 8 KV
heads split in 4), fsdp spreads parameters and Adam moments over 8 hosts, and the two data
replicas each hold a full fsdp copy. Launch on every host at once with launch/pod.py:

  python launch/pod.py --tpu_name=my-v5p-128 --zone=us-east5-a \
      --config=configs/qwen3_8b_v5p128.py --workdir=/path/shared/by/all/hosts \
      --config.model.source=/data/Qwen3-8B
"""

import importlib.util
import os

import ml_collections


def _base(arg):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen3_8b.py")
    spec = importlib.util.spec_from_file_location("qwen3_8b_base", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = _base(arg)
    c.mesh.shape = (2, 8, 4)  # (data, fsdp, tensor) = 64 chips
    c.mesh.expected_devices = 64
    c.train.batch_size = 256  # 16 per (data, fsdp) shard; divisible by the 16 processes
    if arg == "runlocal":
        return c
    c.train.steps = 10000  # same tokens as qwen3_8b.py's 20000 steps of 128
    c.train.warmup_steps = 250
    c.train.ckpt_every = 500
    return c
