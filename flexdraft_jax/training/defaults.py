"""Every training config field with its default; config files (configs/*.py) override these.

model   source: "tiny" (random, built in-process from `model.tiny`), "default" (the embedded
        SmolLM2-135M-Instruct), a Hugging Face directory or a *.gguf file; dtype of the target
draft   depth D, block size b, calibration rank r
data    prompt sources ("python_docs", "synthetic", "jsonl:PATH"), self-distillation sizes,
        packing length T and anchors per sequence A
train   stage, optimizer, schedule, loss weights, checkpointing, logging
mesh    (data, fsdp, tensor) sizes; -1 = the remaining devices
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.source = "default"
    c.model.tiny = {}  # ModelConfig fields when source == "tiny"
    c.model.dtype = "float32"  # target params ("bfloat16" on accelerators)
    c.model.attention_impl = "xla"  # xla | pallas | auto

    c.draft = ml_collections.ConfigDict()
    c.draft.depth = 6
    c.draft.block_size = 8
    c.draft.calib_rank = 256

    c.data = ml_collections.ConfigDict()
    c.data.sources = ("python_docs",)
    c.data.weights = ()  # one per source: a mix splitting num_prompts; () = sources in order
    c.data.num_prompts = 1024  # prompts to self-distill (0 = all)
    c.data.max_prompt_tokens = 320  # longer prompts are skipped (and counted)
    c.data.max_new_tokens = 192
    c.data.gen_batch_size = 32
    c.data.seq_len = 512  # T: prompt + response, responses cropped to fit
    c.data.anchors_per_seq = 16  # A
    c.data.length_bucket = 64  # crop each batch to its longest sequence, rounded up (0 = off)
    c.data.sort_window = 16  # batches per length-sorting window (length_bucket > 0)
    c.data.chat_template = True
    c.data.cache_dir = ""  # self-distillation cache; "" -> ~/.cache/flexdraft_jax/distill

    c.train = ml_collections.ConfigDict()
    c.train.stage = "attention"  # attention | calibration | joint
    c.train.steps = 1000  # defines the schedule
    c.train.stop_at = 0  # > 0: stop (and checkpoint) at this step, keeping the schedule of `steps`
    # > 0: stop (checkpoint, export) at the first step that ends this many minutes after train()
    # was called, data preparation included (single-process runs: a time budget on a lent device)
    c.train.max_minutes = 0.0
    c.train.batch_size = 8  # global, in sequences
    c.train.lr = 1e-3
    c.train.warmup_steps = 50
    c.train.end_lr_ratio = 0.05
    c.train.weight_decay = 0.0  # draft projectors start at the target's weights, not at zero
    c.train.clip_norm = 1.0
    c.train.b1 = 0.9
    c.train.b2 = 0.98
    c.train.ce_weight = 1.0
    c.train.kl_weight = 0.0
    # > 0: the KL is to the target's top-k next-token distribution (renormalised), which
    # train.cache_clean then keeps on disk with the K/V; 0: to the whole distribution (live)
    c.train.kl_topk = 0
    c.train.gamma = 0.0  # position decay exp(-(j-1)/gamma); 0 = uniform
    c.train.bonus = "data"  # calibration bonus: token at p ("data") or target argmax at p-1
    c.train.cache_clean = False  # precompute deep-layer clean K/V once (needs kl 0, bonus "data")
    c.train.cache_clean_dtype = "bfloat16"
    # > 0: the draft's lm_head / calibration output layer over the N response tokens seen most
    # often (as decoding's EngineConfig.draft_vocab_size uses them); 0: the whole vocabulary.
    c.train.draft_vocab_size = 0
    c.train.init_from = ""  # a release-format draft dir or a previous stage's workdir
    c.train.log_every = 10
    c.train.ckpt_every = 250
    c.train.keep_checkpoints = 2
    c.train.export_release = True  # workdir/draft_release at the end

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 0  # > 0: held-out teacher-forced tau every N steps (and at the end)
    c.eval.sets = ("humaneval",)  # held-out prompt sets: "humaneval" (code), "sharegpt" (chat)
    c.eval.num_prompts = 24  # per set (chat template), greedy target responses
    c.eval.max_new_tokens = 96
    c.eval.seq_len = 512

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (1, -1, 1)
    c.mesh.expected_devices = 0  # pod configs: device count for the abstract sharding check
    return c
