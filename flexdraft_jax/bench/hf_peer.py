"""The `transformers` peer row (`--hf_baseline`): `generate` on the same weights, torch float32.

Greedy only; timed like the engine's rows (a warm-up decode excluded, the prefill measured as a
separate one-token `generate` per batch) and compared with AR's outputs token for token.
"""

from __future__ import annotations

import logging
import os
import time

from tqdm.auto import tqdm

from flexdraft_jax.bench.rows import speed_fields, speedups
from flexdraft_jax.checkpoints.hf import state_dict_from_params

log = logging.getLogger(__name__)

HF_MODE = "hf_transformers"


def load_hf_model(source: str | None):
    """The same target in `transformers` (torch, float32): HF directory, .gguf file or embedded."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    if source is None:
        from flexdraft_jax.checkpoints.default import default_gguf_path

        source = default_gguf_path()
    if os.path.isdir(source):
        model = AutoModelForCausalLM.from_pretrained(source, torch_dtype=torch.float32)
    elif source.endswith(".gguf"):
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(source) or ".",
            gguf_file=os.path.basename(source),
            torch_dtype=torch.float32,
        )
    else:
        raise ValueError(
            f"hf baseline: expected a Hugging Face directory or a .gguf file: {source}"
        )
    return model.eval()


def hf_model_from_params(cfg, params):
    """The target as a `transformers` Llama model built from our own parameters (float32), or
    None when its configuration is not plain Llama. For the embedded GGUF this skips a second
    import of the file, which `transformers` parses twice (config and weights): ~17 s here."""
    plain = not (cfg.rope_scaling or cfg.attention_bias or cfg.o_proj_bias or cfg.qk_norm)
    if cfg.arch != "llama" or not plain:
        return None
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights

    torch.set_num_threads(os.cpu_count() or 1)
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )  # fmt: skip
    with no_init_weights():  # every weight is overwritten below: skip the random init (~2 s)
        model = LlamaForCausalLM(hf_cfg).to(torch.float32)
    state = {k: torch.from_numpy(v) for k, v in state_dict_from_params(cfg, params).items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"hf peer: tensors missing {missing}, unexpected {unexpected}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


_HF_CACHE: dict = {}


def hf_generate(model, batch, max_new_tokens: int, eos_ids, pad_id: int = 0):
    """Greedy `generate` on a left-padded batch -> (tokens per prompt up to its EOS, seconds)."""
    import torch

    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    eos = list(eos_ids)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos or None,
            pad_token_id=pad_id,
        )
    secs = time.perf_counter() - t0
    tokens = []
    for row in out[:, width:].tolist():
        cut = len(row)
        for j, t in enumerate(row):
            if t in eos:
                cut = j + 1
                break
        tokens.append(row[:cut])
    return tokens, secs


def hf_row(
    source, batches, max_new_tokens, cfg, eos_ids, ar_row, ar_outputs, repeats, temp,
    slow_seconds=float("inf"), target=None,
):  # fmt: skip
    """The `transformers` peer row at one batch size (greedy; warm-up decode excluded): the mean
    of `repeats` passes over the batches, or of one when it took over `slow_seconds` (the
    harness's rule for modes far slower than AR: more passes could not change the verdict).
    source None: the embedded target, built from `target` (our params) where it can be."""
    if temp != 0.0:
        log.warning("hf baseline is greedy only; temperature %s ignored for it", temp)
    key = source or "<embedded>"
    if key not in _HF_CACHE:
        _HF_CACHE.clear()
        model = None if source or target is None else hf_model_from_params(cfg, target)
        _HF_CACHE[key] = model if model is not None else load_hf_model(source)
    model = _HF_CACHE[key]
    eos = tuple(cfg.eos_token_ids if eos_ids is None else eos_ids)
    hf_generate(model, batches[0], min(2, max_new_tokens), eos)  # warm-up
    outputs, tokens, seconds, prefill, seqs = [], 0, 0.0, 0.0, 0
    for _ in tqdm(range(repeats), desc="transformers generate", leave=False):
        if seconds > slow_seconds:
            break
        outputs = []
        for b in batches:
            prefill += hf_generate(model, b, 1, eos)[1]  # the prefill and its first token
            toks, secs = hf_generate(model, b, max_new_tokens, eos)
            outputs.extend(toks)
            tokens += sum(len(t) for t in toks)
            seconds += secs
            seqs += len(b)
    row = {
        "mode": HF_MODE,
        "engine_mode": HF_MODE,
        "batch_size": len(batches[0]),
        "temperature": 0.0,
        "num_batches": len(batches),
        "tau": 1.0,
        "per_position_acceptance": [],
        "tokens": tokens,
        "seconds": seconds,
        "prefill_seconds": prefill,  # measured as a separate 1-token generate per batch
        **speed_fields(tokens, seconds, prefill, seqs),
        "outputs_match_ar": (outputs == ar_outputs) if ar_outputs is not None else None,
        "branch_counts": {},
        "step_cost": {},
        "rows_per_branch": {},
    }
    return {**row, **speedups(row, ar_row)}
