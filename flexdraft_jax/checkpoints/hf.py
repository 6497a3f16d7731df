"""Import Hugging Face checkpoints: a directory with config.json and (sharded) safetensors.

`load_hf(path)` returns (ModelConfig, target params) in our stacked layout (see
`models/transformer.py`). Tensors are read with `safetensors` (numpy, any dtype including bf16 via
ml_dtypes) and converted to float32 unless another dtype is asked for. `params_from_state_dict`
maps Hugging Face tensor names to our tree and is shared with the GGUF importer;
`state_dict_from_params` maps back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy before safetensors reads it)
import numpy as np
from safetensors import safe_open

from flexdraft_jax.models.config import ModelConfig

_ATTN = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "o_proj"}


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"corrupt safetensors index {index}: {e}") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {missing}")
        return [os.path.join(path, f) for f in files]
    if os.path.exists(single):
        return [single]
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not found:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    return [os.path.join(path, f) for f in found]


def read_safetensors(files: list[str]) -> dict[str, np.ndarray]:
    tensors = {}
    for fname in files:
        try:
            with safe_open(fname, framework="numpy") as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"cannot read safetensors file {fname}: {e}") from e
    return tensors


def read_config(path: str) -> ModelConfig:
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"{path} has no config.json")
    with open(cfg_file) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"corrupt {cfg_file}: {e}") from e
    return ModelConfig.from_hf(raw)


def params_from_state_dict(
    cfg: ModelConfig,
    get: Callable[[str], np.ndarray | None],
    dtype=np.float32,
) -> dict:
    """Build target params from Hugging Face tensor names. `get(name)` returns [out, in] arrays."""

    def need(name):
        x = get(name)
        if x is None:
            raise KeyError(f"checkpoint is missing tensor {name!r}")
        return np.asarray(x).astype(dtype)

    def layer(i):
        pre = f"model.layers.{i}."
        attn = {}
        for ours, theirs in _ATTN.items():
            entry = {"kernel": need(pre + f"self_attn.{theirs}.weight").T}
            if (cfg.attention_bias and ours != "o_proj") or (cfg.o_proj_bias and ours == "o_proj"):
                entry["bias"] = need(pre + f"self_attn.{theirs}.bias")
            attn[ours] = entry
        if cfg.qk_norm:
            attn["q_norm"] = {"scale": need(pre + "self_attn.q_norm.weight")}
            attn["k_norm"] = {"scale": need(pre + "self_attn.k_norm.weight")}
        return {
            "input_norm": {"scale": need(pre + "input_layernorm.weight")},
            "attn": attn,
            "post_norm": {"scale": need(pre + "post_attention_layernorm.weight")},
            "mlp": {
                p: {"kernel": need(pre + f"mlp.{p}.weight").T}
                for p in ("gate_proj", "up_proj", "down_proj")
            },
        }

    layers = [layer(i) for i in range(cfg.num_layers)]
    stacked = _stack(layers)
    params = {
        "embed": {"embedding": need("model.embed_tokens.weight")},
        "layers": stacked,
        "final_norm": {"scale": need("model.norm.weight")},
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": need("lm_head.weight").T}
    _check_shapes(cfg, params)
    return params


def state_dict_from_params(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """The inverse of `params_from_state_dict`: Hugging Face tensor names ([out, in] arrays) for
    target params in our stacked layout (the `transformers` peer row builds its model so)."""
    host = lambda x: np.asarray(x, np.float32)
    out = {"model.embed_tokens.weight": host(params["embed"]["embedding"]),
           "model.norm.weight": host(params["final_norm"]["scale"])}  # fmt: skip
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = host(params["lm_head"]["kernel"]).T
    layers = _unstack(params["layers"], slice(None))  # to the host once, not layer by layer
    for i in range(cfg.num_layers):
        pre, lay = f"model.layers.{i}.", _unstack(layers, i)
        attn = lay["attn"]
        for name in _ATTN:
            out[pre + f"self_attn.{name}.weight"] = attn[name]["kernel"].T
            if "bias" in attn[name]:
                out[pre + f"self_attn.{name}.bias"] = attn[name]["bias"]
        if cfg.qk_norm:
            out[pre + "self_attn.q_norm.weight"] = attn["q_norm"]["scale"]
            out[pre + "self_attn.k_norm.weight"] = attn["k_norm"]["scale"]
        out[pre + "input_layernorm.weight"] = lay["input_norm"]["scale"]
        out[pre + "post_attention_layernorm.weight"] = lay["post_norm"]["scale"]
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[pre + f"mlp.{name}.weight"] = lay["mlp"][name]["kernel"].T
    return out


def _unstack(tree, i: int):
    """Layer(s) `i` of a stacked tree (`_stack`'s inverse), as float32 numpy."""
    if isinstance(tree, dict):
        return {k: _unstack(v, i) for k, v in tree.items()}
    return np.asarray(tree[i], np.float32)


def _stack(trees: list[dict]) -> dict:
    if isinstance(trees[0], dict):
        return {k: _stack([t[k] for t in trees]) for k in trees[0]}
    return np.stack(trees)


def _check_shapes(cfg: ModelConfig, params: dict) -> None:
    emb = params["embed"]["embedding"].shape
    if emb != (cfg.vocab_size, cfg.hidden_size):
        raise ValueError(
            f"embedding shape {emb} does not match config {(cfg.vocab_size, cfg.hidden_size)}"
        )
    q = params["layers"]["attn"]["q_proj"]["kernel"].shape
    want = (cfg.num_layers, cfg.hidden_size, cfg.num_heads * cfg.head_dim)
    if q != want:
        raise ValueError(f"q_proj shape {q} does not match config {want}")


def load_hf(path: str, dtype=np.float32) -> tuple[ModelConfig, dict]:
    """Load a Hugging Face Llama/Mistral/Qwen2/Qwen3 directory -> (config, params as numpy)."""
    cfg = read_config(path)
    tensors = read_safetensors(_safetensors_files(path))
    return cfg, params_from_state_dict(cfg, tensors.get, dtype)
