"""The shared helpers of `flexdraft_jax.common` and `prompts.read_jsonl`: one copy each."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from flexdraft_jax import common, prompts


def test_round_up():
    assert [common.round_up(n, 8) for n in (0, 1, 8, 9, 16)] == [0, 8, 8, 16, 16]


def test_atomic_writes(tmp_path):
    path = str(tmp_path / "sub" / "r.json")  # the folder is made
    assert common.write_json_atomic(path, {"a": 1}) == path
    with open(path) as f:
        assert json.load(f) == {"a": 1}
    assert os.stat(path).st_mode & 0o777 == 0o644
    with pytest.raises(TypeError):  # not serialisable: the old file stays, no temporary is left
        common.write_json_atomic(path, {"a": object()})
    with open(path) as f:
        assert json.load(f) == {"a": 1}
    assert os.listdir(tmp_path / "sub") == ["r.json"]
    npy = str(tmp_path / "x.npy")
    with common.atomic_path(npy) as tmp:  # keeps the extension: np.save adds none
        np.save(tmp, np.arange(3))
    assert np.load(npy).tolist() == [0, 1, 2] and sorted(os.listdir(tmp_path)) == ["sub", "x.npy"]


def test_read_jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [{"prompt": "a"}, {"turns": ["b", "c"]}, {"prompt": "q", "response": "r"}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    want = [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "q", "response": "r"}]
    assert prompts.read_jsonl(str(path)) == want
    for bad, match in [
        ("{not json\n", "p.jsonl:1: not valid JSON"),
        ('{"text": "x"}\n', "string 'prompt'"),
        ('{"prompt": "x", "response": 3}\n', "'response' must be a string"),
        ("\n", "has no records"),
    ]:
        path.write_text(bad)
        with pytest.raises(ValueError, match=match):
            prompts.read_jsonl(str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prompts.read_jsonl(str(tmp_path / "missing.jsonl"))
