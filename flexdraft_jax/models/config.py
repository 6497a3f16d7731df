"""Model configuration for the Llama family (Llama, Mistral, Qwen2, Qwen3) and FlexDraft.

`ModelConfig` is a frozen dataclass describing the target transformer; it is built by hand, from a
`transformers` config (`from_hf`) or from GGUF metadata (see `checkpoints.gguf`). `DraftConfig`
describes the FlexDraft additions (draft depth, block size, calibration rank).

Shape alphabet used in docstrings across the package:
  B batch, T query rows, S key rows, N heads, K kv heads, H hidden, D head dim, V vocab,
  W block size, G groups, L layers, F MLP width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
ATTENTION_IMPLS = ("auto", "xla", "pallas")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (`rope_type: llama3` in Hugging Face configs)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder-only transformer."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2; optional on Llama)
    o_proj_bias: bool = False  # output-projection bias (Llama/Mistral/Qwen3 with attention_bias)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Attention implementation: "xla" (the jnp reference), "pallas" (the Pallas kernel of the
    # platform the program is lowered for; interpreted on CPU) or "auto" (Pallas when the default
    # backend is TPU/GPU, else XLA). See `kernels/api.py`.
    attention_impl: str = "auto"

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(
                f"unknown architecture {self.arch!r}; supported: {', '.join(ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"attention_impl must be one of {', '.join(ATTENTION_IMPLS)}, "
                f"got {self.attention_impl!r}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies [D/2], with Llama-3 scaling when configured."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
        rs = self.rope_scaling
        if rs is None:
            return inv.astype(np.float32)
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)

    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelConfig:
        """Build from a `transformers` config object (or the dict of a config.json)."""
        get = (
            hf_config.get
            if isinstance(hf_config, dict)
            else (lambda k, d=None: getattr(hf_config, k, d))
        )
        arch = get("model_type")
        if arch not in ARCHITECTURES:
            raise ValueError(
                f"unsupported model_type {arch!r} in the checkpoint's config; "
                f"supported: {', '.join(ARCHITECTURES)}"
            )
        rope = dict(get("rope_parameters") or get("rope_scaling") or {})
        theta = rope.get("rope_theta", get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            )
        elif rope_type not in ("default", None):
            raise ValueError(f"unsupported rope_type {rope_type!r} (supported: default, llama3)")
        num_heads = get("num_attention_heads")
        head_dim = get("head_dim") or get("hidden_size") // num_heads
        eos = get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return cls(
            arch=arch,
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"),
            num_layers=get("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            attention_bias=True if arch == "qwen2" else bool(get("attention_bias", False)),
            o_proj_bias=arch != "qwen2" and bool(get("attention_bias", False)),
            qk_norm=arch == "qwen3",
            max_position_embeddings=int(get("max_position_embeddings", 4096)),
            bos_token_id=get("bos_token_id"),
            eos_token_ids=eos,
        )


# Block sizes a draft may have: [2, MAX_BLOCK_SIZE]. A parallel step over a block of W runs
# W + W * W mask rows through the deep layers (the paper's 16: 272; 64: 4160), so a block size
# far beyond the paper's is a typo, not a configuration (1000 would build a million-row branch).
MAX_BLOCK_SIZE = 64


@dataclasses.dataclass(frozen=True)
class DraftConfig:
    """FlexDraft additions: draft projectors in the last `depth` layers, blocks of `block_size`
    (2 .. MAX_BLOCK_SIZE)."""

    depth: int = 4
    block_size: int = 8
    calib_rank: int = 256
    use_calibration: bool = True

    def __post_init__(self):
        if self.depth < 1:
            raise ValueError(f"draft depth must be >= 1, got {self.depth}")
        if not 2 <= self.block_size <= MAX_BLOCK_SIZE:
            raise ValueError(f"block_size must be in [2, {MAX_BLOCK_SIZE}], got {self.block_size}")
        if self.calib_rank < 1:
            raise ValueError(f"calib_rank must be >= 1, got {self.calib_rank}")

    def split(self, cfg: ModelConfig) -> int:
        """First deep layer index s = L - D."""
        if self.depth > cfg.num_layers:
            raise ValueError(
                f"draft depth {self.depth} exceeds the model's {cfg.num_layers} layers"
            )
        return cfg.num_layers - self.depth
