"""Tiny random llama target built in-process: tests and smoke runs (seconds per hundred steps).

python launch/train.py --config=configs/tiny.py --workdir=/tmp/tiny
"""

import ml_collections

from flexdraft_jax.training.defaults import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base_config()
    c.model.source = "tiny"
    c.model.tiny = dict(
        arch="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4,
        num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0, max_position_embeddings=512,
    )  # fmt: skip
    c.draft.depth = 2
    c.draft.block_size = 4
    c.draft.calib_rank = 16

    c.data.sources = ("synthetic",)
    c.data.num_prompts = 64
    c.data.max_prompt_tokens = 12
    c.data.max_new_tokens = 40
    c.data.gen_batch_size = 64
    c.data.seq_len = 64
    c.data.anchors_per_seq = 4
    c.data.chat_template = False

    c.train.steps = 200
    c.train.lr = 1e-2
    c.train.warmup_steps = 10
    c.train.end_lr_ratio = 0.1
    c.train.ckpt_every = 100
    c.mesh.shape = (1, -1, 1)

    if arg == "runlocal":
        c.data.num_prompts = 16
        c.train.steps = 20
    return c
