"""Pod-size evidence without a pod: the sharded decode step of each config, exported for TPU on an
abstract mesh, and what each device holds (no weight is allocated; runs on a laptop CPU).

  python launch/pod_plan.py                        Qwen3-8B and Llama-3.1-8B, flex, batch 8,
                                                   block 16, cache 4096, bfloat16, 8 devices
  python launch/pod_plan.py --meshes=data:1,tensor:8 --meshes=data:2,tensor:4 \
      --export_dir=/tmp/pod_plan                    also write each serialized jax.export artifact

Prints a markdown table (the README's pod section) and, with --output_json, the rows as JSON.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

from absl import app, flags, logging

from flexdraft_jax import sharding as shd
from flexdraft_jax.decoding import engine, pod_plan
from flexdraft_jax.models.config import DraftConfig, ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F = flags.FLAGS
flags.DEFINE_list("configs", ["configs/qwen3_8b.py", "configs/llama3_8b.py"], "Config files.")
flags.DEFINE_multi_string("meshes", ["data:1,tensor:8"], "Abstract meshes (data:D,tensor:T).")
flags.DEFINE_integer("batch", 8, "Sequences per step.", lower_bound=1)
flags.DEFINE_integer("block_size", 16, "Draft block size.", lower_bound=2)
flags.DEFINE_integer("cache_len", 4096, "KV cache slots per sequence.", lower_bound=32)
flags.DEFINE_string("dtype", "bfloat16", "Weights and KV cache dtype.")
flags.DEFINE_enum("mode", "flex", engine.MODES, "Decoding mode of the exported step.")
flags.DEFINE_list("platforms", ["tpu"], "jax.export platforms (empty: count bytes only).")
flags.DEFINE_float("device_gib", 16.0, "Memory per device to check against (v5e: 16 GiB).")
flags.DEFINE_string("export_dir", None, "Write each serialized export here.")
flags.DEFINE_string("output_json", None, "Write the rows here.")


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(None)


def main(_):
    rows, records = [], []
    for path in F.configs:
        c = load_config(path)
        cfg = ModelConfig(**dict(c.model.tiny))
        dcfg = DraftConfig(c.draft.depth, F.block_size, c.draft.calib_rank)
        name = os.path.splitext(os.path.basename(path))[0]
        for spec in F.meshes:
            t0 = time.perf_counter()
            p = pod_plan.plan(
                cfg, dcfg, shd.parse_mesh(spec), batch=F.batch, cache_len=F.cache_len,
                dtype=F.dtype, mode=F.mode, platforms=tuple(F.platforms) or None,
            )  # fmt: skip
            seconds = time.perf_counter() - t0
            rec = {"config": name, **p.row(), "fits": p.per_device <= F.device_gib * 2**30}
            if p.exported is not None:
                module = p.exported.mlir_module()
                rec.update(
                    platforms=list(p.exported.platforms),
                    devices=p.exported.nr_devices,
                    stablehlo_bytes=len(module),
                    pallas_kernel="tpu_custom_call" in module,
                    export_seconds=seconds,
                )
                if F.export_dir:
                    os.makedirs(F.export_dir, exist_ok=True)
                    tag = spec.replace(":", "").replace(",", "_")
                    out = os.path.join(F.export_dir, f"{name}_{tag}.bin")
                    with open(out, "wb") as f:
                        f.write(p.exported.serialize())
                    rec["artifact"] = out
            logging.info("%s", rec)
            rows.append((name, p))
            records.append(rec)
    print(pod_plan.format_table(rows))
    for r in records:
        if "platforms" in r:
            print(
                f"{r['config']} on {r['mesh']}: step ({F.mode}) exported for {r['platforms']} on "
                f"{r['devices']} devices in {r['export_seconds']:.0f}s, "
                f"{r['stablehlo_bytes'] / 1e6:.1f} MB StableHLO, Pallas TPU kernel: "
                f"{r['pallas_kernel']}; fits {F.device_gib:g} GiB: {r['fits']}"
            )
    if F.output_json:
        with open(F.output_json, "w") as f:
            json.dump(records, f, indent=1)
    if not all(r["fits"] for r in records):
        sys.exit(f"a device's share exceeds {F.device_gib} GiB")


if __name__ == "__main__":
    app.run(main)
