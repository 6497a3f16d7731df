"""One entry point for every target checkpoint: `load_checkpoint(path) -> (cfg, params, tokenizer)`.

  None             the embedded default, SmolLM2-135M-Instruct (checkpoints/default.py)
  a *.gguf file    llama-architecture GGUF (checkpoints/gguf.py), tokenizer from its metadata
  a directory      Hugging Face config.json + safetensors (checkpoints/hf.py), tokenizer through
                   `transformers.AutoTokenizer` when the directory has tokenizer files, else None

Params are numpy float32 trees in our stacked layout (models/transformer.py).
"""

from __future__ import annotations

import os

import numpy as np

from flexdraft_jax.checkpoints import gguf as gguf_io
from flexdraft_jax.checkpoints.default import default_gguf_path
from flexdraft_jax.checkpoints.hf import load_hf
from flexdraft_jax.checkpoints.tokenizer import gguf_tokenizer
from flexdraft_jax.models.config import ModelConfig

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_gguf_checkpoint(path: str, dtype=np.float32):
    """(cfg, params, tokenizer) from one GGUF file, read once."""
    reader = gguf_io.open_gguf(path)
    cfg, params = gguf_io.load_from_reader(reader, path, dtype)
    return cfg, params, gguf_tokenizer(reader)


def hf_tokenizer(path: str):
    """`AutoTokenizer` from a Hugging Face directory, or None when it has no tokenizer files."""
    if not any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_checkpoint(path: str | None = None, dtype=np.float32) -> tuple[ModelConfig, dict, object]:
    """Dispatch on `path`: None -> embedded default, *.gguf -> GGUF, directory -> Hugging Face."""
    if path is None:
        return load_gguf_checkpoint(default_gguf_path(), dtype)
    path = os.fspath(path)
    if os.path.isdir(path):
        cfg, params = load_hf(path, dtype)
        return cfg, params, hf_tokenizer(path)
    if path.endswith(".gguf"):
        return load_gguf_checkpoint(path, dtype)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    raise ValueError(
        f"don't know how to load {path}: expected a *.gguf file or a Hugging Face directory "
        "(config.json + *.safetensors)"
    )
