"""Small helpers that every layer of the package shares, one copy each.

round_up(n, multiple)              -> the smallest multiple of `multiple` that is >= n
atomic_path(path)                  context manager: a temporary path beside `path` that replaces it
                                   when the block ends without an error (np.save, savefig, ...)
write_atomic(path, data)           bytes or text to `path` through a temporary file and a rename
write_json_atomic(path, obj)       JSON the same way

Atomic writes leave either the old file or the new one, never a half-written file, whatever
interrupts them (a crash, a preempted host, a full disk). The module imports nothing but the
standard library and nothing else of the package: it is the bottom layer, and
`checkpoints/parts.py`, which an offline host runs before any dependency is installed, uses it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= `n` (static shapes padded to buckets)."""
    return -(-n // multiple) * multiple


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path in `path`'s folder (created if missing), ending in `path`'s
    extension so that writers which pick a format by it keep working; when the block ends
    without an error the file is renamed onto `path` (readable by all, 0644, as a plain open()
    under the usual umask would make it); on an error it is removed and `path` is untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(
        dir=folder, prefix=f".{name}.", suffix=".tmp" + os.path.splitext(name)[1]
    )
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would survive the rename
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_atomic(path: str, data: bytes | str) -> str:
    """Write `data` (bytes, or text as UTF-8) to `path` atomically. Returns `path`."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            with open(tmp, "wb") as f:
                f.write(data)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(data)
    return path


def write_json_atomic(path: str, obj, *, indent: int | None = 1) -> str:
    """Write `obj` as JSON to `path` atomically (indent None: one compact line, for large
    caches). Returns `path`."""
    return write_atomic(path, json.dumps(obj, indent=indent))
