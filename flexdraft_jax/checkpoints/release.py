"""Import/export of the public FlexDraft release's draft checkpoint layout (DESIGN §2.6).

A release draft is a directory with `config.json` and `model.safetensors` (or shards with a
`model.safetensors.index.json`). Tensors use torch layout ([out, in] for linear weights):

  layers.{i}.self_attn.{q,k,v,o}_proj.weight     [N*D, H] / [K*D, H] / [K*D, H] / [H, N*D]
  layers.{i}.self_attn.{q,k,v}_proj.bias         Qwen2-style targets only (attention_bias)
  layers.{i}.self_attn.{q,k}_norm.weight         [D], Qwen3-style targets only (qk_norm)
  mask_embedding                                 [H]
  anchor_bias_mlp.0.{weight,bias}                [r, 2H], [r]   calibration fc1
  anchor_bias_mlp.2.{weight,bias}                [V, r], [V]    calibration fc2
  draft_vocab                                    int32 [V]      ours, optional: token ids by
                                                 frequency in the training responses, for a
                                                 restricted draft vocabulary (`load_draft_vocab`)

Ours, optional: with `anchor_bias_rows: n` in the flexdraft config, fc2 holds only the rows of
`draft_vocab[:n]` ([n, r], [n]), the ids the draft was trained over; every other row loads as zero
(no correction). A restricted draft never reads those rows, and they are most of the file.

Draft layer `i` pairs with target layer `target_layer_ids[i]`. `config.json` carries, under the
key `flexdraft_config` (older files: `dflash_config`), the fields `target_layer_ids`,
`block_size`, `enable_anchor_bias_logits` and `anchor_bias_rank`. Other keys of the release files
(`layers.*.mlp.*`, `layers.*.input_layernorm.*`, `norm.weight`: copies of the frozen target) are
ignored: our model shares those with the target.

Our draft tree (see `models/transformer.py`) puts the draft projectors in the final D layers, so
`target_layer_ids` must be exactly `[L-D, ..., L-1]`; anything else is rejected, not remapped.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy before safetensors reads it)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from flexdraft_jax.models.config import DraftConfig, ModelConfig

CONFIG_KEYS = ("flexdraft_config", "dflash_config")  # the first is written, both are read
ACCEPTANCE_KEY = "heldout_acceptance"  # ours, optional: see `save_release`
CONFIDENCE_KEY = "prefill_confidence"  # ours, optional: see `save_release`
VOCAB_SIZE_KEY = "draft_vocab_size"  # ours, optional: see `save_release`
FINGERPRINT_KEY = "target_fingerprint"  # ours, optional: see `save_release`
ROWS_KEY = "anchor_bias_rows"  # ours, optional: see the module docstring
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


# ----------------------------------------------------------------------------- reading


def _check_vocab(ids: np.ndarray, cfg: ModelConfig, where: str) -> np.ndarray:
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{where}: draft vocabulary must be a non-empty 1-D integer array")
    if ids.min() < 0 or ids.max() >= cfg.vocab_size or len(np.unique(ids)) != ids.size:
        raise ValueError(
            f"{where}: draft vocabulary must hold distinct token ids in [0, {cfg.vocab_size})"
        )
    return ids.astype(np.int32)


def load_draft_vocab(path: str, cfg: ModelConfig) -> np.ndarray | None:
    """The release's `draft_vocab` (token ids, most frequent first), or None if it has none."""
    _, files = _resolve(path)
    for fname in files:
        with safe_open(fname, framework="numpy") as f:
            if "draft_vocab" in f.keys():
                return _check_vocab(f.get_tensor("draft_vocab"), cfg, fname)
    return None


def _check_vocab_size(n, vocab_len: int, where: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= vocab_len:
        raise ValueError(
            f"{where}: draft_vocab_size must be an integer in [0, {vocab_len}] (the leading ids of "
            f"the draft vocabulary the draft was trained over; 0 = all), got {n!r}"
        )
    return int(n)


def _recorded(path: str, key: str):
    """(value, config.json path) of an optional key of the release's flexdraft config, or
    (None, None) when the release has no config.json or no such key."""
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    where = os.path.join(directory, "config.json")
    if not os.path.exists(where):
        return None, None
    return _read_flexdraft_config(directory).get(key), where


def load_draft_vocab_size(path: str, cfg: ModelConfig) -> int | None:
    """The number of leading `draft_vocab` ids the draft was trained over (0: all), as its
    config.json records it; None if it records none."""
    n, where = _recorded(path, VOCAB_SIZE_KEY)
    return None if n is None else _check_vocab_size(n, cfg.vocab_size, where)


def _check_acceptance(acc, block_size: int, where: str, what: str = "acceptance") -> np.ndarray:
    try:
        a = np.asarray(acc, np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {what} must be numbers, got {acc!r}") from e
    if a.shape != (block_size - 1,) or not ((a >= 0) & (a <= 1)).all():
        raise ValueError(
            f"{where}: {what} must be {block_size - 1} values in [0, 1] (one per draft "
            f"position of a block of {block_size}), got {acc!r}"
        )
    return a


def load_acceptance(path: str, block_size: int) -> np.ndarray | None:
    """The held-out acceptance per draft position a release records (None if it has none)."""
    acc, where = _recorded(path, ACCEPTANCE_KEY)
    return None if acc is None else _check_acceptance(acc, block_size, where)


def load_prefill_confidence(path: str, block_size: int) -> np.ndarray | None:
    """The mean prefill-draft confidence per draft position a release records (None if none)."""
    conf, where = _recorded(path, CONFIDENCE_KEY)
    return None if conf is None else _check_acceptance(conf, block_size, where, "confidence")


def load_target_fingerprint(path: str) -> str | None:
    """The fingerprint of the target a release was trained for (`models.draft`), or None."""
    fp, where = _recorded(path, FINGERPRINT_KEY)
    if fp is not None and not isinstance(fp, str):
        raise ValueError(f"{where}: {FINGERPRINT_KEY} must be a string, got {fp!r}")
    return fp


def _resolve(path: str) -> tuple[str, list[str]]:
    """dir_or_file -> (directory holding config.json, safetensors files)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"release checkpoint {path} does not exist")
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise ValueError(f"{path} is not a .safetensors file or a checkpoint directory")
        return os.path.dirname(os.path.abspath(path)), [path]
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            try:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise ValueError(f"corrupt safetensors index {index}: {e}") from e
        files = [os.path.join(path, s) for s in shards]
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {missing}")
        return path, files
    single = os.path.join(path, WEIGHTS_FILE)
    files = (
        [single]
        if os.path.exists(single)
        else sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    )
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    return path, files


def _read_flexdraft_config(directory: str) -> dict:
    cfg_file = os.path.join(directory, "config.json")
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"{directory} has no config.json (needed for target_layer_ids)")
    with open(cfg_file) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"corrupt {cfg_file}: {e}") from e
    for key in CONFIG_KEYS:
        if isinstance(raw.get(key), dict):
            fd = dict(raw[key])
            # Older files keep block_size at the top level only.
            fd.setdefault("block_size", raw.get("block_size"))
            return fd
    raise ValueError(f"{cfg_file} has no {' or '.join(map(repr, CONFIG_KEYS))} section")


class _Tensors:
    """Lazy tensor access across safetensors files: only the tensors asked for are read."""

    def __init__(self, files: list[str]):
        self._where = {}
        for fname in files:
            try:
                with safe_open(fname, framework="numpy") as f:
                    for name in f.keys():
                        self._where[name] = fname
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise ValueError(f"cannot read safetensors file {fname}: {e}") from e
        self.files = files

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        if name not in self._where:
            raise KeyError(f"release checkpoint ({', '.join(self.files)}) is missing {name!r}")
        with safe_open(self._where[name], framework="numpy") as f:
            x = f.get_tensor(name)
        if tuple(x.shape) != tuple(shape):
            raise ValueError(
                f"tensor {name!r} has shape {tuple(x.shape)}, "
                f"the target config needs {tuple(shape)}"
            )
        return np.asarray(x).astype(dtype)


def _check_layer_ids(cfg: ModelConfig, ids) -> int:
    """target_layer_ids must be the final D layers, contiguous and in order. Returns D."""
    if not isinstance(ids, (list, tuple)) or not ids or not all(isinstance(i, int) for i in ids):
        raise ValueError(f"target_layer_ids must be a non-empty list of ints, got {ids!r}")
    depth = len(ids)
    want = list(range(cfg.num_layers - depth, cfg.num_layers))
    if list(ids) != want:
        raise ValueError(
            f"target_layer_ids {list(ids)} are not the final {depth} layers of the "
            f"{cfg.num_layers}-layer target (expected {want}); this model only puts draft "
            "projectors in the last D layers"
        )
    return depth


def _reject_if_nonzero(t: _Tensors, name: str, shape, why: str) -> None:
    """Tensors our model cannot represent are accepted only when they are no-ops (zeros)."""
    if name in t and np.any(t.get(name, shape, np.float32)):
        raise ValueError(f"{name!r} is nonzero but {why}")


def load_release(path: str, cfg: ModelConfig, dtype=np.float32) -> tuple[DraftConfig, dict]:
    """Load a release-format draft for the target `cfg` -> (DraftConfig, draft params as numpy).

    `path` is the checkpoint directory or one of its .safetensors files (config.json beside it).
    Weights are converted to `dtype` (float32 by default, whatever the file stores).
    """
    directory, files = _resolve(path)
    fd = _read_flexdraft_config(directory)
    if "target_layer_ids" not in fd:
        raise ValueError(f"{directory}/config.json: flexdraft config has no target_layer_ids")
    depth = _check_layer_ids(cfg, fd["target_layer_ids"])
    if fd.get("block_size") is None:
        raise ValueError(f"{directory}/config.json: flexdraft config has no block_size")
    use_calib = bool(fd.get("enable_anchor_bias_logits", False))
    rank = int(fd.get("anchor_bias_rank", 256))
    dcfg = DraftConfig(
        depth=depth, block_size=int(fd["block_size"]), calib_rank=rank, use_calibration=use_calib
    )
    t = _Tensors(files)

    h, v, hd = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    out_dim = {
        "q_proj": cfg.num_heads * hd,
        "k_proj": cfg.num_kv_heads * hd,
        "v_proj": cfg.num_kv_heads * hd,
        "o_proj": h,
    }
    in_dim = {**{p: h for p in ("q_proj", "k_proj", "v_proj")}, "o_proj": cfg.num_heads * hd}

    def layer(i):
        pre = f"layers.{i}.self_attn."
        attn = {}
        for p in _PROJ:
            entry = {"kernel": t.get(pre + f"{p}.weight", (out_dim[p], in_dim[p]), dtype).T}
            if p != "o_proj" and cfg.attention_bias:
                entry["bias"] = t.get(pre + f"{p}.bias", (out_dim[p],), dtype)
            elif p != "o_proj":
                _reject_if_nonzero(t, pre + f"{p}.bias", (out_dim[p],), "attention_bias=False")
            attn[p] = entry
        if cfg.o_proj_bias:
            attn["o_proj"]["bias"] = t.get(pre + "o_proj.bias", (h,), dtype)
        else:
            _reject_if_nonzero(t, pre + "o_proj.bias", (h,), "the target's o_proj has no bias")
        if cfg.qk_norm:
            for n in ("q_norm", "k_norm"):
                attn[n] = {"scale": t.get(pre + f"{n}.weight", (hd,), dtype)}
        elif pre + "q_norm.weight" in t or pre + "k_norm.weight" in t:
            raise ValueError(
                f"{pre}q_norm/k_norm present but the target config has qk_norm=False "
                f"(a Qwen3-style drafter for a {cfg.arch} target?)"
            )
        return attn

    layers = [layer(i) for i in range(depth)]
    if f"layers.{depth}.self_attn.q_proj.weight" in t:
        raise ValueError(
            f"checkpoint has more draft layers than its {depth} target_layer_ids "
            f"{fd['target_layer_ids']}"
        )
    stacked = {
        k: {kk: np.stack([ly[k][kk] for ly in layers]) for kk in layers[0][k]} for k in layers[0]
    }

    if use_calib:
        w1 = t.get("anchor_bias_mlp.0.weight", (rank, 2 * h), dtype)
        b1 = t.get("anchor_bias_mlp.0.bias", (rank,), dtype)
        rows = fd.get(ROWS_KEY)
        if rows is None:
            w2 = t.get("anchor_bias_mlp.2.weight", (v, rank), dtype)
            b2 = t.get("anchor_bias_mlp.2.bias", (v,), dtype)
        else:  # only the trained rows are stored: scatter them into zeros
            where = f"{directory}/config.json"
            ids = load_draft_vocab(path, cfg)
            if ids is None:
                raise ValueError(f"{where}: {ROWS_KEY} counts rows of a draft_vocab it lacks")
            ids = ids[: _check_vocab_size(rows, len(ids), where) or len(ids)]
            w2, b2 = np.zeros((v, rank), dtype), np.zeros((v,), dtype)
            w2[ids] = t.get("anchor_bias_mlp.2.weight", (len(ids), rank), dtype)
            b2[ids] = t.get("anchor_bias_mlp.2.bias", (len(ids),), dtype)
    else:  # disabled in the release: a zero MLP is an exact no-op
        w1, b1 = np.zeros((rank, 2 * h), dtype), np.zeros((rank,), dtype)
        w2, b2 = np.zeros((v, rank), dtype), np.zeros((v,), dtype)
    draft = {
        "mask_embedding": t.get("mask_embedding", (h,), dtype),
        "layers": stacked,
        "calibration": {
            "fc1": {"kernel": w1.T, "bias": b1},
            "fc2": {"kernel": w2.T, "bias": b2},
        },
    }
    return dcfg, draft


# ----------------------------------------------------------------------------- writing


def release_tensors(cfg: ModelConfig, dcfg: DraftConfig, draft: dict, dtype=np.float32) -> dict:
    """Our draft tree -> {release tensor name: numpy array in torch layout, cast to `dtype`}."""
    cast = lambda x: np.ascontiguousarray(np.asarray(x, np.float32).astype(dtype))
    s = dcfg.split(cfg)
    layers = draft["layers"]
    got = np.shape(layers["q_proj"]["kernel"])
    want = (dcfg.depth, cfg.hidden_size, cfg.num_heads * cfg.head_dim)
    if got != want:
        raise ValueError(f"draft q_proj kernel has shape {got}, config needs {want}")
    out = {"mask_embedding": cast(draft["mask_embedding"])}
    for i in range(cfg.num_layers - s):
        pre = f"layers.{i}.self_attn."
        for p in _PROJ:
            out[pre + f"{p}.weight"] = cast(np.asarray(layers[p]["kernel"][i]).T)
            if p != "o_proj" and cfg.attention_bias:
                out[pre + f"{p}.bias"] = cast(layers[p]["bias"][i])
        if cfg.o_proj_bias:
            out[pre + "o_proj.bias"] = cast(layers["o_proj"]["bias"][i])
        elif cfg.attention_bias:  # the release's attention gives o_proj a bias too: zeros
            out[pre + "o_proj.bias"] = cast(np.zeros((cfg.hidden_size,), np.float32))
        if cfg.qk_norm:
            for n in ("q_norm", "k_norm"):
                out[pre + f"{n}.weight"] = cast(layers[n]["scale"][i])
    if dcfg.use_calibration:
        cal = draft["calibration"]
        out["anchor_bias_mlp.0.weight"] = cast(np.asarray(cal["fc1"]["kernel"]).T)
        out["anchor_bias_mlp.0.bias"] = cast(cal["fc1"]["bias"])
        out["anchor_bias_mlp.2.weight"] = cast(np.asarray(cal["fc2"]["kernel"]).T)
        out["anchor_bias_mlp.2.bias"] = cast(cal["fc2"]["bias"])
    return out


def release_config(cfg: ModelConfig, dcfg: DraftConfig, dtype_name: str = "float32") -> dict:
    """config.json of a release draft: the flexdraft section plus the shape fields it describes."""
    s = dcfg.split(cfg)
    return {
        "architectures": ["FlexDraftBiasModel"],
        "model_type": cfg.arch,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": dcfg.depth,
        "num_target_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "attention_bias": cfg.attention_bias,
        "block_size": dcfg.block_size,
        "torch_dtype": dtype_name,
        CONFIG_KEYS[0]: {
            "target_layer_ids": list(range(s, cfg.num_layers)),
            "block_size": dcfg.block_size,
            "enable_anchor_bias_logits": dcfg.use_calibration,
            "anchor_bias_rank": dcfg.calib_rank,
        },
    }


def save_release(
    path: str,
    cfg: ModelConfig,
    dcfg: DraftConfig,
    draft: dict,
    dtype: str = "float32",
    overwrite: bool = True,
    vocab=None,
    acceptance=None,
    vocab_size=None,
    target_fingerprint: str | None = None,
    prefill_confidence=None,
    trained_rows_only: bool = True,
) -> str:
    """Write `draft` as a release-format directory (config.json + model.safetensors) at `path`.

    vocab: optional token ids ordered by how often the draft should propose them (stored as the
    `draft_vocab` tensor; `decoding` keeps the first `EngineConfig.draft_vocab_size` of them).
    vocab_size: optional, with `vocab`: how many of those ids the draft was trained over (0: all;
    stored in config.json, read by `load_draft_vocab_size`): decoding's default draft vocabulary.
    acceptance: optional held-out conditional acceptance of each draft position (block_size - 1
    values; stored in config.json, read by `load_acceptance`): flex decoding's starting estimate.
    prefill_confidence: optional, with `acceptance`: the mean confidence of each draft position
    in the prefill's block on the same held-out prompts (read by `load_prefill_confidence`):
    flex scales a prompt's own prefill confidence by acceptance / this into its prior.
    target_fingerprint: optional `models.draft.target_fingerprint` of the target the draft was
    trained for (stored in config.json): loading it for another target is refused.
    trained_rows_only: with `vocab_size` n > 0, store only the calibration fc2 rows of the first n
    ids of `vocab` (the others load as zeros); for a real vocabulary most of the file is fc2.

    dtype: "float32", "bfloat16" or "float16". The write is atomic: everything goes to a temporary
    directory beside `path` that is renamed into place at the end, so a failure leaves either the
    previous checkpoint or nothing, never a half-written one. Returns `path`.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{path} exists and is not a directory")
    tensors = release_tensors(cfg, dcfg, draft, _DTYPES[dtype])
    if vocab is not None:
        tensors["draft_vocab"] = _check_vocab(np.asarray(vocab), cfg, "vocab")
    if vocab_size is not None and vocab is None:
        raise ValueError("vocab_size needs the draft vocabulary (vocab) it counts ids of")
    config = release_config(cfg, dcfg, dtype)
    if vocab_size is not None:
        n = _check_vocab_size(vocab_size, len(tensors["draft_vocab"]), "vocab_size")
        config[CONFIG_KEYS[0]][VOCAB_SIZE_KEY] = n
        if trained_rows_only and n and dcfg.use_calibration:
            ids = tensors["draft_vocab"][:n]
            for name in ("anchor_bias_mlp.2.weight", "anchor_bias_mlp.2.bias"):
                tensors[name] = np.ascontiguousarray(tensors[name][ids])
            config[CONFIG_KEYS[0]][ROWS_KEY] = n
    if acceptance is not None:
        acc = _check_acceptance(acceptance, dcfg.block_size, "acceptance")
        config[CONFIG_KEYS[0]][ACCEPTANCE_KEY] = [round(float(a), 4) for a in acc]
    if prefill_confidence is not None:
        if acceptance is None:
            raise ValueError("prefill_confidence needs the acceptance it calibrates (acceptance)")
        conf = _check_acceptance(prefill_confidence, dcfg.block_size, "prefill_confidence",
                                 "confidence")  # fmt: skip
        config[CONFIG_KEYS[0]][CONFIDENCE_KEY] = [round(float(a), 4) for a in conf]
    if target_fingerprint is not None:
        config[CONFIG_KEYS[0]][FINGERPRINT_KEY] = str(target_fingerprint)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        # mkdtemp's 0700 and safetensors' 0600 would keep a shared release from other users
        os.chmod(tmp, 0o755)
        for name in (WEIGHTS_FILE, "config.json"):
            os.chmod(os.path.join(tmp, name), 0o644)
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.rename(path, os.path.join(old, "ckpt"))
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(os.path.join(old, "ckpt"), path)  # put the previous checkpoint back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
