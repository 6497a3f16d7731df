"""Pod-size evidence without a pod (issue: sharded decoding, item 4).

For the 8B pod configs the sharded flex decode step (batch 8, block 16, cache 4096, bfloat16) is
exported with `jax.export` for TPU on an abstract mesh of 8 devices, no weight allocated: it
lowers with the Pallas TPU kernel inside, its cache input is split over the kv heads, and each
device's share of parameters, draft and KV cache (from the shardings) fits a 16 GiB chip while the
whole does not.
"""

from __future__ import annotations

import pytest

from flexdraft_jax.decoding import pod_plan
from flexdraft_jax.models.config import DraftConfig, ModelConfig
from tests.test_sharding import load_config

GIB = 2**30


def arg_attrs(module: str, name: str) -> str:
    """The attributes of the exported main function's argument named `name` (its loc)."""
    sig = module[module.index("func.func public @main(") :]
    sig = sig[: sig.index(") -> (")]
    (arg,) = [a for a in sig.split(", %arg") if f'loc("{name}")' in a]
    return arg


@pytest.mark.parametrize("name", ["qwen3_8b", "llama3_8b"])
def test_8b_decode_step_lowers_for_tpu_and_fits_16gib_per_device(name):
    c = load_config(name)
    cfg = ModelConfig(**dict(c.model.tiny))
    dcfg = DraftConfig(c.draft.depth, 16, c.draft.calib_rank)
    p = pod_plan.plan(cfg, dcfg, {"data": 1, "tensor": 8}, batch=8, cache_len=4096)
    exp = p.exported
    assert exp.platforms == ("tpu",) and exp.nr_devices == 8
    assert "tpu_custom_call" in exp.mlir_module()  # the Pallas kernel, per shard
    # The cache k, v: donated, split over the kv heads; parameters over "tensor".
    for name_, want in [
        ("state.cache.k", '[{}, {}, {}, {"tensor"}, {}]'),
        ("state.cache.v", '[{}, {}, {}, {"tensor"}, {}]'),
        ("target['layers']['mlp']['down_proj']['kernel']", '[{}, {"tensor"}, {}]'),
        ("draft['layers']['q_proj']['kernel']", '[{}, {}, {"tensor"}]'),
    ]:
        attrs = arg_attrs(exp.mlir_module(), name_)
        assert f"sdy.sharding<@mesh, {want}>" in attrs, (name_, attrs)
    assert "jax.buffer_donor = true" in arg_attrs(exp.mlir_module(), "state.cache.k")
    assert p.cache_bytes * 8 == p.cache_total
    assert p.params_bytes < p.params_total / 7  # all but norms split 8 ways
    assert p.draft_bytes < p.draft_total / 7
    assert p.params_total + p.draft_total + p.cache_total > 16 * GIB  # one chip cannot hold it
    assert p.per_device < 16 * GIB, p.row()


def test_bytes_count_without_export():
    cfg = ModelConfig(arch="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_layers=4, num_heads=16, num_kv_heads=8, head_dim=4)  # fmt: skip
    dcfg = DraftConfig(2, 4, 16)
    p = pod_plan.plan(cfg, dcfg, {"data": 2, "tensor": 4}, batch=8, cache_len=64, platforms=None,
                      dtype="float32")  # fmt: skip
    assert p.exported is None
    assert p.cache_total == 2 * 4 * 8 * 64 * 8 * 4 * 4  # k and v, float32
    assert p.cache_bytes == p.cache_total // 8  # batch over 2, kv heads over 4
    assert "| data:2,tensor:4 |" in pod_plan.format_table([("tiny", p)])
