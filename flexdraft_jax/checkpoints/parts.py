"""Files cut into checksummed parts, for transfers that cap the size of what one call carries.

  split_file(path, part_bytes)        -> manifest path; PATH.part-000, PATH.part-001, ... beside
                                         PATH, and PATH.parts.json naming each part's size and
                                         SHA-256 and the whole file's
  join_file(manifest, dest=None)      -> the joined file, every part and the whole checked
  split_large_files(folder, limit)    -> the files over `limit` bytes under `folder`, split
  join_folder(folder)                 -> every manifest under `folder` joined

Used to bring the 98 MB SmolLM2 wheel to a host that takes 64 MiB per transfer, and to bring a
trained draft (one of its tensors alone is 24 MiB) back through files of at most 16 MiB. Standard
library only (and the package's stdlib-only `common`), so an offline host can run it before
anything else is installed:

  python -m flexdraft_jax.checkpoints.parts split FILE --part_mib=24 [--out_dir=DIR]
  python -m flexdraft_jax.checkpoints.parts join FILE.parts.json [--dest=PATH]
  python -m flexdraft_jax.checkpoints.parts join_folder DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

from flexdraft_jax.common import atomic_path, write_json_atomic

MANIFEST_SUFFIX = ".parts.json"
_CHUNK = 1 << 20


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def split_file(
    path: str, part_bytes: int, *, out_dir: str | None = None, remove: bool = False
) -> str:
    """Cut `path` into parts of at most `part_bytes` in `out_dir` (default: beside it) and write
    the manifest there. remove: delete `path` once the parts and the manifest are written.
    Returns the manifest's path."""
    if part_bytes < 1:
        raise ValueError(f"part_bytes must be >= 1, got {part_bytes}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is not a file")
    out_dir = out_dir or os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    name = os.path.basename(path)
    size = os.path.getsize(path)
    parts = []
    whole = hashlib.sha256()
    with open(path, "rb") as src:
        for i in range(max(1, -(-size // part_bytes))):
            part = f"{name}.part-{i:03d}"
            h = hashlib.sha256()
            written = 0
            with open(os.path.join(out_dir, part), "wb") as dst:
                while written < part_bytes:
                    block = src.read(min(_CHUNK, part_bytes - written))
                    if not block:
                        break
                    dst.write(block)
                    h.update(block)
                    whole.update(block)
                    written += len(block)
            parts.append({"file": part, "bytes": written, "sha256": h.hexdigest()})
    manifest = {"file": name, "bytes": size, "sha256": whole.hexdigest(), "parts": parts}
    mpath = os.path.join(out_dir, name + MANIFEST_SUFFIX)
    write_json_atomic(mpath, manifest)
    if remove:
        os.remove(path)
    return mpath


def read_manifest(manifest: str) -> dict:
    if not os.path.isfile(manifest):
        raise FileNotFoundError(f"parts manifest {manifest} does not exist")
    with open(manifest) as f:
        try:
            m = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{manifest} is not a parts manifest: {e}") from e
    missing = {"file", "bytes", "sha256", "parts"} - set(m)
    if missing:
        raise ValueError(f"{manifest} is not a parts manifest: no {sorted(missing)}")
    return m


def join_file(manifest: str, dest: str | None = None, *, remove_parts: bool = False) -> str:
    """Join the parts a manifest names (they sit beside it) into `dest` (default: the original
    name beside the manifest). Each part's size and SHA-256 and the whole's are checked before
    the file is renamed into place, so a bad transfer never leaves a file that looks whole."""
    m = read_manifest(manifest)
    folder = os.path.dirname(os.path.abspath(manifest))
    dest = os.path.abspath(dest or os.path.join(folder, m["file"]))
    paths = [os.path.join(folder, p["file"]) for p in m["parts"]]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{manifest}: parts missing: {missing}")
    for p, rec in zip(paths, m["parts"]):
        size = os.path.getsize(p)
        if size != rec["bytes"]:
            raise ValueError(f"part {p} has {size} bytes, the manifest says {rec['bytes']}")
        digest = _sha256(p)
        if digest != rec["sha256"]:
            raise ValueError(f"part {p} has SHA-256 {digest}, the manifest says {rec['sha256']}")
    with atomic_path(dest) as tmp:
        whole = hashlib.sha256()
        with open(tmp, "wb") as out:
            for p in paths:
                with open(p, "rb") as src:
                    for block in iter(lambda src=src: src.read(_CHUNK), b""):
                        out.write(block)
                        whole.update(block)
        if whole.hexdigest() != m["sha256"]:
            raise ValueError(
                f"joined {m['file']} has SHA-256 {whole.hexdigest()}, the manifest says "
                f"{m['sha256']}"
            )
    if remove_parts:
        for p in paths:
            os.remove(p)
        os.remove(manifest)
    return dest


def split_large_files(folder: str, limit: int) -> list[str]:
    """Split, in place, every file under `folder` larger than `limit` bytes (the originals are
    removed). Returns the manifests written."""
    out = []
    for dirpath, _, files in os.walk(folder):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            if os.path.getsize(path) > limit:
                out.append(split_file(path, limit, remove=True))
    return out


def join_folder(folder: str, *, remove_parts: bool = True) -> list[str]:
    """Join every manifest under `folder` in place. Returns the files restored."""
    out = []
    for dirpath, _, files in os.walk(folder):
        for name in sorted(files):
            if name.endswith(MANIFEST_SUFFIX):
                out.append(join_file(os.path.join(dirpath, name), remove_parts=remove_parts))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flexdraft_jax.checkpoints.parts")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("split", help="cut FILE into checksummed parts")
    sp.add_argument("file")
    sp.add_argument("--part_mib", type=float, required=True, help="largest part, in MiB")
    sp.add_argument("--out_dir", default=None, help="where the parts go (default: beside FILE)")
    jp = sub.add_parser("join", help="join the parts a manifest names, checking them")
    jp.add_argument("manifest")
    jp.add_argument("--dest", default=None, help="joined file (default: beside the manifest)")
    fp = sub.add_parser("join_folder", help="join every manifest under a folder, in place")
    fp.add_argument("folder")
    args = ap.parse_args(argv)
    if args.cmd == "split":
        mpath = split_file(args.file, int(args.part_mib * 2**20), out_dir=args.out_dir)
        for p in read_manifest(mpath)["parts"]:
            print(p["file"], p["bytes"])
        print(mpath)
    elif args.cmd == "join":
        print(join_file(args.manifest, args.dest))
    else:
        for path in join_folder(args.folder):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
