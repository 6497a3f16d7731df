"""A `transformers` fast tokenizer built from a GGUF file's metadata, without torch.

`transformers` can build a tokenizer from a GGUF file (`AutoTokenizer.from_pretrained(dir,
gguf_file=...)`), but its GGUF *reader* imports torch. We read the metadata with `gguf` instead and
hand it to transformers' own tokenizer conversion (`convert_gguf_tokenizer`, torch-free), then wrap
the result exactly as `TokenizersBackend.__init__` does for a `gguf_file`: same vocabulary, merges,
pre-tokenizer, special tokens and chat template, so encode/decode match transformers token for token
(tested in tests/test_gguf.py).

  gguf_tokenizer(path_or_reader) -> TokenizersBackend (a PreTrainedTokenizerBase)
  apply_chat(tokenizer, prompt)   -> the prompt as one user turn, with the generation prompt
  encode_prompt(tokenizer, prompt, chat) -> token ids of that turn (chat) or of the raw text
"""

from __future__ import annotations

from flexdraft_jax.checkpoints.gguf import open_gguf, read_metadata

# tokenizer.ggml.* ids that name the special-token strings (as transformers' get_gguf_tokenizer).
_SPECIAL_TOKENS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def tokenizer_inputs(meta: dict) -> tuple[str, dict, dict]:
    """(architecture, tokenizer_dict, tokenizer_config) from GGUF metadata, in the form that
    transformers' `convert_gguf_tokenizer` and `TokenizersBackend` expect (`get_gguf_tokenizer`
    without its torch-importing reader)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING

    if "tokenizer.ggml.tokens" not in meta:
        raise ValueError("the GGUF file carries no tokenizer (no tokenizer.ggml.tokens)")
    grouped = {
        group: {
            name: meta[f"tokenizer.{key}"]
            for key, name in renames.items()
            if f"tokenizer.{key}" in meta
        }
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tok, tok_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tok.get("tokenizer_type") == "llama":
        tok_config.setdefault("add_bos_token", True)  # llama.cpp's default for sentencepiece
    for name, key in _SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        tok_config[name] = tok["tokens"][token_id] if token_id is not None else None
    return meta["general.architecture"], tok, tok_config


def gguf_tokenizer(path_or_reader):
    """Fast tokenizer (transformers `TokenizersBackend`) from a GGUF path or a `gguf.GGUFReader`."""
    from transformers import TokenizersBackend
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    reader = open_gguf(path_or_reader) if isinstance(path_or_reader, str) else path_or_reader
    arch, tok_dict, tok_config = tokenizer_inputs(read_metadata(reader))
    backend, extra = convert_gguf_tokenizer(arch, tok_dict)
    return TokenizersBackend(tokenizer_object=backend, **tok_config, **extra)


def apply_chat(tokenizer, prompt: str, system: str | None = None) -> str:
    """`prompt` as a single user turn (after an optional system turn), ending with the assistant's
    generation prompt, rendered with the tokenizer's chat template (from the GGUF metadata)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat template (a GGUF without tokenizer.chat_template, or a "
            "tokenizer_config.json without chat_template): encode the raw text instead "
            "(chat=False; --nochat; data.chat_template=False)"
        )
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, prompt: str, chat: bool = True) -> list[int]:
    """Token ids of `prompt` as one user turn rendered by `apply_chat` (chat: the template
    places the special tokens, so none are added), or of the raw text with the tokenizer's
    usual special tokens (a BOS where it adds one)."""
    if tokenizer is None:
        raise ValueError("this checkpoint has no tokenizer: text prompts cannot be encoded")
    if chat:
        return list(tokenizer.encode(apply_chat(tokenizer, prompt), add_special_tokens=False))
    return list(tokenizer.encode(prompt))
