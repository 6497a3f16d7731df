"""The package's layers: imports point one way (DESIGN §4, docs/design.md "Layout").

Every module under flexdraft_jax/ is parsed with `ast` (nothing is imported) and each import of
the package, at the top of a file or inside a function, is checked against LAYERS: a part imports
only parts of a lower layer, never one of its own layer or above. So recipes (loading, the demo,
the accelerator check) sit above bench, training and decoding, and none of those imports recipes;
training and bench, one layer, never import each other. `common` and `checkpoints/parts.py` import
only the standard library, because an offline host runs parts.py before anything is installed.
"""

from __future__ import annotations

import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "flexdraft_jax")

# The part a module belongs to (its subpackage, or the top-level module) -> its layer.
LAYERS = {
    "common": 0,
    "kernels": 1,
    "prompts": 1,
    "compilation": 1,
    "sharding": 1,
    "models": 2,
    "checkpoints": 3,
    "decoding": 3,
    "training": 4,
    "bench": 4,
    "recipes": 5,
}
STDLIB_ONLY = ("flexdraft_jax/common.py", "flexdraft_jax/checkpoints/parts.py")


def _modules() -> list[str]:
    out = []
    for dirpath, _, files in os.walk(PACKAGE):
        out += [os.path.join(dirpath, f) for f in files if f.endswith(".py")]
    return sorted(out)


def _part(path: str) -> str:
    rel = os.path.relpath(path, PACKAGE).split(os.sep)
    return rel[0] if len(rel) > 1 else os.path.splitext(rel[0])[0]


def _imports(path: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in the file; `from a import b` gives a.b too, so that
    `from flexdraft_jax import recipes` counts as an import of recipes."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.ImportFrom):  # relative: the package uses absolute imports
            out.append((node.lineno, "." * node.level + (node.module or "")))
    return out


def test_every_part_has_a_layer():
    parts = {_part(p) for p in _modules()} - {"__init__"}
    assert parts == set(LAYERS), f"parts without a layer: {parts - set(LAYERS)}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: os.path.relpath(p, ROOT))
def test_imports_point_down(path):
    part = _part(path)
    if part == "__init__":
        return
    bad = []
    for line, name in _imports(path):
        if name.startswith("."):
            bad.append(f"line {line}: relative import {name}")
            continue
        bits = name.split(".")
        if bits[0] != "flexdraft_jax" or len(bits) < 2 or bits[1] == part:
            continue
        other = bits[1]
        if other not in LAYERS:  # `from flexdraft_jax import x` names a part: only x counts
            continue
        if LAYERS[other] >= LAYERS[part]:
            bad.append(f"line {line}: {name} (layer {LAYERS[other]} >= {part}'s {LAYERS[part]})")
    assert not bad, f"{os.path.relpath(path, ROOT)} imports upward or sideways:\n" + "\n".join(bad)


@pytest.mark.parametrize("rel", STDLIB_ONLY)
def test_stdlib_only(rel):
    allowed = set(sys.stdlib_module_names) | {"__future__"}
    bad = [
        f"line {line}: {name}"
        for line, name in _imports(os.path.join(ROOT, rel))
        if name.split(".")[0] not in allowed and not name.startswith("flexdraft_jax.common")
        and name != "flexdraft_jax"
    ]  # fmt: skip
    assert not bad, f"{rel} must import only the standard library (and common):\n" + "\n".join(bad)
