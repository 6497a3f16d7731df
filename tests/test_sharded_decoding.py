"""Decoding on a mesh (issue: sharded decoding): the same tokens as one device.

Greedy decoding in every mode on 8 simulated CPU devices, meshes data x tensor = 1x8, 2x4 and 8x1,
gives exactly the tokens of the same Decoder on one device (and of plain AR); the compiled loop on
a mesh keeps its properties (no copy of the cache shard, the donated cache aliased); speculative
sampling on a mesh reproduces the target's exact distribution. The model's head counts (16 query,
8 kv heads) divide every tensor axis, so heads, FFN, vocabulary and the cache are all split.

Multi-device checks run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8
set before jax is imported (as tests/test_sharding.py does).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from jax.sharding import PartitionSpec as P

from flexdraft_jax import sharding as shd
from flexdraft_jax.models.config import ModelConfig
from tests.test_sharding import DEVICE_FLAGS, free_port, run_py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ("data:1,tensor:8", "data:2,tensor:4", "data:8,tensor:1")

_SETUP = """
import sys, re, jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, {root!r})
from flexdraft_jax import sharding as shd
from flexdraft_jax.decoding import ar, engine
from flexdraft_jax.decoding.decoder import Decoder, RunConfig
from flexdraft_jax.decoding.sampling import SamplingParams
from flexdraft_jax.models import transformer as tf
from flexdraft_jax.models.config import ModelConfig
from tests.test_decoding import PROMPTS, random_draft, _hlo_ops_of_shape
from tests.test_sampling_exact import PROMPT, exact_joint, chi2_pvalue
assert jax.device_count() == 8, jax.devices()

def model(vocab=64, seed=0, peaky=50.0):
    cfg = ModelConfig(arch="llama", vocab_size=vocab, hidden_size=32, intermediate_size=64,
                      num_layers=4, num_heads=16, num_kv_heads=8, head_dim=4)
    target = tf.init_target(cfg, jax.random.PRNGKey(seed))
    target["embed"]["embedding"] = target["embed"]["embedding"] * peaky
    return cfg, target
"""

_GREEDY = """
cfg, target = model()
dcfg, draft = random_draft(cfg, target, 4)
prompts = (PROMPTS * 2)[:8]
want = ar.generate(cfg, target, prompts, 16, eos_ids=()).tokens
accepted = 0
for mode in engine.MODES:
    def dec(mesh, dispatch):
        ecfg = engine.EngineConfig(mode=mode, threshold=0.0)
        d = None if mode == "ar" else draft
        return Decoder(cfg, target, d, dcfg, ecfg, cache_len=128, eos_ids=(), mesh=mesh,
                       run=RunConfig(dispatch=dispatch), compilation_cache="none")
    one = dec(None, "device").generate(prompts, 16)
    assert one.tokens == want, mode
    # Every mesh through the device loop; one through host dispatch (one program per step).
    runs = [(spec, "device") for spec in {meshes!r}] + [("data:2,tensor:4", "host")]
    for spec, dispatch in runs:
        gen = dec(shd.decode_mesh(spec), dispatch).generate(prompts, 16)
        assert gen.tokens == one.tokens, (mode, spec, dispatch)
        assert gen.stats["branch_per_step"] == one.stats["branch_per_step"], (mode, spec)
        accepted += sum(gen.stats["per_position_acceptance"])
        print(mode, spec, dispatch, "tau", round(gen.stats["tau"], 3), flush=True)
assert accepted > 0  # the accept path ran on the mesh, not only rejections

# The flex loop on a 2x4 mesh: no copy of a cache shard, the cache written once per K and V,
# and the output cache aliases the donated input.
mesh = shd.decode_mesh("data:2,tensor:4")
dcfg8, draft8 = random_draft(cfg, target, 8)
dec = Decoder(cfg, target, draft8, dcfg8, engine.EngineConfig(mode="flex"), cache_len=256,
              eos_ids=(), mesh=mesh, compilation_cache="none")
st = dec.static(8)
state, _ = dec._prefill(st, prompts, 16, 0)
assert state.cache.k.sharding.spec == P(None, "data", None, "tensor"), state.cache.k.sharding
costs = dec._replicated(np.ones(len(st.branches) + 1, np.float32))
with dec._on_mesh():
    hlo = engine.run.lower(st, dec.target, dec.draft, state, costs, 128, 16).compile().as_text()
shard = (cfg.num_layers, 8 // 2, 256, cfg.num_kv_heads // 4, cfg.head_dim)
ops = _hlo_ops_of_shape(hlo, shard)
assert "copy" not in ops and ops.get("dynamic-update-slice", 0) + ops.get("scatter", 0) <= 4, ops
assert ops.get("all-gather", 0) == 0, ops
n_before = len(jax.tree.leaves((dec.target, dec.draft)))
header = hlo.splitlines()[0]
assert "{{0}}: (" + str(n_before) + ", {{}}" in header, header[:300]
assert "{{1}}: (" + str(n_before + 1) + ", {{}}" in header, header[:300]
print("OK")
"""

_SAMPLING = """
cfg, target = model(vocab=5, seed=11, peaky=20.0)
dcfg, draft = random_draft(cfg, target, 4, noise=0.3, seed=12)
sp = SamplingParams(temperature=1.0)
prompt = PROMPT
exact = exact_joint(cfg, target, 3, sp)
ecfg = engine.EngineConfig(mode="parallel", threshold=0.0, sampling=sp)
dec = Decoder(cfg, target, draft, dcfg, ecfg, cache_len=64, eos_ids=(),
              mesh=shd.decode_mesh("data:2,tensor:4"))
gen = dec.generate([prompt] * 6000, 3, seed=1)
counts = np.zeros([cfg.vocab_size] * 3)
for t in gen.tokens:
    counts[tuple(t[:3])] += 1
p, stat, df = chi2_pvalue(counts, exact)
print("p", p, "tau", gen.stats["tau"])
assert p > 1e-3, (p, stat, df)
assert gen.stats["tau"] > 1.2
print("OK")
"""


_TWO_PROCESSES = (
    """
import sys
import jax
jax.distributed.initialize("127.0.0.1:{port}", 2, int(sys.argv[1]))
assert jax.device_count() == 8 and jax.local_device_count() == 4
"""
    + _SETUP.replace("assert jax.device_count() == 8, jax.devices()", "")
    + """
cfg, target = model()
dcfg, draft = random_draft(cfg, target, 4)
prompts = (PROMPTS * 2)[:8]
mesh = shd.decode_mesh("data:2,tensor:4")  # spans both processes
for mode in ("flex", "sequential"):
    ecfg = engine.EngineConfig(mode=mode, threshold=0.0)
    one = Decoder(cfg, target, draft, dcfg, ecfg, cache_len=128, eos_ids=()).generate(prompts, 16)
    pod = Decoder(cfg, target, draft, dcfg, ecfg, cache_len=128, eos_ids=(), mesh=mesh)
    gen = pod.generate(prompts, 16)
    assert gen.tokens == one.tokens, mode
    assert gen.stats["branch_per_step"] == one.stats["branch_per_step"], mode
print("OK", jax.process_index())
"""
)


def test_decode_mesh_specs_and_rules():
    assert shd.parse_mesh("data:2,tensor:4") == {"data": 2, "tensor": 4}
    assert shd.parse_mesh("tensor:8") == {"data": 1, "tensor": 8}
    with pytest.raises(ValueError, match="fsdp:2"):
        shd.parse_mesh("fsdp:2")
    with pytest.raises(ValueError, match="devices"):
        shd.decode_mesh("data:2,tensor:4", devices=[0])
    assert shd.default_decode_mesh_shape(8, 10, None) == {"data": 8, "tensor": 1}
    assert shd.default_decode_mesh_shape(8, 10, 100) == {"data": 8, "tensor": 1}
    assert shd.default_decode_mesh_shape(8, 1000, 100) == {"data": 1, "tensor": 8}
    mesh = shd.abstract_mesh((1, 1, 8))
    # Heads over "tensor" only when both head counts divide it (SmolLM2: 9 / 3 heads do not).
    assert shd.decode_rules(32, 8, mesh)[shd.HEADS] == "tensor"
    assert shd.decode_rules(9, 3, mesh)[shd.HEADS] is None
    assert shd.decode_rules(9, 3, mesh)[shd.MLP] == "tensor"
    cfg = ModelConfig(arch="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_layers=4, num_heads=16, num_kv_heads=8, head_dim=4)  # fmt: skip
    dmesh = jax_abstract_decode_mesh(2, 4)
    assert shd.cache_spec(cfg, 8, dmesh) == P(None, "data", None, "tensor", None)
    assert shd.cache_spec(cfg, 3, dmesh) == P(None, None, None, "tensor", None)  # 3 % 2


def jax_abstract_decode_mesh(data: int, tensor: int):
    from jax.sharding import AbstractMesh

    return AbstractMesh((data, tensor), shd.DECODE_AXES)


@pytest.mark.slow  # 90 s; the default run keeps sampling and two processes on a mesh
def test_every_mode_on_every_mesh_equals_one_device():
    code = _SETUP.format(root=ROOT) + _GREEDY.format(meshes=MESHES)
    res = run_py("from jax.sharding import PartitionSpec as P\n" + code, devices=8)
    assert "OK" in res.stdout, res.stdout


@pytest.mark.slow  # 30 s: a subprocess on simulated devices
def test_sampling_on_a_mesh_is_lossless():
    res = run_py(_SETUP.format(root=ROOT) + _SAMPLING, devices=8)
    assert "OK" in res.stdout, res.stdout


@pytest.mark.slow  # 21 s: two processes
def test_two_processes_decode_as_one_program():
    """A mesh spanning two processes (4 CPU devices each, localhost collectives): every process
    makes the same calls and gets every sequence's tokens, the same as one device."""
    code = _TWO_PROCESSES.format(port=free_port(), root=ROOT)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": DEVICE_FLAGS + "4"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(pid)],
            env=env,
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for pid in range(2)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    for pid, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"OK {pid}" in out, err[-4000:]
