"""Loading for the launch scripts, the demo and the notebook: a target, a draft, prompts, a mesh.

load_target(path, dtype, attention_impl) -> (cfg, params as jnp, tokenizer), for decoding in
                                          `dtype` ("auto": bfloat16 on TPU/GPU, float32 on CPU)
load_draft(path, cfg, target, ...)     -> Draft (models.draft)          release dir or orbax dir,
                                          or untrained copies of the target's projectors; in the
                                          target's dtype
read_prompts(prompts, prompts_file)    -> list[str] ("prompt" or the first of "turns" per line)
encode(tokenizer, texts, chat)         -> list[list[int]]
decode_mesh(spec, cfg, target, draft)  -> the --mesh a Decoder runs on (None: one device)
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from flexdraft_jax import compilation
from flexdraft_jax import prompts as prompts_lib
from flexdraft_jax import sharding as shd
from flexdraft_jax.checkpoints.load import load_checkpoint
from flexdraft_jax.checkpoints.tokenizer import encode_prompt
from flexdraft_jax.models import precision
from flexdraft_jax.models import transformer as tf
from flexdraft_jax.models.config import ATTENTION_IMPLS, DraftConfig, ModelConfig
from flexdraft_jax.models.draft import Draft

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED_DRAFT = os.path.join(REPO_ROOT, "drafts", "smollm2_135m")


def load_target(path: str | None, *, dtype: str = "auto", attention_impl: str = "auto"):
    """A target for decoding: its weights in `dtype` (`precision.DTYPES`), its config's
    `attention_impl` set (`ModelConfig.attention_impl`)."""
    dt = precision.decode_dtype(dtype)
    cfg, params, tokenizer = load_checkpoint(path, dtype=dt)
    params = precision.cast_params(jax.tree.map(jnp.asarray, params), dt)
    return cfg.replace(attention_impl=attention_impl), params, tokenizer


def shipped_draft(checkpoint: str | None) -> str | None:
    """The draft shipped in the repository for the embedded default target, if present."""
    if checkpoint is None and os.path.exists(os.path.join(SHIPPED_DRAFT, "config.json")):
        return SHIPPED_DRAFT
    return None


def load_draft(
    path: str | None,
    cfg: ModelConfig,
    target,
    *,
    depth: int = 6,
    block_size: int = 8,
    calib_rank: int = 256,
    seed: int = 0,
    dtype=None,
):
    """A `Draft`: release-format directory / .safetensors, a training workdir, or (path None)
    untrained copies of the target's last `depth` layers' projectors (lossless, rarely accepted).
    Its parameters come in `dtype` (None: the target embedding's dtype, as decoding wants;
    float32 without a target). A release's draft vocabulary, the size it was trained over, its
    held-out acceptance and the fingerprint of its target come with it; with a `target`, a
    release trained for another target is refused."""
    if dtype is None:
        dtype = jnp.float32 if target is None else target["embed"]["embedding"].dtype
    if path is None:
        dcfg = DraftConfig(depth=depth, block_size=block_size, calib_rank=calib_rank)
        params = tf.init_draft(cfg, dcfg, target, jax.random.PRNGKey(seed))
        return Draft(precision.cast_params(params, dtype), dcfg)
    if not os.path.exists(path):
        raise FileNotFoundError(f"draft checkpoint {path} does not exist")
    if os.path.isdir(os.path.join(path, "draft_release")):  # a training workdir
        path = os.path.join(path, "draft_release")
    is_release = path.endswith(".safetensors") or os.path.exists(os.path.join(path, "config.json"))
    if not is_release:
        raise ValueError(
            f"{path} is neither a release-format draft (config.json + *.safetensors) nor a "
            "training workdir with draft_release/ (written when a training run finishes)"
        )
    from flexdraft_jax.checkpoints import release

    dcfg, params = release.load_release(path, cfg)
    params = precision.cast_params(jax.tree.map(jnp.asarray, params), dtype)
    vocab = release.load_draft_vocab(path, cfg)
    acceptance = release.load_acceptance(path, dcfg.block_size)
    confidence = release.load_prefill_confidence(path, dcfg.block_size)
    draft = Draft(
        params,
        dcfg,
        vocab=vocab,
        vocab_size=None if vocab is None else release.load_draft_vocab_size(path, cfg),
        acceptance=None if acceptance is None else tuple(float(a) for a in acceptance),
        target=release.load_target_fingerprint(path),
        prefill_confidence=None if confidence is None else tuple(float(c) for c in confidence),
    )
    if target is not None:
        draft.check_target(cfg, target, path)
    return draft


def define_decoding_flags() -> None:
    """The absl flags --dtype, --attention_impl, --compilation_cache and --mesh that generate,
    benchmark and the demo share."""
    from absl import flags

    flags.DEFINE_enum(
        "dtype", "auto", precision.DTYPES,
        "Target, draft and KV cache dtype (auto: bfloat16 on TPU/GPU, float32 on CPU); logits, "
        "softmax and verification are float32 either way.",
    )  # fmt: skip
    flags.DEFINE_enum(
        "attention_impl", "auto", ATTENTION_IMPLS,
        "Attention: the Pallas kernel (pallas), the XLA reference (xla), or Pallas on TPU/GPU and "
        "XLA on CPU (auto).",
    )  # fmt: skip
    flags.DEFINE_bool(
        "distributed", False,
        "jax.distributed.initialize() first (Cloud TPU auto-detection): every host of a pod slice "
        "runs the same command (launch/pod.py --job=generate|benchmark) and decodes as one SPMD "
        "program; process 0 prints and writes the results.",
    )  # fmt: skip
    flags.DEFINE_string(
        "compilation_cache", compilation.DEFAULT,
        "JAX's persistent compilation cache: a directory, 'none' (off), or 'default' "
        f"(${compilation.ENV} if set, else {compilation.DEFAULT_DIR}).",
    )  # fmt: skip
    flags.DEFINE_string(
        "mesh", "auto",
        "Devices to decode on, e.g. data:2,tensor:4 (batch over data; heads, FFN, vocabulary and "
        "the KV cache's heads over tensor). auto: every device on data where the model fits one "
        "device, else on tensor; a single device runs without a mesh.",
    )  # fmt: skip


def decode_mesh(spec: str | None, cfg: ModelConfig, target, draft=None, *, batch: int = 1,
                cache_len: int = 1024):  # fmt: skip
    """The launch scripts' --mesh: a spec ("data:2,tensor:4", `sharding.parse_mesh`), or "auto"
    / None: every device on "data" where the target, draft and a KV cache of `batch` x
    `cache_len` fit one device's memory (unknown on a CPU: taken to fit), else on "tensor"
    (`sharding.default_decode_mesh_shape`). Returns None (no mesh) for "auto" on one device."""
    n = jax.device_count()
    if spec in (None, "", "auto"):
        if n == 1:
            return None
        itemsize = jnp.dtype(target["embed"]["embedding"].dtype).itemsize
        kv = 2 * cfg.num_layers * batch * cache_len * cfg.num_kv_heads * cfg.head_dim * itemsize
        params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((target, draft)))
        stats = jax.local_devices()[0].memory_stats() or {}
        spec = shd.default_decode_mesh_shape(n, params + kv, stats.get("bytes_limit"))
    return shd.decode_mesh(spec)


def initialize(distributed: bool) -> bool:
    """`jax.distributed.initialize()` when asked (before any computation); returns whether this
    is process 0 (the one that prints and writes results)."""
    if distributed:
        jax.distributed.initialize()
    return jax.process_index() == 0


def mesh_name(mesh) -> str:
    """ "data:2,tensor:4" for a decoding mesh, "one device" for None."""
    if mesh is None:
        return "one device"
    return ",".join(f"{a}:{mesh.shape[a]}" for a in mesh.axis_names)


def read_prompts(prompts=(), prompts_file: str | None = None, limit: int | None = None) -> list:
    """Prompts from flags and/or a JSONL file (`prompts.read_jsonl`: "prompt" or the first of
    "turns" per line)."""
    out = list(prompts or [])
    if prompts_file:
        out += [rec["prompt"] for rec in prompts_lib.read_jsonl(prompts_file)]
    if not out:
        raise ValueError("no prompts: give --prompt or --prompts_file")
    return out[:limit] if limit else out


def encode(tokenizer, texts, chat: bool) -> list[list[int]]:
    """Each text's ids: one user turn with the chat template (chat), or the raw text."""
    return [encode_prompt(tokenizer, t, chat) for t in texts]
