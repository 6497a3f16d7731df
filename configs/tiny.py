"""Tiny random llama target built in-process: tests and smoke runs (seconds per hundred steps).

python launch/train.py --config=configs/tiny.py --workdir=/tmp/tiny
python launch/train.py --config=configs/tiny.py:runlocal ...   (even smaller data)
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.source = "tiny"  # "tiny" | "default" (embedded SmolLM2) | HF directory | *.gguf
    c.model.tiny = dict(
        arch="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4,
        num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0, max_position_embeddings=512,
    )  # fmt: skip
    c.model.dtype = "float32"
    c.model.attention_impl = "xla"

    c.draft = ml_collections.ConfigDict()
    c.draft.depth = 2
    c.draft.block_size = 4
    c.draft.calib_rank = 16

    c.data = ml_collections.ConfigDict()
    c.data.sources = ("synthetic",)
    c.data.num_prompts = 64
    c.data.max_prompt_tokens = 12
    c.data.max_new_tokens = 40
    c.data.gen_batch_size = 64
    c.data.seq_len = 64
    c.data.anchors_per_seq = 4
    c.data.chat_template = False
    c.data.cache_dir = ""  # "" -> ~/.cache/flexdraft_jax/distill

    c.train = ml_collections.ConfigDict()
    c.train.stage = "attention"  # attention | calibration | joint
    c.train.steps = 200
    c.train.stop_at = 0  # > 0: stop (and checkpoint) at this step, keeping the schedule of `steps`
    c.train.batch_size = 8
    c.train.lr = 3e-3
    c.train.warmup_steps = 10
    c.train.end_lr_ratio = 0.1
    c.train.weight_decay = 0.0
    c.train.clip_norm = 1.0
    c.train.b1 = 0.9
    c.train.b2 = 0.98
    c.train.ce_weight = 1.0
    c.train.kl_weight = 0.0
    c.train.gamma = 0.0  # position decay exp(-(j-1)/gamma); 0 = uniform
    c.train.bonus = "data"  # calibration bonus: token at p ("data") or target argmax at p-1
    c.train.init_from = ""  # release dir or a previous stage's workdir
    c.train.log_every = 10
    c.train.ckpt_every = 100
    c.train.keep_checkpoints = 2
    c.train.export_release = True

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (1, -1, 1)  # (data, fsdp, tensor); -1 = remaining devices

    if arg == "runlocal":
        c.data.num_prompts = 16
        c.train.steps = 20
    return c
