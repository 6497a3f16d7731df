"""The JAX model beside `transformers`: tiny random Llama / Mistral / Qwen2 / Qwen3 checkpoints
saved with `save_pretrained` (tied and untied, sharded, bf16, llama3 RoPE scaling), imported with
`load_hf`, must give the same logits; cached token-by-token decoding must equal one full forward;
bad checkpoints must fail with clear errors."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from flexdraft_jax.checkpoints.hf import load_hf
from flexdraft_jax.checkpoints.load import load_checkpoint
from flexdraft_jax.models import layouts, transformer

LOGIT_ATOL = 1e-4  # float32 on both sides
CACHE_ATOL = 1e-5  # same JAX model, cached vs uncached

VOCAB, HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 101, 64, 96, 2, 4, 2

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=FFN,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    initializer_range=0.1,  # large enough that logits are O(1) and a wrong weight shows
    bos_token_id=1,
    eos_token_id=2,
)

# name -> (config class, extra config kwargs, save kwargs)
CASES = {
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True, rope_theta=10000.0), {}),
    "llama_untied_sharded": (
        "LlamaConfig",
        dict(tie_word_embeddings=False, rope_theta=500000.0),
        dict(max_shard_size="40KB"),
    ),
    "llama_bias": ("LlamaConfig", dict(tie_word_embeddings=False, attention_bias=True), {}),
    "llama3_rope": (
        "LlamaConfig",
        dict(
            tie_word_embeddings=True,
            rope_scaling=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
        {},
    ),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=False, sliding_window=None), {}),
    "qwen2_tied": ("Qwen2Config", dict(tie_word_embeddings=True), {}),
    "qwen3_untied": ("Qwen3Config", dict(tie_word_embeddings=False, head_dim=24), {}),
    "llama_bf16": ("LlamaConfig", dict(tie_word_embeddings=False), dict(bf16=True)),
}


@pytest.fixture(scope="module", autouse=True)
def _torch_one_thread():
    """torch's intra-op threads fight JAX (and other jobs) for the 2 cores: 6x slower generate."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _perturb(model, seed):
    """Randomise norms and biases too (they default to ones / zeros, which would hide a bad map)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def _build(name, path):
    cls_name, extra, save = CASES[name]
    cfg = getattr(transformers, cls_name)(**COMMON, **extra)
    cfg._attn_implementation = "eager"
    torch.manual_seed(sum(map(ord, name)))
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    _perturb(model, seed=len(name))
    save = dict(save)
    if save.pop("bf16", False):
        model.to(torch.bfloat16).save_pretrained(path, **save)
        # The reference is what those bf16 weights compute in float32.
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager"
        ).eval()
    else:
        model.save_pretrained(path, **save)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for name in CASES:
        path = str(tmp_path_factory.mktemp(name))
        out[name] = (path, _build(name, path))
    return out


def _tokens(batch=2, length=11, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int32)


def _jax_logits(cfg, params, tokens):
    lay = layouts.causal(jnp.zeros((tokens.shape[0],), jnp.int32), tokens.shape[1])
    logits, _ = transformer.apply(
        cfg, jax.tree.map(jnp.asarray, params), jnp.asarray(tokens), lay.positions, None, lay.meta
    )
    return np.asarray(logits)


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


# Llama's `attention_bias` also puts a bias on o_proj (ModelConfig.o_proj_bias); "llama_bias"
# checks it is loaded and applied.
_XFAIL: dict = {}


@pytest.mark.parametrize("name", [pytest.param(n, marks=_XFAIL.get(n, ())) for n in CASES])
def test_logits_match_transformers(saved, name):
    path, model = saved[name]
    cfg, params = load_hf(path)
    assert cfg.tie_word_embeddings == CASES[name][1]["tie_word_embeddings"]
    assert ("lm_head" in params) != cfg.tie_word_embeddings
    tokens = _tokens()
    diff = np.abs(_jax_logits(cfg, params, tokens) - _torch_logits(model, tokens)).max()
    assert diff < LOGIT_ATOL, f"{name}: max abs logit diff {diff}"


def test_sharded_checkpoint_has_several_shards(saved):
    path, _ = saved["llama_untied_sharded"]
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        shards = set(json.load(f)["weight_map"].values())
    assert len(shards) >= 3, shards


def test_config_fields(saved):
    cfg, _ = load_hf(saved["qwen3_untied"][0])
    assert (cfg.arch, cfg.head_dim, cfg.qk_norm) == ("qwen3", 24, True)
    cfg, _ = load_hf(saved["qwen2_tied"][0])
    assert (cfg.arch, cfg.attention_bias) == ("qwen2", True)
    cfg, _ = load_hf(saved["llama3_rope"][0])
    assert cfg.rope_scaling is not None and cfg.rope_scaling.factor == 8.0
    assert cfg.eos_token_ids == (2,) and cfg.bos_token_id == 1


def test_load_checkpoint_dispatches_directory(saved):
    path, _ = saved["llama_tied"]
    cfg, params, tok = load_checkpoint(path)
    assert tok is None  # no tokenizer files were saved
    assert params["embed"]["embedding"].shape == (VOCAB, HIDDEN)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(os.path.join(path, "nope.bin"))


@pytest.mark.parametrize("name", ["llama_untied_sharded", "qwen3_untied"])
def test_cached_decoding_equals_full_forward(saved, name):
    """Prefill prompts of different lengths, then feed the rest one token per step through the
    cache: every row's logits equal the uncached full forward's."""
    cfg, params = load_hf(saved[name][0])
    params = jax.tree.map(jnp.asarray, params)
    total = 12
    seqs = _tokens(batch=3, length=total, seed=1)
    prompt_lens = np.array([3, 8, 5], np.int32)
    full = _jax_logits(cfg, params, seqs)

    fwd = jax.jit(transformer.forward, static_argnums=0)
    cache = transformer.init_cache(cfg, batch=3, capacity=16)
    width = int(prompt_lens.max())
    prompts = np.where(np.arange(width)[None] < prompt_lens[:, None], seqs[:, :width], 0)
    start = jnp.zeros((3,), jnp.int32)
    lay = layouts.causal(start, width)
    logits, _, cache = fwd(cfg, params, jnp.asarray(prompts), lay.positions, lay.meta, cache, start)
    logits = np.asarray(logits)
    got = np.zeros_like(full)
    for b, n in enumerate(prompt_lens):
        got[b, :n] = logits[b, :n]
    cache = cache._replace(lengths=jnp.asarray(prompt_lens))
    lengths = prompt_lens.copy()
    while (lengths < total).any():
        pos = np.minimum(lengths, total - 1)  # finished rows recompute their last token (ignored)
        tok = seqs[np.arange(3), pos][:, None]
        start = jnp.asarray(pos)
        lay = layouts.causal(start, 1)
        step, _, cache = fwd(cfg, params, jnp.asarray(tok), lay.positions, lay.meta, cache, start)
        step = np.asarray(step)
        for b in range(3):
            if lengths[b] < total:
                got[b, lengths[b]] = step[b, 0]
        lengths = np.minimum(lengths + 1, total)
        cache = cache._replace(lengths=jnp.asarray(lengths))
    diff = np.abs(got - full).max()
    assert diff < CACHE_ATOL, f"cached vs full forward: max abs diff {diff}"


# ----------------------------------------------------------------------------- bad checkpoints


def _copy_ckpt(src, dst):
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        with open(os.path.join(src, f), "rb") as a, open(os.path.join(dst, f), "wb") as b:
            b.write(a.read())
    return dst


def test_unknown_model_type(saved, tmp_path):
    path = _copy_ckpt(saved["llama_tied"][0], str(tmp_path / "gpt"))
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file) as f:
        raw = json.load(f)
    raw["model_type"] = "gpt2"
    with open(cfg_file, "w") as f:
        json.dump(raw, f)
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        load_hf(path)


def test_missing_config(saved, tmp_path):
    path = _copy_ckpt(saved["llama_tied"][0], str(tmp_path / "nocfg"))
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf(str(tmp_path / "absent"))


def test_missing_safetensors(saved, tmp_path):
    path = _copy_ckpt(saved["llama_tied"][0], str(tmp_path / "noweights"))
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_hf(path)


def test_missing_shard(saved, tmp_path):
    path = _copy_ckpt(saved["llama_untied_sharded"][0], str(tmp_path / "noshard"))
    shard = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[0]
    os.remove(os.path.join(path, shard))
    with pytest.raises(FileNotFoundError, match=shard):
        load_hf(path)


def test_corrupt_safetensors(saved, tmp_path):
    path = _copy_ckpt(saved["llama_tied"][0], str(tmp_path / "corrupt"))
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(b"\x07\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(ValueError, match="cannot read safetensors"):
        load_hf(path)
