"""The README as a front page: its Python example runs, and it stays short and free of run history.

The example is the first ```python block of README.md, run as written except for
`max_new_tokens`, which is cut to keep the test quick on CPU.
"""

import contextlib
import io
import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
MAX_LINES = 150
# A commit hash as a word: 7 to 40 hex digits holding at least one letter and one digit.
HASH = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")
# Phrases that tell the history of runs rather than what is true now (STYLE habit 12).
HISTORY = ("this session", "one test run", "previous demo", "an earlier rule", "under the previous")


def _readme() -> str:
    with open(README, encoding="utf-8") as f:
        return f.read()


def _example(text: str) -> str:
    m = re.search(r"```python\n(.*?)```", text, re.S)
    assert m, "README.md has no ```python block"
    return m.group(1)


def test_readme_is_a_front_page():
    text = _readme()
    n = len(text.splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines, over {MAX_LINES}: move detail into docs/"
    hashes = HASH.findall(text)
    assert not hashes, f"README.md names commit hashes {hashes}"
    history = [p for p in HISTORY if p in text.lower()]
    assert not history, f"README.md tells run history: {history}"
    assert len(_example(text).strip().splitlines()) <= 15, "the README example is over 15 lines"


def test_readme_example_runs():
    src = _example(_readme())
    src, n = re.subn(r"^max_new_tokens = \d+$", "max_new_tokens = 32", src, flags=re.M)
    assert n == 1, "the README example no longer sets max_new_tokens on a line of its own"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(src, "README.md", "exec"), {"__name__": "readme_example"})
    lines = out.getvalue().splitlines()
    texts = [ln for ln in lines if " -> " in ln]
    assert texts and all(ln.split(" -> ", 1)[1].strip() for ln in texts), out.getvalue()
    tau = [ln for ln in lines if ln.startswith("tau ")]
    assert len(tau) == 1, out.getvalue()
    assert float(tau[0].split()[1]) >= 1.0
