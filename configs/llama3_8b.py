"""Llama-3.1-8B-Instruct target, paper scale (b = 16), for a TPU v4/v5p pod slice of 32 chips.

The target is read from a Hugging Face directory (`model.source`); `model.tiny` records its
architecture so the sharding can be checked without it (tests/test_sharding.py). One process
per host:

  python launch/train.py --distributed --config=configs/llama3_8b.py --workdir=gs://.../llama3 \
      --config.model.source=/data/Llama-3.1-8B-Instruct
"""

import ml_collections

from flexdraft_jax.training.defaults import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base_config()
    c.model.source = "/data/Llama-3.1-8B-Instruct"
    c.model.tiny = dict(
        arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=False, max_position_embeddings=131072,
    )  # fmt: skip
    c.model.dtype = "bfloat16"
    c.model.attention_impl = "auto"

    c.draft.depth = 8
    c.draft.block_size = 16
    c.draft.calib_rank = 512

    c.data.sources = ("python_docs",)
    c.data.num_prompts = 0
    c.data.max_prompt_tokens = 1024
    c.data.max_new_tokens = 1024
    c.data.gen_batch_size = 64
    c.data.seq_len = 2048
    c.data.anchors_per_seq = 64

    c.train.steps = 20000
    c.train.batch_size = 128
    c.train.lr = 6e-4
    c.train.warmup_steps = 500
    c.train.kl_weight = 1.0
    c.train.gamma = 7.0
    c.train.log_every = 50
    c.train.ckpt_every = 1000
    c.train.keep_checkpoints = 3

    c.mesh.shape = (1, -1, 4)
    c.mesh.expected_devices = 32
    if arg == "runlocal":
        c.train.steps = 10
        c.data.num_prompts = 64
    return c
