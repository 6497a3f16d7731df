"""Import llama-architecture GGUF files (llama.cpp's format) into our config and param tree.

`load_gguf(path)` returns (ModelConfig, target params as numpy). The file is read with
`gguf.GGUFReader`; every tensor is dequantized to float32 with `gguf.quants.dequantize` (so any
quantization `gguf` knows works, Q4_1 and Q8_0 included). Tensor names are mapped to Hugging Face
names and handed to `checkpoints.hf.params_from_state_dict`, so the param layout lives in one place.

llama.cpp's converter permutes the rows of q and k (and their biases) from the Hugging Face
rotate-half RoPE layout to its interleaved one, per head:
  w.reshape(n_head, 2, D/2, ...).swapaxes(1, 2)
`_unpermute` undoes it (as transformers' `LlamaTensorProcessor` does), with n_head = N for q and
K for k.

`read_metadata(reader)` gives the file's key/value metadata as plain Python values; the tokenizer
builder (`checkpoints.tokenizer`) reuses it.
"""

from __future__ import annotations

import os
import re

import numpy as np

from flexdraft_jax.checkpoints.hf import params_from_state_dict
from flexdraft_jax.models.config import ModelConfig

SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF per-layer tensor name -> Hugging Face name (after "model.layers.{i}.").
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^([a-z_]+)\.(weight|bias)$")


def open_gguf(path: str):
    """A `gguf.GGUFReader` over `path`, with clear errors for a missing or unreadable file."""
    import gguf

    if not os.path.exists(path):
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, not a GGUF file")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError / struct.error / IndexError on bad bytes
        raise ValueError(f"cannot read GGUF file {path} (corrupt or not GGUF): {e}") from e


def read_metadata(reader) -> dict:
    """All key/value metadata as Python values (str, int, float, bool, lists of them)."""
    meta = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except Exception:  # a value type this gguf version cannot decode: not one we need
            continue
    return meta


def _require(meta: dict, key: str, path: str):
    if key not in meta:
        raise ValueError(f"GGUF file {path} has no {key!r} in its metadata")
    return meta[key]


def config_from_metadata(meta: dict, tensor_names: set[str], path: str = "<gguf>") -> ModelConfig:
    """ModelConfig from llama.* and tokenizer.ggml.* metadata (tied when no output.weight)."""
    arch = _require(meta, "general.architecture", path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF file {path} has architecture {arch!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    get = lambda k: _require(meta, f"{arch}.{k}", path)
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if (scaling not in (None, "none")) or "rope_freqs.weight" in tensor_names:
        raise ValueError(
            f"GGUF file {path} uses RoPE scaling ({scaling or 'rope_freqs tensor'}), which the "
            "GGUF importer does not support; import the Hugging Face checkpoint instead"
        )
    hidden = int(get("embedding_length"))
    num_heads = int(get("attention.head_count"))
    num_kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", num_heads))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // num_heads))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens is not None else meta.get(f"{arch}.vocab_size")
    if vocab is None:
        raise ValueError(
            f"GGUF file {path} has neither tokenizer.ggml.tokens nor {arch}.vocab_size"
        )
    eos = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        if key in meta and int(meta[key]) not in eos:
            eos.append(int(meta[key]))
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        arch="llama",
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        max_position_embeddings=int(meta.get(f"{arch}.context_length", 4096)),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(eos),
    )


def hf_name(gguf_name: str) -> str | None:
    """GGUF tensor name -> Hugging Face name, or None for tensors we do not use."""
    m = _LAYER_RE.match(gguf_name)
    if m:
        layer, base, kind = m.groups()
        theirs = _LAYER_NAMES.get(base)
        return None if theirs is None else f"model.layers.{layer}.{theirs}.{kind}"
    m = _GLOBAL_RE.match(gguf_name)
    if m and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    return None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation. w [n_head * D, ...] (weight rows or a bias)."""
    if w.shape[0] % (2 * n_head):
        raise ValueError(f"q/k tensor with {w.shape[0]} rows does not split into {n_head} heads")
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, d, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(tensor) -> np.ndarray:
    """One `gguf` ReaderTensor -> float32 numpy array in row-major [out, in] order."""
    import gguf

    shape = tuple(int(s) for s in reversed(tensor.shape))  # ggml lists the fastest dim first
    x = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(x, dtype=np.float32).reshape(shape)


def load_gguf(path: str, dtype=np.float32) -> tuple[ModelConfig, dict]:
    """Load a llama-architecture GGUF file -> (config, params as numpy)."""
    return load_from_reader(open_gguf(path), path, dtype)


def load_from_reader(reader, path: str, dtype=np.float32) -> tuple[ModelConfig, dict]:
    """`load_gguf` on an open `gguf.GGUFReader` (so the tokenizer can share one read)."""
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    cfg = config_from_metadata(meta, names, path)
    tensors = {}
    try:
        for t in reader.tensors:
            name = hf_name(t.name)
            if name is None:
                continue
            w = dequantize(t)
            if ".q_proj." in name:
                w = _unpermute(w, cfg.num_heads)
            elif ".k_proj." in name:
                w = _unpermute(w, cfg.num_kv_heads)
            tensors[name] = w
    except Exception as e:  # truncated data, unknown quantization type, bad q/k shapes...
        raise ValueError(f"cannot dequantize the tensors of GGUF file {path}: {e}") from e
    emb = tensors.get("model.embed_tokens.weight")
    if emb is not None and emb.shape[0] != cfg.vocab_size:
        # Some files pad the embedding past the token list; trust the tensor.
        cfg = cfg.replace(vocab_size=emb.shape[0])
    return cfg, params_from_state_dict(cfg, tensors.get, dtype)
