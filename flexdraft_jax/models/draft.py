"""A drafter as the rest of the package sees it: a typed record, never metadata in a params tree.

`Draft(params, config, vocab, vocab_size, acceptance, target)`: the FlexDraft parameters (arrays
only: mask embedding, draft projectors, calibration MLP), their `DraftConfig` (depth, block size,
calibration rank), the draft vocabulary a release stores (token ids, most frequent first) and how
many of them the draft was trained over, the held-out acceptance per draft position it records
(flex decoding's prior), and the fingerprint of the target it was trained for.

`target_fingerprint(cfg, target)` identifies a target by its shape and the signs of a corner of its
embedding table: two checkpoints of the same architecture differ there, and a cast to bfloat16
(or any rounding) keeps every sign, so the fingerprint survives the decoding dtype.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from flexdraft_jax.models.config import DraftConfig, ModelConfig

_CORNER = 32  # rows and columns of the embedding table the fingerprint reads


@dataclasses.dataclass(frozen=True)
class Draft:
    params: dict  # arrays only
    config: DraftConfig
    vocab: np.ndarray | None = None  # int ids, most frequent first (None: the whole vocabulary)
    vocab_size: int | None = None  # leading `vocab` ids it was trained over (None: not recorded)
    acceptance: tuple[float, ...] | None = None  # held-out acceptance per draft position
    target: str | None = None  # `target_fingerprint` of the target it was trained for
    # mean confidence per draft position of the prefill's drafts on the held-out prompts
    prefill_confidence: tuple[float, ...] | None = None

    def check_target(self, cfg: ModelConfig, target: dict, where: str = "the draft") -> None:
        """Raise if the draft records a target other than `target`."""
        if self.target is None:
            return
        have = target_fingerprint(cfg, target)
        if have != self.target:
            raise ValueError(
                f"{where} was trained for a different target (fingerprint {self.target}; this "
                f"target's is {have}): its drafts would rarely be accepted"
            )


def target_fingerprint(cfg: ModelConfig, target: dict) -> str:
    """A 16-hex-digit identity of a target's weights (see the module docstring)."""
    table = np.asarray(target["embed"]["embedding"][:_CORNER, :_CORNER], np.float32)
    shape = (cfg.arch, cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads,
             cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size)  # fmt: skip
    h = hashlib.sha1(repr(shape).encode())
    h.update(np.packbits(table > 0).tobytes())
    return h.hexdigest()[:16]
